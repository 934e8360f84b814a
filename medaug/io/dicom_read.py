"""Read DICOM series and NIfTI files into a :class:`Volume`; write them back.

Conventions, used everywhere in medaug:

* ``Volume.array`` is ``(X, Y, Z)`` float32 in source units (HU for CT), a 2D image is
  ``(X, Y, 1)``. Array axis 0 runs along the DICOM row direction (columns of the
  pixel matrix), axis 1 along the column direction, axis 2 along the slice normal.
* ``Volume.affine`` maps voxel indices to RAS+ millimetres (the NIfTI convention).
  DICOM is LPS+, so ``RAS = diag(-1, -1, 1) @ LPS``.
* ``Volume.meta`` holds only the allow-listed acquisition basics of
  :data:`medaug.deid.ALLOWED_META` (modality, kVp, ...); nothing that could identify a
  patient is ever copied into it.

DICOM input may be a folder tree of files with or without ``.dcm`` extension, several
series mixed: :func:`index_dicom` reads headers only (no pixel data), groups files by
SeriesInstanceUID and records what it skipped and why (non-DICOM, truncated, no pixel
data, DICOMDIR). Series may be single-frame files or one enhanced multi-frame file.

Example::

    vol = read_volume("ct_series/")          # a folder of .dcm files
    write_nifti("ct.nii.gz", vol.array, vol.affine)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.pixels.decoders.base import get_decoder
from pydicom import uid as sop
from pydicom.dataset import Dataset
from pydicom.uid import MediaStorageDirectoryStorage

from ..deid import allowed_meta
from .nifti import read_nifti
from .volume import ImageReadError, LPS_TO_RAS, UNEVEN_POLICIES, Volume, is_nifti

#: What to install for compressed pixel data pydicom cannot decode with what is present.
DECODER_EXTRA = "pip install 'medaug[jpeg]'  (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle)"
#: SOP classes read as images. Any other standard class (a segmentation, a dose grid, a report) is refused by
#: name; a UID pydicom does not know (a vendor's private class) is tried like a file without SOPClassUID.
IMAGE_SOP_CLASSES = frozenset(
    {
        sop.CTImageStorage,
        sop.EnhancedCTImageStorage,
        sop.LegacyConvertedEnhancedCTImageStorage,
        sop.MRImageStorage,
        sop.EnhancedMRImageStorage,
        sop.LegacyConvertedEnhancedMRImageStorage,
        sop.PositronEmissionTomographyImageStorage,
        sop.EnhancedPETImageStorage,
        sop.LegacyConvertedEnhancedPETImageStorage,
        sop.NuclearMedicineImageStorage,
        sop.SecondaryCaptureImageStorage,
        sop.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        sop.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        sop.ComputedRadiographyImageStorage,
        sop.DigitalXRayImageStorageForPresentation,
        sop.DigitalXRayImageStorageForProcessing,
        sop.DigitalMammographyXRayImageStorageForPresentation,
        sop.DigitalMammographyXRayImageStorageForProcessing,
        sop.BreastTomosynthesisImageStorage,
        sop.XRayAngiographicImageStorage,
        sop.EnhancedXAImageStorage,
        sop.XRayRadiofluoroscopicImageStorage,
        sop.EnhancedXRFImageStorage,
        sop.UltrasoundImageStorage,
        sop.UltrasoundMultiFrameImageStorage,
        sop.EnhancedUSVolumeStorage,
    }
)
#: What to do with a non-image object, by SOP class (others: by kind of name, else that it is not read).
NOT_AN_IMAGE_FIX = {
    sop.SegmentationStorage: "give it as the mask of its image, converted to a NIfTI label map on the image's "
    "grid, e.g. with dcmqi's segimage2itkimage",
    sop.RTStructureSetStorage: "convert its contours to a label map on the image's grid first, a NIfTI file for "
    "the mask column, e.g. with dcmrtstruct2nii or plastimatch convert",
    sop.RTDoseStorage: "it is the dose grid of a treatment plan; remove it and give the CT it was planned on",
    sop.KeyObjectSelectionDocumentStorage: "it only lists other images; remove it",
}


@dataclass
class DicomSeries:
    """The files of one SeriesInstanceUID and their headers (read without pixel data)."""

    uid: str
    files: list[Path] = field(default_factory=list)
    headers: list[Dataset] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return sum(int(h.get("NumberOfFrames", 1) or 1) for h in self.headers)


@dataclass
class DicomIndex:
    """DICOM series found under some paths, and the files skipped (``(path, why)``)."""

    series: dict[str, DicomSeries] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def headers(self) -> dict[Path, Dataset]:
        return {f: h for s in self.series.values() for f, h in zip(s.files, s.headers)}


def _sop_class_problem(ds: Dataset) -> str | None:
    """Why the SOP class of ``ds`` (SOPClassUID, else the file meta's) is no image medaug reads, or None.

    None also for a file that names no SOP class or one pydicom does not know: those are tried as images.
    """
    meta = ds.file_meta if hasattr(ds, "file_meta") else {}
    uid = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    if not uid:
        return None
    uid = sop.UID(str(uid))
    if uid in IMAGE_SOP_CLASSES or uid.name == str(uid):
        return None
    fix = NOT_AN_IMAGE_FIX.get(uid)
    if fix is None and uid.name.endswith("SR Storage"):
        fix = "a structured report holds text and measurements; remove it"
    if fix is None and "Presentation State" in uid.name:
        fix = "it holds display settings for other images; remove it"
    if fix is None:
        fix = "medaug reads CT, MR, PET, NM, X-ray, ultrasound and secondary capture images; remove it"
    return f"{uid.name} is not an image; {fix}"


def _expected_bytes(ds: Dataset) -> tuple[int, int, str]:
    """Bytes of uncompressed pixel data the header describes, bytes per frame, and how they were counted."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples, frames = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    needed = (rows * cols * samples * frames * bits + 7) // 8
    shape = f"{rows} × {cols} × {frames}" + (f" × {samples} samples" if samples != 1 else "")
    return needed, needed // max(frames, 1), f"Rows × Columns × frames ({shape}) at {bits} bits"


def _length_problem(ds: Dataset, length: int) -> str | None:
    """Why ``length`` bytes of uncompressed pixel data do not fit the header's Rows, Columns and frames, or None.

    Fewer bytes, or at least one whole frame more (pydicom would return the excess as extra frames), do not
    fit; a smaller excess is trailing padding, which pydicom ignores (see :func:`_pixels`).
    """
    needed, frame, counted = _expected_bytes(ds)
    if length < needed or length - needed >= max(frame, 2):
        return (
            f"pixel data holds {length} bytes but {counted} need {needed}; the header does not describe the "
            "pixels: fix Rows, Columns or NumberOfFrames, or re-export the file"
        )
    return None


def _header_problem(path: Path, fh, ds: Dataset) -> str | None:
    """Why a readable header is not an image slice we can use, or None."""
    sop_class = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
    if sop_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        return "DICOMDIR index file, not an image"
    problem = _sop_class_problem(ds)
    if problem:
        return problem
    start = fh.tell()
    group = fh.read(2)  # dcmread(stop_before_pixels) stops at the (7FE0,xxxx) pixel data element
    fh.seek(start)
    if group not in (b"\xe0\x7f", b"\x7f\xe0"):
        return f"no pixel data (modality {ds.get('Modality', 'unknown')}); not an image"
    if "SeriesInstanceUID" not in ds:
        return "no SeriesInstanceUID; cannot tell which series it belongs to"
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or not syntax.is_compressed:
        implicit, little = ds.original_encoding
        element = fh.read(8 if implicit else 12)  # tag, [VR, reserved,] 4-byte length (OB/OW: the long form)
        fh.seek(start)
        length = int.from_bytes(element[-4:], "big" if little is False else "little") if len(element) >= 8 else 0
        if len(element) < 8 or os.path.getsize(path) < start + len(element) + length:
            return f"truncated: file ends before its {length} bytes of pixel data"
        if length != 0xFFFFFFFF:  # an undefined length (encapsulated) fails in pixel decoding, with the file's name
            return _length_problem(ds, length)
    return None


def index_dicom(paths: Path | Iterable[Path], strict: bool = False) -> DicomIndex:
    """Read the headers (not the pixels) of every file under ``paths``; group them by series.

    Files with or without extension are tried; NIfTI and hidden files are ignored. A file
    that is not DICOM, is truncated or holds no image is skipped with a warning, or raises
    :class:`ImageReadError` when ``strict``.
    """
    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    files = []
    for p in paths:
        files += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    index = DicomIndex()
    for f in files:
        if is_nifti(f) or f.name.startswith("."):
            continue
        try:
            with open(f, "rb") as fh:
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
                problem = _header_problem(f, fh, ds)
        except Exception as err:  # pydicom raises many types for broken input
            problem = f"not a readable DICOM file ({type(err).__name__}: {str(err)[:80]})"
        if problem:
            if strict:
                fix = "" if problem.endswith("remove it") else "; remove it"
                raise ImageReadError(f"{f}: {problem}{fix}, or run without prepare.strict to skip it")
            warnings.warn(f"skipping {f}: {problem}", stacklevel=2)
            index.skipped.append((f, problem))
            continue
        uid = str(ds.SeriesInstanceUID)
        series = index.series.setdefault(uid, DicomSeries(uid))
        series.files.append(f)
        series.headers.append(ds)
    return index


def read_volume(
    path: str | os.PathLike,
    volume_index: int | None = None,
    uneven: str = "error",
    strict: bool = False,
) -> Volume:
    """Read a NIfTI file, a DICOM file or a folder holding one DICOM series.

    ``volume_index`` picks one volume of a 4D NIfTI; ``uneven`` is what to do with uneven
    slice spacing (``error`` or ``resample``); ``strict`` refuses non-image files in a folder.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder; check the path in your labels file")
    if is_nifti(path):
        return read_nifti(path, volume_index=volume_index)
    index = index_dicom(path, strict=strict)
    if not index.series:
        why = "; ".join(sorted({why for _, why in index.skipped})) or "it is empty"
        raise ImageReadError(f"{path}: no readable DICOM image found ({why}); check the path")
    if len(index.series) > 1:
        raise ImageReadError(
            f"{path}: holds {len(index.series)} DICOM series; give each series its own folder "
            "or name the series by its SeriesInstanceUID in the labels file"
        )
    (series,) = index.series.values()
    return read_dicom_series(series.files, source=path, uneven=uneven)


@dataclass
class _Frame:
    """One 2D frame with its geometry: ``pixels`` (rows, cols) in source units."""

    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient (row dir, col dir)
    spacing: tuple[float, float]  # PixelSpacing (between rows, between columns)
    pixels: np.ndarray


def _can_decode(syntax) -> bool:
    """Whether an installed pydicom decoder plugin handles the transfer syntax ``syntax``."""
    try:
        return get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):  # a syntax pydicom has no decoder for at all
        return False


def _pixels(ds: Dataset, f: Path) -> np.ndarray:
    """Decoded pixel data; a compressed syntax without a decoder, or a length the header does not describe,
    gets a clear error."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    data = next((ds[k].value for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if (syntax is None or not syntax.is_compressed) and isinstance(data, bytes):
        problem = _length_problem(ds, len(data))
        if problem:
            raise ImageReadError(f"{f}: {problem}")
        needed, _, counted = _expected_bytes(ds)
        if len(data) > needed + needed % 2:
            warnings.warn(
                f"{f}: pixel data holds {len(data) - needed} bytes more than {counted} need; read as "
                "padding; if the image looks sheared, check Rows and Columns",
                stacklevel=3,
            )
    try:
        pixels = ds.pixel_array
    except Exception as err:
        if syntax is not None and syntax.is_compressed:
            if not _can_decode(syntax):
                raise ImageReadError(
                    f"{f}: pixel data is compressed as '{syntax.name}' ({syntax}) and no installed "
                    f"decoder handles it; install the decoders: {DECODER_EXTRA}"
                ) from err
            shape = " × ".join(str(int(ds.get(k, 1) or 1)) for k in ("Rows", "Columns", "NumberOfFrames"))
            reason = " ".join(str(err).split())[:120] or type(err).__name__  # one line
            raise ImageReadError(
                f"{f}: pixel data compressed as '{syntax.name}' could not be decoded "
                f"({reason}); if Rows × Columns × frames ({shape}) are right, install more "
                f"decoders: {DECODER_EXTRA}; else fix those header values"
            ) from err
        raise ImageReadError(f"{f}: pixel data cannot be read ({str(err)[:120]}); the file may be truncated") from err
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ImageReadError(f"{f}: colour image ({ds.get('PhotometricInterpretation')}); medaug reads greyscale only")
    return pixels


def _functional(ds: Dataset, frame: int, sequence: str, keyword: str):
    """``keyword`` of an enhanced multi-frame file: per-frame group first, then the shared one."""
    per, shared = ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")
    for item in ([per[frame]] if per and frame < len(per) else []) + ([shared[0]] if shared else []):
        inner = item.get(sequence)
        if inner and keyword in inner[0]:
            return inner[0].get(keyword)
    return ds.get(keyword)


def _frames_of(ds: Dataset, f: Path) -> list[_Frame]:
    """The frames of one file in source units (rescale applied), single- or multi-frame."""
    pixels = _pixels(ds, f).astype(np.float32)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = pixels.reshape(n, *pixels.shape[-2:])
    frames = []
    for k in range(n):
        iop = _functional(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient")
        ipp = _functional(ds, k, "PlanePositionSequence", "ImagePositionPatient")
        spacing = _functional(ds, k, "PixelMeasuresSequence", "PixelSpacing")
        slope = _functional(ds, k, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, k, "PixelValueTransformationSequence", "RescaleIntercept")
        if iop is None or ipp is None or spacing is None:
            missing = [
                n
                for n, v in (("ImageOrientationPatient", iop), ("ImagePositionPatient", ipp), ("PixelSpacing", spacing))
                if v is None
            ]
            raise ImageReadError(
                f"{f}: frame {k} lacks {', '.join(missing)}; medaug needs patient geometry "
                "(not a cross-sectional image? remove it from the input)"
            )
        slope = float(slope) if slope not in (None, "") else 1.0
        intercept = float(intercept) if intercept not in (None, "") else 0.0
        frames.append(
            _Frame(
                np.asarray(ipp, float),
                np.asarray(iop, float),
                (float(spacing[0]), float(spacing[1])),
                pixels[k] * slope + intercept,
            )
        )
    return frames


def _resample_slices(stack: np.ndarray, dist: np.ndarray, step: float) -> tuple[np.ndarray, int]:
    """Linear interpolation of ``stack`` (X, Y, Z) at slice distances ``dist`` onto a grid of ``step`` mm."""
    n = int(round((dist[-1] - dist[0]) / step)) + 1
    targets = dist[0] + step * np.arange(n)
    hi = np.clip(np.searchsorted(dist, targets, side="left"), 1, len(dist) - 1)
    w = ((targets - dist[hi - 1]) / (dist[hi] - dist[hi - 1])).astype(np.float32)
    return stack[:, :, hi - 1] * (1 - w) + stack[:, :, hi] * w, n


def read_dicom_series(files: list[Path], source: Path | None = None, uneven: str = "error") -> Volume:
    """Read one DICOM series (single-frame files or one enhanced multi-frame file) in HU (CT) or stored units.

    Slices are ordered by their position along the slice normal, not by InstanceNumber;
    RescaleSlope/Intercept are applied; the affine comes from ImageOrientationPatient,
    ImagePositionPatient, PixelSpacing and the measured slice spacing. Uneven spacing
    (missing slices) raises, or with ``uneven="resample"`` is linearly resampled to the
    smallest spacing found.
    """
    if uneven not in UNEVEN_POLICIES:
        raise ValueError(f"uneven={uneven!r}; choose one of {', '.join(UNEVEN_POLICIES)}")
    source = Path(source or (files[0] if files else "."))
    frames, series, meta = [], set(), None
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception as err:
            raise ImageReadError(f"{f}: not a readable DICOM file ({err}); remove it from {source}") from err
        problem = _sop_class_problem(ds)
        if problem:
            raise ImageReadError(f"{f}: {problem}")
        series.add(str(ds.get("SeriesInstanceUID", "")))
        meta = meta or allowed_meta(ds)
        frames += _frames_of(ds, Path(f))
    if not frames:
        raise ImageReadError(f"{source}: folder holds no DICOM files")
    if len(series) > 1:
        raise ImageReadError(f"{source}: holds {len(series)} DICOM series; give each series its own folder")

    orientation = frames[0].orientation
    if any(not np.allclose(fr.orientation, orientation, atol=1e-4) for fr in frames):
        raise ImageReadError(
            f"{source}: slices have different orientations (a localizer or a radial "
            "series?); this is not one volume: remove the odd slices"
        )
    if any(fr.pixels.shape != frames[0].pixels.shape for fr in frames):
        raise ImageReadError(f"{source}: slices have different sizes; this is not one volume")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    frames.sort(key=lambda fr: float(fr.position @ normal))
    positions = np.array([fr.position for fr in frames])
    stack = np.stack([fr.pixels.T for fr in frames], axis=-1).astype(np.float32)  # (cols=X, rows=Y, Z)

    if len(frames) > 1:
        direction = positions[-1] - positions[0]
        if np.linalg.norm(direction) < 1e-6:
            raise ImageReadError(
                f"{source}: all {len(frames)} slices share one position (duplicate files, "
                "or several time points in one series?)"
            )
        direction = direction / np.linalg.norm(direction)
        dist = (positions - positions[0]) @ direction
        off_line = np.linalg.norm(positions - positions[0] - dist[:, None] * direction, axis=1).max()
        steps = np.diff(dist)
        if steps.min() < 1e-6:
            raise ImageReadError(f"{source}: two slices share one position (duplicate files?)")
        if off_line > 0.01 * np.median(steps) + 1e-3:
            raise ImageReadError(f"{source}: slice positions do not lie on one line; this is not one volume")
        if np.ptp(steps) > 0.01 * steps.mean() + 1e-3:
            if uneven == "error":
                raise ImageReadError(
                    f"{source}: uneven slice spacing ({steps.min():.3g}-{steps.max():.3g} mm): missing slices? "
                    "Supply the complete series, or set prepare.uneven_spacing=resample"
                )
            step = float(steps.min())  # missing slices leave gaps of whole multiples of the true spacing
            stack, n = _resample_slices(stack, dist, step)
            slice_vec = direction * step
        else:
            slice_vec = (positions[-1] - positions[0]) / (len(frames) - 1)
    else:
        slice_vec = normal * float(meta.get("slice_thickness_mm", 1.0) or 1.0)

    spacing = frames[0].spacing
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = slice_vec
    lps[:3, 3] = positions[0]
    return Volume(stack, LPS_TO_RAS @ lps, meta)
