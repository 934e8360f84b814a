"""Bring a :class:`~medaug.io.Volume` into model space with MONAI transforms.

The chain is: channel first → orientation to RAS → resample to a target spacing →
intensity window to [-1, 1] → (optionally) crop to the foreground → crop or pad to a
fixed shape. The intensity mapping is an :class:`IntensityWindow` (CT: a fixed HU
window; MR: per-volume percentiles, :class:`PercentileNormalization`) kept with the
dataset, so samples go back to HU (CT) or source units on export. A mask, when given,
follows the image through the same geometry (nearest neighbour).

Example::

    window = IntensityWindow(lo=-160.0, hi=240.0, unit="HU")   # soft-tissue CT window
    prepared = preprocess(vol, window, spatial_size=(64, 64, 1), pixdim=(3.0, 3.0, 0))
    prepared.array.min() >= -1.0                               # model space
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)

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


@dataclass(frozen=True)
class PercentileNormalization:
    """MR: per-volume percentiles ``[lower, upper]`` (in %) of the source intensities map to [-1, 1].

    MR intensities have no absolute unit, so each volume gets its own
    :class:`IntensityWindow` (``window_for``); the prepared dataset keeps every item's
    window in its manifest and, for exporting synthetic images, the median window of the
    training volumes. Limits: intensities below/above the percentiles are clipped, and a
    synthetic image comes back in the units of a typical training scan, not of any one scan.
    ``nonzero`` computes percentiles over non-zero voxels (MR background is usually 0).

    Example::

        norm = PercentileNormalization(1.0, 99.0)
        window = norm.window_for(volume.array)     # IntensityWindow(lo=p1, hi=p99, unit="MR a.u.")
    """

    lower: float = 1.0
    upper: float = 99.0
    nonzero: bool = True
    unit: str = "MR a.u."

    def __post_init__(self):
        if not 0 <= self.lower < self.upper <= 100:
            raise ValueError(f"percentiles need 0 <= lower < upper <= 100, got {self.lower}, {self.upper}")

    def window_for(self, array: np.ndarray) -> IntensityWindow:
        values = np.asarray(array, np.float32).ravel()
        if self.nonzero and (values != 0).any():
            values = values[values != 0]
        lo, hi = (float(v) for v in np.percentile(values, [self.lower, self.upper]))
        if not hi > lo:
            hi = lo + 1.0  # a constant image: any width gives the same model-space image
        return IntensityWindow(lo, hi, self.unit)

    def as_dict(self) -> dict:
        return dict(kind="percentile", **asdict(self))


Normalization = Union[IntensityWindow, PercentileNormalization]


def normalization_of(preprocess: Mapping) -> Normalization:
    """The ``preprocess`` section's intensity mapping: MR percentiles when it has ``percentile``, else the CT
    ``window`` (HU)."""
    if preprocess.get("percentile") is not None:
        return PercentileNormalization(**preprocess["percentile"])
    return IntensityWindow(**preprocess["window"])


CROPS = ("center", "foreground")


def window_of(norm: Normalization, array: np.ndarray) -> IntensityWindow:
    """The window that maps ``array`` to [-1, 1]: the fixed CT window, or the volume's MR percentiles."""
    return norm.window_for(array) if isinstance(norm, PercentileNormalization) else norm


