"""DICOM writers: single-frame series and enhanced multi-frame files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ..atomic import atomic_file
from .volume import LPS_TO_RAS

#: The SOP classes written per modality: (single-frame, enhanced multi-frame).
DICOM_SOP_CLASSES = {
    "CT": (CTImageStorage, pydicom.uid.EnhancedCTImageStorage),
    "MR": (pydicom.uid.MRImageStorage, pydicom.uid.EnhancedMRImageStorage),
}
MR_UNITS = "MR signal, arbitrary units"


# Type 2 attributes of the patient, study and series modules that a synthetic image has no value for: present, empty.
EMPTY_TYPE2 = dict.fromkeys(
    ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName")
    + ("StudyID", "AccessionNumber", "PositionReferenceIndicator"),
    "",
)


def _int16_pixels(array: np.ndarray, whole_units: bool = True) -> tuple[np.ndarray, float]:
    """Source values as int16 and the slope that maps them back (intercept 0).

    ``whole_units`` (CT): whole HU, slope 1 unless the values exceed the int16 range. Otherwise
    (MR, arbitrary units of any scale, e.g. z-scores): the largest magnitude maps to 32767.
    """
    max_abs = float(np.abs(array).max()) if array.size else 0.0
    if whole_units:
        slope = 1.0 if max_abs <= 32767 else max_abs / 32767
    else:
        slope = max_abs / 32767 if max_abs > 0 else 1.0
    return np.round(np.asarray(array, dtype=np.float64) / slope).astype(np.int16), float(f"{slope:.8g}")


def _new_dataset(sop_class: str, sop_uid: str) -> Dataset:
    """An empty dataset with its file meta (explicit VR little endian) for one SOP instance."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    return ds


def _item(**fields) -> Dataset:
    item = Dataset()
    for key, value in fields.items():
        setattr(item, key, value)
    return item


def _sop_classes(modality: str) -> tuple[str, str]:
    if modality not in DICOM_SOP_CLASSES:
        raise ValueError(f"modality={modality!r}: medaug writes DICOM of {' or '.join(DICOM_SOP_CLASSES)} only")
    return DICOM_SOP_CLASSES[modality]


def _real_world_values(slope: float, units: str) -> Dataset:
    """Real World Value Mapping item: stored value × ``slope`` = source value in ``units`` (arbitrary units)."""
    return _item(
        RealWorldValueFirstValueMapped=-32768,
        RealWorldValueLastValueMapped=32767,
        RealWorldValueIntercept=0.0,
        RealWorldValueSlope=slope,
        LUTExplanation=units[:64],
        LUTLabel="MR_AU",
        MeasurementUnitsCodeSequence=[
            _item(CodeValue="[arb'U]", CodingSchemeDesignator="UCUM", CodeMeaning="arbitrary unit")
        ],
    )


def _window_strings(window: tuple[float, float], scale: float = 1.0) -> tuple[str, str]:
    """WindowCenter/WindowWidth strings of ``window`` (centre, width) divided by ``scale``."""
    return f"{float(window[0]) / scale:.6g}", f"{max(float(window[1]), 1.0) / scale:.6g}"


