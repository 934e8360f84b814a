"""Pictures of images for people: PNG grids per class, and the three central views of a volume."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


def views(image: torch.Tensor) -> list[np.ndarray]:
    """What a person looks at for one image (C, *spatial): the 2D image, or the three
    mid-slices (axial, coronal, sagittal) of a 3D volume, as uint8, display-oriented."""
    x = image[0]
    if x.ndim == 2:
        return [np.flipud(_to_uint8(x).T)]
    cx, cy, cz = (s // 2 for s in x.shape)
    return [np.flipud(_to_uint8(v).T) for v in (x[:, :, cz], x[:, cy, :], x[cx, :, :])]


def save_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    path: str | Path,
    per_class: int = 8,
    min_tile: int = 96,
) -> Path:
    """A PNG with one row per class (up to ``per_class`` samples each; 3D: three planes side by side),
    small images enlarged (nearest neighbour) to at least ``min_tile`` pixels."""
    rows = []
    for c in range(len(class_names)):
        tiles = [np.concatenate(views(img), axis=1) for img in images[labels == c][:per_class]]
        if not tiles:
            continue
        pad = np.zeros_like(tiles[0])
        tiles += [pad] * (per_class - len(tiles))
        rows.append(np.concatenate([np.pad(t, 1) for t in tiles], axis=1))
    if not rows:
        raise ValueError("no images to draw")
    grid = np.concatenate(rows, axis=0)
    scale = max(1, -(-min_tile // min(images.shape[2:])))
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
