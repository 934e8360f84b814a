"""The label maps (segmentation masks) of a samples folder and of a prepared dataset, as the shared contract says.

A samples folder's ``samples.pt`` may hold ``"masks"``: ``(N, 1, *spatial)`` int64 label maps (0 = background), the
mask each image was conditioned on or generated with; its ``info.json`` then names them (``"mask_labels"``:
``{"background": 0, "lesion": 1, ...}``) and each manifest row says where its mask came from (``mask_source``:
``user`` | ``generated`` | ``real``). A prepared dataset with masks names one label-map NIfTI per item in the
``mask`` column of its ``manifest.csv`` (relative to the folder, same grid and affine as the image) and its labels in
``dataset.json`` (``"labels"``).

Example::

    masks = load_sample_masks("job/samples")            # (N, 1, 64, 64) int64, or None without masks
    real = load_split_masks("job/prepared", "train")    # (M, 1, 64, 64) int64 in the order of load_split
    labels = mask_labels({"mask_labels": {"background": 0, "lesion": 1}})   # {"background": 0, "lesion": 1}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np
import torch

from .data import DatasetError, load_info, read_manifest

MASK_SOURCES = ("user", "generated", "real")


def load_sample_masks(samples_dir: str | Path) -> torch.Tensor | None:
    """The label maps ``(N, 1, *spatial)`` int64 of a samples folder, or None when its ``samples.pt`` holds none."""
    path = Path(samples_dir) / "samples.pt"
    data = torch.load(path, map_location="cpu", weights_only=True)
    masks = data.get("masks")
    if masks is None:
        return None
    images = data["images"]
    if tuple(masks.shape) != (len(images), 1, *images.shape[2:]):
        raise ValueError(
            f"{path}: masks have shape {tuple(masks.shape)} but the images {tuple(images.shape)}; "
            "one (1, *spatial) label map per image is expected: sample again"
        )
    return masks.long()


def mask_labels(meta: Mapping, num_labels: int = 0) -> dict[str, int]:
    """The ``labels`` ({name: value}, background 0) that ``meta`` (a samples ``info.json`` or a prepared
    ``dataset.json``) records under ``mask_labels`` or ``labels``; else ``label_<k>`` for k < ``num_labels``."""
    labels = meta.get("mask_labels") or meta.get("labels")
    if isinstance(labels, Mapping) and labels and all(isinstance(v, int) for v in labels.values()):
        return {str(k): int(v) for k, v in sorted(labels.items(), key=lambda kv: kv[1])}
    return {"background": 0, **{f"label_{k}": k for k in range(1, num_labels)}}


def load_split_masks(prepared_dir: str | Path, split: str) -> torch.Tensor | None:
    """The label maps ``(N, 1, *spatial)`` int64 of one split, in the order of :func:`medaug.data.load_split`;
    None when the dataset has no ``mask`` column (or none of its items a mask)."""
    info = load_info(prepared_dir)
    rows = read_manifest(prepared_dir)
    if not any(r.get("mask") for r in rows):
        return None
    rows = [r for r in rows if r["split"] == split]
    missing = [r["path"] for r in rows if not r.get("mask")]
    if missing:
        raise DatasetError(
            f"{prepared_dir}: items {missing[:3]} of split {split!r} have no mask while others do; "
            "prepare again with a mask for every case (or none)"
        )
    arrays = []
    for r in rows:
        array = np.asarray(nib.load(info.root / r["mask"]).dataobj)
        arrays.append(array[:, :, 0] if info.spatial_dims == 2 else array)
    if not arrays:
        return torch.empty(0, 1, *info.image_shape, dtype=torch.long)
    return torch.from_numpy(np.rint(np.stack(arrays)).astype(np.int64)[:, None])


def prepared_mask_labels(prepared_dir: str | Path, masks: torch.Tensor | None = None) -> dict[str, int]:
    """The prepared dataset's mask labels from its ``dataset.json`` (``label_<k>`` names for the values in
    ``masks`` when it records none)."""
    meta = json.loads((Path(prepared_dir) / "dataset.json").read_text())
    return mask_labels(meta, 0 if masks is None or masks.numel() == 0 else int(masks.max()) + 1)
