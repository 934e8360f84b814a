"""Prepared datasets: labels in, canonical cache + manifest out, patient-level splits.

A prepared dataset is a folder::

    dataset.json   spatial dims, image shape, class names, intensity window, geometry
    manifest.csv   item_id, path, patient (pseudonym), label, class_name, split
    items/         one NIfTI per item, in model space [-1, 1], with its affine
    DONE           written last: a folder without it is never trusted

Patient identifiers from the labels file are only used to split; the manifest holds
pseudonyms (``patient_0001``…) in order of first appearance.

Example::

    summary = prepare_dataset("raw/labels.csv", "prepared", window, spatial_size=(32, 32, 1), spatial_dims=2)
    images, labels = load_split("prepared", "train")      # (N, 1, 32, 32) in [-1, 1], (N,)
"""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from .io import atomic_folder, is_complete, read_volume, write_nifti
from .preprocessing import IntensityWindow, preprocess, slice_volume

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ["item_id", "path", "patient", "label", "class_name", "split"]


class DatasetError(ValueError):
    """Bad labels or dataset input; the message names the file and the fix."""


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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_labels(labels_csv: str | Path) -> list[dict]:
    """Rows of a labels CSV with columns ``path``, ``patient_id``, ``label`` (optional ``split``)."""
    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise DatasetError(f"{labels_csv}: labels file not found; pass data.labels=<csv with path,patient_id,label>")
    with open(labels_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = {"path", "patient_id", "label"} - set(rows[0].keys() if rows else [])
    if not rows or missing:
        raise DatasetError(f"{labels_csv}: needs columns path, patient_id, label (missing: {sorted(missing) or 'all rows'})")
    for i, row in enumerate(rows, start=2):
        if not (labels_csv.parent / row["path"]).exists():
            raise DatasetError(f"{labels_csv}:{i}: image {row['path']!r} not found (paths are relative to the CSV)")
        if not row["label"].strip():
            raise DatasetError(f"{labels_csv}:{i}: empty label")
    return rows


def split_patients(
    patient_labels: dict[str, str], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Assign each patient to train/val/test, stratified by the patient's class, seeded.

    Every class with at least as many patients as non-empty splits puts at least one
    patient in each. Returns ``{patient: split}``.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise DatasetError(f"split fractions must be 3 non-negative numbers summing to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = defaultdict(list)
    for patient, label in sorted(patient_labels.items()):
        by_class[label].append(patient)
    assignment = {}
    for label in sorted(by_class):
        patients = list(rng.permutation(by_class[label]))
        n = len(patients)
        counts = [int(round(f * n)) for f in fractions]
        for i, f in enumerate(fractions):  # at least one per non-empty split when possible
            if f > 0 and counts[i] == 0 and n >= sum(1 for g in fractions if g > 0):
                counts[i] = 1
        while sum(counts) > n:
            counts[int(np.argmax(counts))] -= 1
        counts[0] += n - sum(counts)
        start = 0
        for split, count in zip(SPLITS, counts):
            for patient in patients[start : start + count]:
                assignment[patient] = split
            start += count
    return assignment


def fingerprint(labels_csv: Path, params: dict) -> str:
    """Hash of the labels file, the files it names (size and mtime) and the preparation parameters."""
    h = hashlib.sha256(Path(labels_csv).read_bytes())
    for row in read_labels(labels_csv):
        path = labels_csv.parent / row["path"]
        for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
            stat = p.stat()
            h.update(f"{p.relative_to(labels_csv.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _slice_indices(depth: int, rule: str, band: float) -> list[int]:
    if rule == "all" or depth == 1:
        return list(range(depth))
    if rule == "central":
        half = max(1, int(round(depth * band / 2)))
        mid = depth // 2
        return list(range(max(0, mid - half), min(depth, mid + half)))
    raise DatasetError(f"slice rule {rule!r} unknown; use 'all' or 'central'")


def prepare_dataset(
    labels_csv: str | Path,
    out_dir: str | Path,
    window: IntensityWindow,
    spatial_size: Sequence[int],
    spatial_dims: int,
    pixdim: Sequence[float] | None = None,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    slice_rule: str = "central",
    slice_band: float = 0.5,
    seed: int = 0,
) -> PreparedInfo:
    """Read every image in ``labels_csv``, preprocess it and write the prepared dataset.

    For ``spatial_dims=2`` each volume gives slices along array axis 2 (all of them or a
    central band); a 2D input gives its one slice. If ``out_dir`` already holds a complete
    dataset prepared from the same files and parameters, it is reused as is.
    """
    labels_csv, out_dir = Path(labels_csv), Path(out_dir)
    params = dict(window=window.as_dict(), spatial_size=list(spatial_size), spatial_dims=spatial_dims,
                  pixdim=None if pixdim is None else list(pixdim), split=list(split_fractions),
                  slice_rule=slice_rule, slice_band=slice_band, seed=seed)
    rows = read_labels(labels_csv)
    fp = fingerprint(labels_csv, params)
    if is_complete(out_dir):
        info = load_info(out_dir)
        if info.fingerprint == fp:
            return info

    class_names = sorted({row["label"].strip() for row in rows})
    class_index = {name: i for i, name in enumerate(class_names)}
    pseudonyms: dict[str, str] = {}
    for row in rows:
        pseudonyms.setdefault(row["patient_id"], f"patient_{len(pseudonyms) + 1:04d}")
    patient_class = {}
    for row in rows:
        patient_class.setdefault(pseudonyms[row["patient_id"]], row["label"].strip())
    explicit = {pseudonyms[r["patient_id"]]: r["split"] for r in rows if r.get("split")}
    assignment = split_patients(patient_class, split_fractions, seed)
    assignment.update(explicit)

    manifest, affine = [], None
    with atomic_folder(out_dir) as tmp:
        (tmp / "items").mkdir()
        for row in tqdm(rows, desc="prepare", unit="image"):
            volume = preprocess(read_volume(labels_csv.parent / row["path"]), window, spatial_size, pixdim)
            pieces = (
                [volume]
                if spatial_dims == 3
                else [slice_volume(volume, k) for k in _slice_indices(volume.array.shape[2], slice_rule, slice_band)]
            )
            patient = pseudonyms[row["patient_id"]]
            label = row["label"].strip()
            for piece in pieces:
                item_id = f"item_{len(manifest):05d}"
                write_nifti(tmp / "items" / f"{item_id}.nii.gz", piece.array, piece.affine)
                affine = piece.affine if affine is None else affine
                manifest.append(dict(item_id=item_id, path=f"items/{item_id}.nii.gz", patient=patient,
                                     label=class_index[label], class_name=label, split=assignment[patient]))
        counts = {s: dict(Counter(m["class_name"] for m in manifest if m["split"] == s)) for s in SPLITS}
        for name in class_names:
            if not counts["train"].get(name):
                raise DatasetError(f"{labels_csv}: class {name!r} has no training images; add images or drop the class")
        shape = [int(v) for v in nib.load(tmp / manifest[0]["path"]).shape]
        image_shape = shape[:2] if spatial_dims == 2 else shape
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
            writer.writeheader()
            writer.writerows(manifest)
        meta = dict(format="medaug-prepared/1", spatial_dims=spatial_dims, image_shape=image_shape,
                    class_names=class_names, window=window.as_dict(), affine=np.asarray(affine).tolist(),
                    counts=counts, fingerprint=fp, params=params)
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    return load_info(out_dir)


def load_info(prepared_dir: str | Path) -> PreparedInfo:
    """Read ``dataset.json`` of a complete prepared dataset."""
    prepared_dir = Path(prepared_dir)
    if not is_complete(prepared_dir):
        raise DatasetError(f"{prepared_dir}: not a complete prepared dataset (no DONE marker); run `medaug prepare` first")
    meta = json.loads((prepared_dir / "dataset.json").read_text())
    return PreparedInfo(prepared_dir, meta["spatial_dims"], meta["image_shape"], meta["class_names"],
                        IntensityWindow(**meta["window"]), np.asarray(meta["affine"]), meta["counts"],
                        meta["fingerprint"])


def read_manifest(prepared_dir: str | Path) -> list[dict]:
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