def write_dicom_series(
    folder: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    header: dict,
    modality: str = "CT",
    *,
    window: tuple[float, float] | None = None,
    file_name: str = "slice_{k:04d}.dcm",
    units: str = "",
) -> list[Path]:
    """Write ``array`` (X, Y, Z) in source units as a CT or MR Image series, one file per slice, fresh UIDs.

    Study, series, frame-of-reference and instance UIDs are generated (random, never
    derived from anything). ``header`` holds the identifying and descriptive attributes
    the caller chooses (e.g. ``PatientID``, ``PatientName``, ``SeriesDescription``) and
    overrides the empty type-2 defaults; nothing else is copied from anywhere.
    ``modality`` ``"CT"``: CT Image Storage, ``array`` in HU (``units`` ``"HU"`` or empty;
    any other unit gets RescaleType ``US``), stored as whole HU with RescaleSlope/Intercept.
    ``"MR"``: MR Image Storage; the MR Image IOD has no Modality LUT (no Rescale*, no HU), so
    the values are scaled to the int16 range and a Real World Value Mapping (slope, unit
    "arbitrary unit", ``units`` as its explanation) maps stored values back to the source.
    ``window`` = (centre, width) in source units sets WindowCenter/WindowWidth (for MR in
    stored values, as a viewer applies it). ``file_name`` is formatted with the slice index
    ``k`` (a 2D image, Z = 1, can get a plain name). Laterality is left out (nothing says a
    synthetic image is of a left or right part) and ImageLaterality is ``U``.
    Geometry: ImagePositionPatient per slice, ImageOrientationPatient, PixelSpacing
    (row, column spacing in mm) and SliceThickness come from ``affine`` (voxel → RAS mm).
    Validated with dicom3tools' dciodvfy (no error, no warning).
    """
    sop_class = _sop_classes(modality)[0]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(affine, dtype=np.float64)
    col_x, col_y, col_z = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy, dz = (float(np.linalg.norm(v)) for v in (col_x, col_y, col_z))
    iop = np.concatenate([col_x / dx, col_y / dy])

    ct = modality == "CT"
    stored, slope = _int16_pixels(array, whole_units=ct)

    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    type2 = dict(EMPTY_TYPE2, Manufacturer="", AcquisitionNumber="")
    if ct:
        type2.update(KVP="")
    else:  # the MR Image module: a research-mode (RM) sequence, no acquisition parameters to tell
        type2.update(
            ScanningSequence="RM",
            SequenceVariant="NONE",
            ScanOptions="",
            MRAcquisitionType="",
            RepetitionTime="",
            EchoTime="",
            EchoTrainLength="",
        )
    paths = []
    for k in range(array.shape[2]):
        sop_uid = generate_uid()
        ds = _new_dataset(sop_class, sop_uid)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if ct else "OTHER"]  # MR: value 3 from its defined terms
        ds.ImageLaterality = "U"
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
        if ct:
            ds.RescaleSlope = f"{slope:.8g}"
            ds.RescaleIntercept = "0"
            ds.RescaleType = "HU" if units in ("", "HU") else "US"
        else:
            ds.RealWorldValueMappingSequence = [_real_world_values(slope, units or MR_UNITS)]
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = _window_strings(window, 1.0 if ct else slope)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / file_name.format(k=k)
        with atomic_file(path, clean=False) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dicom_multiframe(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    header: dict,
    modality: str = "CT",
    *,
    window: tuple[float, float] | None = None,
    units: str = "",
) -> Path:
    """Write ``array`` (X, Y, Z) in source units as one Enhanced CT or Enhanced MR Image (multi-frame) file.

    The same content as :func:`write_dicom_series` in one object: geometry, rescale and
    window sit in the shared functional groups, each frame's ImagePositionPatient in its
    per-frame group (dimension: position along the stack). ``header`` as there, less the
    attributes this IOD does not hold. The enhanced IODs allow only PRIMARY as ImageType
    value 2, so it is DERIVED\\PRIMARY\\VOLUME\\NONE. CT: RescaleType HU (whole HU). MR:
    values scaled to the int16 range, RescaleType ``US`` (unspecified: MR signal has no
    unit) and a Real World Value Mapping naming ``units``. ``window`` in source units.
    Validated with dicom3tools' dciodvfy (no error, no warning).
    """
    import datetime

    sop_class = _sop_classes(modality)[1]
    ct = modality == "CT"
    not_in_iod = {"DerivationDescription", "Laterality", "KVP", "AcquisitionNumber"}
    path = Path(path)
    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(affine, dtype=np.float64)
    col_x, col_y, col_z = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy, dz = (float(np.linalg.norm(v)) for v in (col_x, col_y, col_z))
    stored, slope = _int16_pixels(array, whole_units=ct)
    now = datetime.datetime.now()

    sop_uid, dim_uid = generate_uid(), generate_uid()
    ds = _new_dataset(sop_class, sop_uid)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]  # the enhanced IODs allow only PRIMARY as value 2
    defaults = dict(
        EMPTY_TYPE2,
        Manufacturer="medaug",
        ManufacturerModelName="medaug",
        DeviceSerialNumber="none",
        SoftwareVersions="medaug",
        ContentDate=now.strftime("%Y%m%d"),
        ContentTime=now.strftime("%H%M%S"),
    )
    for key, value in {**defaults, **header}.items():
        if key not in not_in_iod:
            setattr(ds, key, value)
    ds.PatientPosition = "HFS"
    ds.PixelPresentation, ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = "MONOCHROME", "VOLUME", "NONE"
    frame_type = dict(
        FrameType=list(ds.ImageType),
        PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE",
    )
    if not ct:
        ds.ComplexImageComponent, ds.AcquisitionContrast = "MAGNITUDE", "UNKNOWN"
        ds.ApplicableSafetyStandardAgency = "IEC"  # required by dciodvfy even for DERIVED images; the usual one
        frame_type.update(ComplexImageComponent="MAGNITUDE", AcquisitionContrast="UNKNOWN")
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
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=dim_uid,
            DimensionIndexPointer=0x00200032,
            FunctionalGroupPointer=0x00209113,
            DimensionDescriptionLabel="Image Position (Patient)",
        )
    ]
    shared = _item(
        PixelMeasuresSequence=[
            _item(PixelSpacing=[float(f"{dy:.6f}"), float(f"{dx:.6f}")], SliceThickness=float(f"{dz:.6f}"))
        ],
        PlaneOrientationSequence=[
            _item(ImageOrientationPatient=[float(f"{v:.6f}") for v in np.concatenate([col_x / dx, col_y / dy])])
        ],
        PixelValueTransformationSequence=[
            _item(
                RescaleIntercept="0",
                RescaleSlope=f"{slope:.8g}",
                RescaleType="HU" if ct and units in ("", "HU") else "US",
            )
        ],
        FrameAnatomySequence=[
            _item(
                AnatomicRegionSequence=[
                    _item(CodeValue="38266002", CodingSchemeDesignator="SCT", CodeMeaning="Entire body")
                ],
                FrameLaterality="U",
            )
        ],
    )
    if ct:
        shared.CTImageFrameTypeSequence = [_item(**frame_type)]
        shared.IrradiationEventIdentificationSequence = [_item(IrradiationEventUID=generate_uid())]
    else:
        shared.MRImageFrameTypeSequence = [_item(**frame_type)]
        shared.RealWorldValueMappingSequence = [_real_world_values(slope, units or MR_UNITS)]
    if window is not None:
        centre, width = _window_strings(window)
        shared.FrameVOILUTSequence = [_item(WindowCenter=centre, WindowWidth=width)]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [
        _item(
            FrameContentSequence=[_item(DimensionIndexValues=[k + 1])],
            PlanePositionSequence=[_item(ImagePositionPatient=[float(f"{v:.4f}") for v in lps[:3, 3] + k * col_z])],
        )
        for k in range(array.shape[2])
    ]
    ds.PixelData = np.ascontiguousarray(stored.transpose(2, 1, 0)).tobytes()  # frames of (rows, cols)
    with atomic_file(path, clean=False) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


