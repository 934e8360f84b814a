"""NIfTI read and write (nibabel)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic import atomic_file
from .volume import ImageReadError, Volume


def read_nifti(path: str | os.PathLike, volume_index: int | None = None) -> Volume:
    """Read a 2D or 3D NIfTI image as ``(X, Y, Z)`` float32 with its affine.

    A 4D image needs ``volume_index`` (which volume along the 4th axis to read).
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        if getattr(img, "affine", None) is None:
            kind = "a CIFTI-2 image" if isinstance(img, nib.Cifti2Image) else f"a {type(img).__name__}"
            raise ImageReadError(
                f"{path}: {kind} ({'.'.join(path.name.split('.')[-2:])}) has no affine: it holds "
                "surface or grayordinate data, not a volume; give a NIfTI volume"
            )
        shape = img.shape
        if len(shape) == 4 and volume_index is not None:
            if not -shape[3] <= volume_index < shape[3]:
                raise ImageReadError(f"{path}: volume_index={volume_index} but the image has {shape[3]} volumes")
            array = np.asarray(img.dataobj[..., volume_index], dtype=np.float32)
        else:
            array = np.asarray(img.dataobj, dtype=np.float32)
    except ImageReadError:
        raise
    except Exception as err:  # nibabel raises several types for broken files
        raise ImageReadError(f"{path}: not a readable NIfTI file ({err})") from err
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ImageReadError(
            f"{path}: NIfTI image has shape {array.shape}; medaug reads 2D or 3D images: set "
            "data.volume_index=<k> to read volume k of a 4D image, or split it into one file per volume"
        )
    if not np.isfinite(array).all():
        raise ImageReadError(f"{path}: image contains NaN or Inf values; fix or mask them before prepare")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or np.linalg.matrix_rank(affine[:3, :3]) < 3:
        header = img.header
        form = "sform" if header.get("sform_code", 0) > 0 else "qform" if header.get("qform_code", 0) > 0 else "pixdim"
        rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in affine[:3])
        raise ImageReadError(
            f"{path}: its affine (voxel → mm, from the {form}) is singular or not finite "
            f"[{rows}]; fix the header's sform/qform, e.g. nibabel's img.set_sform(affine, code=1)"
        )
    return Volume(array, affine, {"modality": "unknown"})


def write_nifti(
    path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, descrip: str = "", dtype=np.float32
) -> Path:
    """Write ``array`` (X, Y[, Z]) as ``dtype`` (uint8 for label maps) with ``affine`` as NIfTI, atomically (temp
    file, then rename)."""
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    if descrip:
        img.header["descrip"] = descrip.encode()[:79]
    with atomic_file(path, suffix=".nii.gz" if path.name.endswith(".gz") else ".nii", clean=False) as tmp:
        nib.save(img, str(tmp))
    return path
