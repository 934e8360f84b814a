"""The Volume every reader returns (array, affine, meta), ImageReadError and file-kind checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
UNEVEN_POLICIES = ("error", "resample")


class ImageReadError(ValueError):
    """An input image that cannot be read as asked; the message names the file and the fix."""


@dataclass
class Volume:
    """An image in source units with its geometry.

    ``array``: ``(X, Y, Z)`` float32; ``affine``: 4x4 voxel → RAS mm; ``meta``: allow-listed basics.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)
