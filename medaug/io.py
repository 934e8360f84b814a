"""Read DICOM series and NIfTI files into a :class:`Volume`; write them back.

Conventions, used everywhere in medaug:

* ``Volume.array`` is ``(X, Y, Z)`` float32 in source units (HU for CT), a 2D image is
  ``(X, Y, 1)``. Array axis 0 runs along the DICOM row direction (columns of the
  pixel matrix), axis 1 along the column direction, axis 2 along the slice normal.
* ``Volume.affine`` maps voxel indices to RAS+ millimetres (the NIfTI convention).
  DICOM is LPS+, so ``RAS = diag(-1, -1, 1) @ LPS``.
* ``Volume.meta`` holds only allow-listed acquisition basics (modality, spacing);
  nothing that could identify a patient is ever copied into it.

Example::

    vol = read_volume("ct_series/")          # a folder of .dcm files
    write_nifti("ct.nii.gz", vol.array, vol.affine)
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")


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


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file, a DICOM file or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder; check the path in your labels file")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return read_dicom_series(files, source=path)
    if is_nifti(path):
        return read_nifti(path)
    return read_dicom_series([path], source=path)


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a 2D or 3D NIfTI image as ``(X, Y, Z)`` float32 with its affine."""
    path = Path(path)
    try:
        img = nib.load(str(path))
        array = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises several types for broken files
        raise ImageReadError(f"{path}: not a readable NIfTI file ({err})") from err
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ImageReadError(
            f"{path}: NIfTI image has shape {array.shape}; medaug reads 2D or 3D images, "
            "split 4D series into one file per volume"
        )
    if not np.isfinite(array).all():
        raise ImageReadError(f"{path}: image contains NaN or Inf values; fix or mask them before prepare")
    return Volume(array, np.asarray(img.affine, dtype=np.float64), {"modality": "unknown"})


def _slice_geometry(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    spacing = tuple(float(v) for v in ds.PixelSpacing)  # (between rows, between columns)
    return row_dir, col_dir, normal, ipp, spacing


def read_dicom_series(files: list[Path], source: Path | None = None) -> Volume:
    """Read one single-frame DICOM series into a volume in HU (CT) or stored units.

    Slices are ordered by their position along the slice normal, not by InstanceNumber;
    RescaleSlope/Intercept are applied; the affine comes from ImageOrientationPatient,
    ImagePositionPatient, PixelSpacing and the measured slice spacing.
    """
    source = source or (files[0] if files else Path("."))
    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f))
        except Exception as err:
            raise ImageReadError(f"{f}: not a readable DICOM file ({err}); remove it from {source}") from err
    if not datasets:
        raise ImageReadError(f"{source}: folder holds no DICOM files")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise ImageReadError(f"{source}: holds {len(series)} DICOM series; give each series its own folder")

    row_dir, col_dir, normal, _, spacing = _slice_geometry(datasets[0])
    for ds in datasets[1:]:
        if not np.allclose(ds.ImageOrientationPatient, datasets[0].ImageOrientationPatient, atol=1e-4):
            raise ImageReadError(f"{source}: slices have different orientations; this is not one volume")
    datasets.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)))
    positions = np.array([np.asarray(ds.ImagePositionPatient, float) for ds in datasets])

    if len(datasets) > 1:
        steps = np.diff(positions, axis=0)
        step_len = np.linalg.norm(steps, axis=1)
        if step_len.min() < 1e-6:
            raise ImageReadError(f"{source}: two slices share one position (duplicate files?)")
        if np.ptp(step_len) > 0.01 * step_len.mean() + 1e-3:
            raise ImageReadError(
                f"{source}: uneven slice spacing ({step_len.min():.3g}-{step_len.max():.3g} mm): "
                "missing slices? Supply the complete series"
            )
        slice_vec = (positions[-1] - positions[0]) / (len(datasets) - 1)
    else:
        slice_vec = normal * float(datasets[0].get("SliceThickness", 1.0) or 1.0)

    slices = []
    for ds in datasets:
        pixels = ds.pixel_array.astype(np.float32)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        slices.append((pixels * slope + intercept).T)  # (rows, cols) → (X = cols, Y = rows)
    array = np.stack(slices, axis=-1).astype(np.float32)

    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = slice_vec
    lps[:3, 3] = positions[0]
    meta = {"modality": str(datasets[0].get("Modality", "unknown"))}
    return Volume(array, LPS_TO_RAS @ lps, meta)


