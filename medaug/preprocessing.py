"""Bring a :class:`~medaug.io.Volume` into model space with MONAI transforms.

The chain is: channel first → orientation to RAS → resample to a target spacing →
intensity window to [-1, 1] → crop or pad to a fixed shape. The intensity mapping
is an :class:`IntensityWindow` kept with the dataset, so samples go back to HU (CT)
or source units on export.

Example::

    window = IntensityWindow(lo=-160.0, hi=240.0, unit="HU")   # soft-tissue CT window
    prepared = preprocess(vol, window, spatial_size=(64, 64, 1), pixdim=(3.0, 3.0, 0))
    prepared.array.min() >= -1.0                               # model space
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Orientation, ResizeWithPadOrCrop, ScaleIntensityRange, Spacing

from .io import Volume


@dataclass(frozen=True)
class IntensityWindow:
    """Linear map between source units ``[lo, hi]`` (e.g. HU) and model space ``[-1, 1]``."""

    lo: float
    hi: float
    unit: str = "HU"

    def __post_init__(self):
        if not self.hi > self.lo:
            raise ValueError(f"intensity window needs hi > lo, got lo={self.lo}, hi={self.hi}")

    def to_model(self, x: np.ndarray) -> np.ndarray:
        """Source units → [-1, 1], clipped."""
        return np.clip((np.asarray(x, np.float32) - self.lo) / (self.hi - self.lo) * 2 - 1, -1, 1)

    def to_source(self, x: np.ndarray) -> np.ndarray:
        """[-1, 1] → source units (HU for CT)."""
        return (np.asarray(x, np.float32) + 1) / 2 * (self.hi - self.lo) + self.lo

    def as_dict(self) -> dict:
        return asdict(self)


def build_transform(window: IntensityWindow, spatial_size: Sequence[int], pixdim: Sequence[float] | None) -> Compose:
    """The MONAI chain for a channel-first ``(1, X, Y, Z)`` MetaTensor.

    ``pixdim`` entries ≤ 0 keep the source spacing on that axis; ``spatial_size`` entries
    of -1 keep the size on that axis. Padding uses the lowest intensity (air for CT).
    """
    transforms = [Orientation(axcodes="RAS", labels=None)]
    if pixdim is not None:
        transforms.append(Spacing(pixdim=tuple(pixdim), mode="bilinear", padding_mode="border"))
    transforms += [
        ScaleIntensityRange(a_min=window.lo, a_max=window.hi, b_min=-1.0, b_max=1.0, clip=True),
        ResizeWithPadOrCrop(spatial_size=tuple(spatial_size), mode="constant", value=-1.0),
    ]
    return Compose(transforms)


def preprocess(
    volume: Volume,
    window: IntensityWindow,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | None = None,
) -> Volume:
    """Return ``volume`` in RAS, resampled, windowed to [-1, 1] and cropped/padded.

    ``spatial_size`` has three entries ``(X, Y, Z)``; the result's affine describes the
    output grid in RAS mm, so the geometry survives all the way to export.
    """
    if len(spatial_size) != 3:
        raise ValueError(f"spatial_size needs 3 entries (X, Y, Z; -1 keeps an axis), got {list(spatial_size)}")
    image = MetaTensor(torch.from_numpy(volume.array[None].copy()), affine=torch.from_numpy(volume.affine))
    out = build_transform(window, spatial_size, pixdim)(image)
    array = out.as_tensor().numpy()[0].astype(np.float32)
    return Volume(array, out.affine.numpy().astype(np.float64), dict(volume.meta))


def slice_volume(volume: Volume, index: int) -> Volume:
    """The axial slice ``index`` (array axis 2) as a one-slice volume with its own affine."""
    affine = volume.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, index]) + affine[:3, 3]
    return Volume(volume.array[:, :, index : index + 1].copy(), affine, dict(volume.meta))
