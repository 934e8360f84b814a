"""The built-in demo data: seeded, class-labelled CT-like phantoms written as real files.

Each image is a body ellipse of textured soft tissue (about 40 HU) in air (-1000 HU).
The three classes differ in a way a classifier can learn:

* ``healthy``: no lesion;
* ``single_lesion``: one large round lesion (about +110 HU);
* ``multi_lesion``: three to four small lesions.

Most images are written as NIfTI; every ``dicom_every``-th image is written as a DICOM
series (one file per slice), so the demo runs through the same reading path as user data.
A ``labels.csv`` (path, patient_id, mask, label) lists them; two images share one patient. Each image's
lesion mask (1 = lesion, where a lesion reaches at least half its contrast; empty for ``healthy``) is
written beside it as a NIfTI label map on the image's grid, so the demo has segmentation pairs.

Example::

    labels_csv = make_demo_dataset("outputs/demo_2d/raw", spatial_dims=2, size=32)
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from .io import write_dicom_series, write_nifti

DEMO_CLASSES = ("healthy", "single_lesion", "multi_lesion")
DEMO_MASK_LABELS = {"background": 0, "lesion": 1}  # the masks' labels (prepare's mask_labels, data.mask_labels)
AIR_HU, TISSUE_HU, LESION_HU = -1000.0, 40.0, 150.0


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Coordinates in [-1, 1] along each axis."""
    return np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")


def make_phantom(label: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """One phantom in HU of class ``label`` (index into DEMO_CLASSES), shape ``(X, Y[, Z])``."""
    return make_phantom_with_mask(label, shape, rng)[0]


def make_phantom_with_mask(
    label: int, shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom in HU and its lesion mask (uint8, 1 = lesion), both of shape ``(X, Y[, Z])``; the image
    is the one :func:`make_phantom` draws from the same ``rng`` state."""
    coords = _grid(shape)
    radii = rng.uniform(0.75, 0.9, size=len(shape))
    body = sum((c / r) ** 2 for c, r in zip(coords, radii)) <= 1.0
    texture = gaussian_filter(rng.normal(size=shape), sigma=max(shape) / 16) * 60.0
    image = np.where(body, TISSUE_HU + texture + rng.normal(scale=6.0, size=shape), AIR_HU)

    n_lesions, radius = {0: (0, 0.0), 1: (1, 0.24), 2: (int(rng.integers(3, 5)), 0.11)}[label]
    placed, mask = 0, np.zeros(shape, dtype=np.uint8)
    while placed < n_lesions:
        centre = rng.uniform(-0.5, 0.5, size=len(shape))
        r = radius * rng.uniform(0.85, 1.15)
        dist = np.sqrt(sum((c - m) ** 2 for c, m in zip(coords, centre)))
        lesion = np.clip((r - dist) / (0.25 * r), 0.0, 1.0)  # soft edge
        image = image + body * lesion * (LESION_HU - TISSUE_HU)
        mask[body & (lesion >= 0.5)] = 1
        placed += 1
    return image.astype(np.float32), mask


def make_demo_dataset(
    root: str | Path,
    spatial_dims: int = 2,
    n_per_class: int = 24,
    size: int = 32,
    spacing_mm: float = 4.0,
    dicom_every: int = 4,
    seed: int = 0,
    masks: bool = True,
) -> Path:
    """Write the demo dataset under ``root`` and return the path of its ``labels.csv``.

    ``spatial_dims=2`` writes ``size²`` images (as one-slice volumes), ``3`` writes
    ``size³`` volumes, all with isotropic ``spacing_mm`` voxels, centred on the origin. ``masks``: also write
    each image's lesion mask (``masks/case_<i>.nii.gz``, the labels' ``mask`` column).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    if masks:
        (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size,) * spatial_dims
    affine = np.diag([spacing_mm] * 3 + [1.0])
    affine[:3, 3] = -spacing_mm * (size - 1) / 2
    if spatial_dims == 2:
        affine[2, 3] = 0.0

    rows = []
    labels = [c for c in range(len(DEMO_CLASSES)) for _ in range(n_per_class)]
    for i, label in enumerate(labels):
        image, lesions = make_phantom_with_mask(label, shape, rng)
        volume = image if spatial_dims == 3 else image[:, :, None]
        patient = f"phantom{label}{i // 2:03d}"
        if dicom_every and i % dicom_every == 0:
            rel = f"images/case_{i:04d}"
            header = {
                "PatientID": patient,
                "PatientName": "PHANTOM",
                "PatientIdentityRemoved": "YES",
                "DeidentificationMethod": "medaug demo phantom: generated, no patient data",
            }
            write_dicom_series(root / rel, volume, affine, header)
        else:
            rel = f"images/case_{i:04d}.nii.gz"
            write_nifti(root / rel, volume, affine, descrip="medaug demo phantom")
        row = {"path": rel, "patient_id": patient, "label": DEMO_CLASSES[label]}
        if masks:
            row["mask"] = f"masks/case_{i:04d}.nii.gz"
            label_map = lesions if spatial_dims == 3 else lesions[:, :, None]
            write_nifti(root / row["mask"], label_map, affine, descrip="medaug demo lesion mask", dtype=np.uint8)
        rows.append(row)

    labels_csv = root / "labels.csv"
    with open(labels_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return labels_csv
