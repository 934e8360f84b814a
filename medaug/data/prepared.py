"""Reading a prepared dataset folder: dataset.json info, manifest, splits as tensors."""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ..atomic import is_complete
from ..preprocessing import IntensityWindow
from .labels import DatasetError


@dataclass
class PreparedInfo:
    """What ``dataset.json`` says about a prepared dataset."""

    root: Path
    spatial_dims: int
    image_shape: list[int]
    class_names: list[str]
    window: IntensityWindow
    affine: np.ndarray
    counts: dict = field(default_factory=dict)
    fingerprint: str = ""
    summary: dict = field(default_factory=dict)  # patients, images, series, slices, classes, skipped
    deid: dict = field(default_factory=dict)  # policy, number of findings, log file
    modality: str = ""  # CT, MR, ... ("" in a dataset.json from before it was recorded)
    skipped: list = field(default_factory=list)  # (file, why) of this run only; never written out
    mask_labels: dict = field(default_factory=dict)  # {"background": 0, name: value, ...}; {} without masks

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_info(prepared_dir: str | Path) -> PreparedInfo:
    """Read ``dataset.json`` of a complete prepared dataset."""
    prepared_dir = Path(prepared_dir)
    if not is_complete(prepared_dir):
        raise DatasetError(
            f"{prepared_dir}: not a complete prepared dataset (no DONE marker); run `medaug prepare` first"
        )
    meta = json.loads((prepared_dir / "dataset.json").read_text())
    return PreparedInfo(
        prepared_dir,
        meta["spatial_dims"],
        meta["image_shape"],
        meta["class_names"],
        IntensityWindow(**meta["window"]),
        np.asarray(meta["affine"]),
        meta["counts"],
        meta["fingerprint"],
        meta.get("summary", {}),
        meta.get("deid", {}),
        modality=meta.get("modality", ""),
        mask_labels=meta.get("labels", {}),
    )


def read_manifest(prepared_dir: str | Path) -> list[dict]:
    """Rows of ``manifest.csv`` (``label`` as int); ``source_lo``/``source_hi`` give each item's window."""
    with open(Path(prepared_dir) / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["label"] = int(row["label"])
    return rows


def load_split(prepared_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of one split as ``(images (N, 1, *spatial) float32 in [-1, 1], labels (N,) int64)``."""
    info = load_info(prepared_dir)
    rows = [r for r in read_manifest(prepared_dir) if r["split"] == split]
    if not rows:
        warnings.warn(f"{prepared_dir}: split {split!r} is empty", stacklevel=2)
        return torch.empty(0, 1, *info.image_shape), torch.empty(0, dtype=torch.long)
    arrays = []
    for row in rows:
        array = np.asarray(nib.load(info.root / row["path"]).dataobj, dtype=np.float32)
        arrays.append(array[:, :, 0] if info.spatial_dims == 2 else array)
    images = torch.from_numpy(np.stack(arrays)[:, None])
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    return images, labels


def load_split_masks(prepared_dir: str | Path, split: str) -> torch.Tensor | None:
    """The label maps of one split, ``(N, 1, *spatial)`` int64 (0 = background, values as
    :attr:`PreparedInfo.mask_labels` names them) in the order of :func:`load_split`; None when the
    dataset has no masks.

    Example::

        masks = load_split_masks("prepared", "train")     # (N, 1, 32, 32), values in {0, 1}
    """
    info = load_info(prepared_dir)
    rows = read_manifest(prepared_dir)
    if not rows or "mask" not in rows[0]:
        return None
    rows = [r for r in rows if r["split"] == split]
    arrays = []
    for row in rows:
        array = np.asarray(nib.load(info.root / row["mask"]).dataobj).astype(np.int64)
        arrays.append(array[:, :, 0] if info.spatial_dims == 2 else array)
    if not arrays:
        return torch.empty(0, 1, *info.image_shape, dtype=torch.long)
    return torch.from_numpy(np.stack(arrays)[:, None])