#: Segment codes by a word in the label's name (DICOM CID 7150/7151); anything else is an anatomical structure.
SEGMENT_CODES = {
    "lesion": ("MorphologicallyAbnormalStructure", "Lesion"),
    "tumo": ("MorphologicallyAbnormalStructure", "Neoplasm"),
    "nodule": ("MorphologicallyAbnormalStructure", "Nodule"),
}
SEGMENT_ALGORITHM_TYPES = ("MANUAL", "SEMIAUTOMATIC", "AUTOMATIC")


def _segment_codes(name: str):
    from pydicom.sr.codedict import codes

    for word, (category, kind) in SEGMENT_CODES.items():
        if word in name.lower():
            return getattr(codes.SCT, category), getattr(codes.SCT, kind)
    return codes.SCT.AnatomicalStructure, codes.SCT.AnatomicalStructure


def write_dicom_seg(
    path: str | os.PathLike,
    mask: np.ndarray,
    source_files: list[str | os.PathLike],
    labels: dict[str, int],
    header: dict,
    *,
    algorithm_type: str = "MANUAL",
    algorithm: tuple[str, str] = ("medaug", "0"),
) -> Path:
    """Write the label map ``mask`` (X, Y, Z) int of the image in ``source_files`` as a DICOM Segmentation (highdicom).

    ``source_files``: the CT/MR Image series :func:`write_dicom_series` wrote (one file per slice, in slice order)
    or the one Enhanced image of :func:`write_dicom_multiframe`; the segmentation references them (Referenced Series
    Sequence, per-frame Source Image Sequence), shares their frame of reference and study, and copies their patient
    and study attributes. One BINARY segment per foreground label of ``labels`` ({name: value}, background 0,
    values 1..K), labelled with its name; ``algorithm_type`` ``MANUAL`` (a mask a person drew or gave),
    ``SEMIAUTOMATIC`` or ``AUTOMATIC`` (a mask a model made: ``algorithm`` = (name, version) identifies it).
    ``header`` sets descriptive attributes (SeriesDescription, ImageComments, ...). Frames without any segment are
    left out (one is kept for an empty mask). Validated with dicom3tools' dciodvfy (no error).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if algorithm_type not in SEGMENT_ALGORITHM_TYPES:
        raise ValueError(f"algorithm_type={algorithm_type!r}; choose one of {list(SEGMENT_ALGORITHM_TYPES)}")
    by_value = {int(v): str(k) for k, v in labels.items() if int(v) != 0}
    if sorted(by_value) != list(range(1, len(by_value) + 1)):
        raise ValueError(f"mask labels {dict(labels)}: the foreground values must be 1..K (background 0)")
    values = set(np.unique(mask).tolist()) - {0}
    if values - set(by_value):
        raise ValueError(
            f"the mask holds values {sorted(values - set(by_value))} that labels {dict(labels)} do not name"
        )
    sources = [pydicom.dcmread(f) for f in source_files]
    if len(sources) > 1:
        sources.sort(key=lambda ds: int(ds.InstanceNumber))
    identification = None
    if algorithm_type != "MANUAL":
        identification = hd.AlgorithmIdentificationSequence(
            name=algorithm[0], version=algorithm[1], family=codes.cid7162.ArtificialIntelligence
        )
    segments = []
    for number, name in sorted(by_value.items()):
        category, kind = _segment_codes(name)
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=algorithm_type,
                algorithm_identification=identification,
            )
        )
    frames = np.ascontiguousarray(np.asarray(mask).astype(np.uint8).transpose(2, 1, 0))  # (Z, rows = Y, cols = X)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=header.get("Manufacturer") or "medaug",
        manufacturer_model_name="medaug",
        software_versions=algorithm[1],
        device_serial_number="none",
        content_label="MASK",
        content_description=header.get("SeriesDescription", "")[:64] or None,
        omit_empty_frames=bool(frames.any()),
    )
    for key, value in header.items():
        setattr(seg, key, value)
    path = Path(path)
    with atomic_file(path, clean=False) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path