def build_transform(
    window: IntensityWindow,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | None,
    crop: str = "center",
    margin: int = 2,
    keys: Sequence[str] = ("image",),
) -> Compose:
    """The MONAI dict chain for channel-first ``(1, X, Y, Z)`` MetaTensors under ``keys``.

    ``keys[0]`` is the image; a second key (a mask) is resampled nearest-neighbour and
    cropped/padded with the image. ``pixdim`` entries ≤ 0 keep the source spacing on that
    axis; ``spatial_size`` entries of -1 keep the size on that axis. ``crop="foreground"``
    first crops to the box of voxels above the window's floor (plus ``margin`` voxels), so
    the crop/pad to ``spatial_size`` centres the body, not the field of view. Padding uses
    the lowest intensity (air for CT).
    """
    if crop not in CROPS:
        raise ValueError(f"crop={crop!r}; choose one of {', '.join(CROPS)}")
    keys = list(keys)
    image = keys[0]
    transforms = [Orientationd(keys=keys, axcodes="RAS", labels=None)]
    if pixdim is not None:
        transforms.append(
            Spacingd(keys=keys, pixdim=tuple(pixdim), mode=["bilinear", "nearest"][: len(keys)], padding_mode="border")
        )
    transforms.append(
        ScaleIntensityRanged(keys=image, a_min=window.lo, a_max=window.hi, b_min=-1.0, b_max=1.0, clip=True)
    )
    if crop == "foreground":
        transforms.append(
            CropForegroundd(keys=keys, source_key=image, select_fn=_above_floor, margin=margin, allow_smaller=True)
        )
    transforms.append(ResizeWithPadOrCropd(keys=image, spatial_size=tuple(spatial_size), mode="constant", value=-1.0))
    if len(keys) > 1:
        transforms.append(
            ResizeWithPadOrCropd(keys=keys[1:], spatial_size=tuple(spatial_size), mode="constant", value=0)
        )
    return Compose(transforms)


def _above_floor(x):
    return x > -1.0 + 1e-3


class Prepared(NamedTuple):
    """A preprocessed case: the image in [-1, 1], its label map (int64, or None), and the window used."""

    volume: Volume
    mask: np.ndarray | None
    window: IntensityWindow


def preprocess_case(
    volume: Volume,
    norm: Normalization,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | None = None,
    mask: np.ndarray | None = None,
    crop: str = "center",
    margin: int = 2,
) -> Prepared:
    """Like :func:`preprocess`, with an optional mask ``(X, Y, Z)`` on the image's grid carried along.

    The mask is a label map (0 = background; any integer values): it comes back as an int64 array on the output
    grid, resampled nearest-neighbour and padded with 0, its label values unchanged.
    """
    if len(spatial_size) != 3:
        raise ValueError(f"spatial_size needs 3 entries (X, Y, Z; -1 keeps an axis), got {list(spatial_size)}")
    window = window_of(norm, volume.array)
    affine = torch.from_numpy(volume.affine)
    data = {"image": MetaTensor(torch.from_numpy(volume.array[None].copy()), affine=affine)}
    if mask is not None:
        if mask.shape != volume.array.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {volume.array.shape}")
        values = np.rint(np.asarray(mask, dtype=np.float64))  # label values; float32 holds integers up to 2**24
        data["mask"] = MetaTensor(torch.from_numpy(values[None].astype(np.float32)), affine=affine.clone())
    out = build_transform(window, spatial_size, pixdim, crop, margin, keys=list(data))(data)
    image = out["image"]
    array = image.as_tensor().numpy()[0].astype(np.float32)
    prepared_mask = np.rint(out["mask"].as_tensor().numpy()[0]).astype(np.int64) if mask is not None else None
    return Prepared(Volume(array, image.affine.numpy().astype(np.float64), dict(volume.meta)), prepared_mask, window)


def preprocess(
    volume: Volume,
    window: Normalization,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | None = None,
    crop: str = "center",
) -> Volume:
    """Return ``volume`` in RAS, resampled, mapped to [-1, 1] and cropped/padded.

    ``spatial_size`` has three entries ``(X, Y, Z)``; the result's affine describes the
    output grid in RAS mm, so the geometry survives all the way to export.
    """
    return preprocess_case(volume, window, spatial_size, pixdim, crop=crop).volume


def slice_volume(volume: Volume, index: int) -> Volume:
    """The axial slice ``index`` (array axis 2) as a one-slice volume with its own affine."""
    affine = volume.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, index]) + affine[:3, 3]
    return Volume(volume.array[:, :, index : index + 1].copy(), affine, dict(volume.meta))