@contextmanager
def atomic_folder(out_dir: str | os.PathLike):
    """Build a folder under a temporary name; on success write ``DONE`` and rename it into place.

    On any error the temporary folder is removed and ``out_dir`` is left as it was, so a
    folder with ``DONE`` is always complete. Yields the temporary path to write into.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        (tmp / "DONE").write_text("complete\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was finished by :func:`atomic_folder` (its ``DONE`` marker exists)."""
    return (Path(folder) / "DONE").is_file()


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, descrip: str = "") -> Path:
    """Write ``array`` (X, Y[, Z]) with ``affine`` as NIfTI, atomically (temp file, then rename)."""
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    if descrip:
        img.header["descrip"] = descrip.encode()[:79]
    tmp = _atomic_target(path)
    tmp = tmp.with_name(tmp.name + (".nii.gz" if path.name.endswith(".gz") else ".nii"))
    nib.save(img, str(tmp))
    os.replace(tmp, path)
    return path


def write_dicom_series(
    folder: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    header: dict,
    modality: str = "CT",
    *,
    window: tuple[float, float] | None = None,
    file_name: str = "slice_{k:04d}.dcm",
) -> list[Path]:
    """Write ``array`` (X, Y, Z) in HU as a CT Image series, one file per slice, with fresh UIDs.

    Study, series, frame-of-reference and instance UIDs are generated (random, never
    derived from anything). ``header`` holds the identifying and descriptive attributes
    the caller chooses (e.g. ``PatientID``, ``PatientName``, ``SeriesDescription``) and
    overrides the empty type-2 defaults; nothing else is copied from anywhere. Stored
    int16 values map back to HU through RescaleSlope/Intercept (rounded to ``slope`` HU).
    ``window`` = (centre, width) in HU sets WindowCenter/WindowWidth. ``file_name`` is
    formatted with the slice index ``k`` (a 2D image, Z = 1, can get a plain name).
    Geometry: ImagePositionPatient per slice, ImageOrientationPatient, PixelSpacing
    (row, column spacing in mm) and SliceThickness come from ``affine`` (voxel → RAS mm).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(affine, dtype=np.float64)
    col_x, col_y, col_z = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy, dz = (float(np.linalg.norm(v)) for v in (col_x, col_y, col_z))
    iop = np.concatenate([col_x / dx, col_y / dy])

    max_abs = float(np.abs(array).max()) if array.size else 0.0
    slope = 1.0 if max_abs <= 32767 else max_abs / 32767
    stored = np.round(np.asarray(array, dtype=np.float64) / slope).astype(np.int16)

    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    type2 = dict(PatientName="", PatientID="", PatientBirthDate="", PatientSex="", StudyDate="", StudyTime="",
                 ReferringPhysicianName="", StudyID="", AccessionNumber="", Laterality="",
                 PositionReferenceIndicator="", Manufacturer="", KVP="", AcquisitionNumber="")
    paths = []
    for k in range(array.shape[2]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        for key, value in {**type2, **header}.items():
            setattr(ds, key, value)
        ds.ImageOrientationPatient = [float(f"{v:.6f}") for v in iop]
        ds.ImagePositionPatient = [float(f"{v:.4f}") for v in lps[:3, 3] + k * col_z]
        ds.PixelSpacing = [float(f"{dy:.6f}"), float(f"{dx:.6f}")]
        ds.SliceThickness = float(f"{dz:.6f}")
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope:.8g}"
        ds.RescaleIntercept = "0"
        ds.RescaleType = "HU"
        if window is not None:
            ds.WindowCenter = f"{float(window[0]):.6g}"
            ds.WindowWidth = f"{max(float(window[1]), 1.0):.6g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / file_name.format(k=k)
        tmp = _atomic_target(path)
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def write_dicom_multiframe(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    header: dict,
    *,
    window: tuple[float, float] | None = None,
) -> Path:
    """Write ``array`` (X, Y, Z) in HU as one Enhanced CT Image (multi-frame) file, fresh UIDs.

    The same content as :func:`write_dicom_series` in one object: geometry, rescale and
    window sit in the shared functional groups, each frame's ImagePositionPatient in its
    per-frame group (dimension: position along the stack). ``header`` as there, less the
    attributes this IOD does not hold. The enhanced IODs allow only PRIMARY as ImageType
    value 2, so it is DERIVED\\PRIMARY\\VOLUME\\NONE. Validated with dicom3tools' dciodvfy.
    """

    def _item(**fields) -> Dataset:
        item = Dataset()
        for key, value in fields.items():
            setattr(item, key, value)
        return item

    import datetime

    from pydicom.uid import EnhancedCTImageStorage

    not_in_iod = {"DerivationDescription", "Laterality", "KVP", "AcquisitionNumber"}
    path = Path(path)
    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(affine, dtype=np.float64)
    col_x, col_y, col_z = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy, dz = (float(np.linalg.norm(v)) for v in (col_x, col_y, col_z))
    max_abs = float(np.abs(array).max()) if array.size else 0.0
    slope = 1.0 if max_abs <= 32767 else max_abs / 32767
    stored = np.round(np.asarray(array, dtype=np.float64) / slope).astype(np.int16)
    now = datetime.datetime.now()

    sop_uid, dim_uid = generate_uid(), generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, 1
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]  # the enhanced IODs allow only PRIMARY as value 2
    defaults = dict(PatientName="", PatientID="", PatientBirthDate="", PatientSex="", StudyDate="", StudyTime="",
                    ReferringPhysicianName="", StudyID="", AccessionNumber="",
                    PositionReferenceIndicator="", Manufacturer="medaug", ManufacturerModelName="medaug",
                    DeviceSerialNumber="none", SoftwareVersions="medaug", ContentDate=now.strftime("%Y%m%d"),
                    ContentTime=now.strftime("%H%M%S"))
    for key, value in {**defaults, **header}.items():
        if key not in not_in_iod:
            setattr(ds, key, value)
    ds.PatientPosition = "HFS"
    ds.PixelPresentation, ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = "MONOCHROME", "VOLUME", "NONE"
    ds.ContentQualification = "RESEARCH"
    ds.NumberOfFrames = int(array.shape[2])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[0])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PresentationLUTShape, ds.LossyImageCompression = "IDENTITY", "00"
    ds.BurnedInAnnotation = ds.get("BurnedInAnnotation", "NO") or "NO"
    ds.AcquisitionContextSequence = []
    ds.DimensionOrganizationType = "3D"
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dim_uid)]
    ds.DimensionIndexSequence = [_item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00200032,
                                       FunctionalGroupPointer=0x00209113,
                                       DimensionDescriptionLabel="Image Position (Patient)")]
    shared = _item(
        PixelMeasuresSequence=[_item(PixelSpacing=[float(f"{dy:.6f}"), float(f"{dx:.6f}")],
                                     SliceThickness=float(f"{dz:.6f}"))],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=[float(f"{v:.6f}")
                                                                 for v in np.concatenate([col_x / dx, col_y / dy])])],
        PixelValueTransformationSequence=[_item(RescaleIntercept="0", RescaleSlope=f"{slope:.8g}", RescaleType="HU")],
        CTImageFrameTypeSequence=[_item(FrameType=list(ds.ImageType), PixelPresentation="MONOCHROME",
                                        VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE")],
        IrradiationEventIdentificationSequence=[_item(IrradiationEventUID=generate_uid())],
        FrameAnatomySequence=[_item(AnatomicRegionSequence=[_item(CodeValue="38266002", CodingSchemeDesignator="SCT",
                                                                  CodeMeaning="Entire body")],
                                    FrameLaterality="U")],
    )
    if window is not None:
        shared.FrameVOILUTSequence = [_item(WindowCenter=f"{float(window[0]):.6g}",
                                            WindowWidth=f"{max(float(window[1]), 1.0):.6g}")]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [
        _item(FrameContentSequence=[_item(DimensionIndexValues=[k + 1])],
              PlanePositionSequence=[_item(ImagePositionPatient=[float(f"{v:.4f}") for v in lps[:3, 3] + k * col_z])])
        for k in range(array.shape[2])
    ]
    ds.PixelData = np.ascontiguousarray(stored.transpose(2, 1, 0)).tobytes()  # frames of (rows, cols)
    tmp = _atomic_target(path)
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
    return path

