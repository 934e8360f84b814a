"""Image files: DICOM series and NIfTI read into a Volume, and written back."""

from __future__ import annotations

from .volume import LPS_TO_RAS, NIFTI_SUFFIXES, UNEVEN_POLICIES, ImageReadError, Volume, is_nifti
from .nifti import read_nifti, write_nifti
from .dicom_read import (
    DECODER_EXTRA,
    IMAGE_SOP_CLASSES,
    NOT_AN_IMAGE_FIX,
    DicomSeries,
    DicomIndex,
    index_dicom,
    read_volume,
    read_dicom_series,
)
from .dicom_write import DICOM_SOP_CLASSES, MR_UNITS, write_dicom_series, write_dicom_multiframe, write_dicom_seg

__all__ = [
    "LPS_TO_RAS",
    "NIFTI_SUFFIXES",
    "UNEVEN_POLICIES",
    "ImageReadError",
    "Volume",
    "is_nifti",
    "read_nifti",
    "write_nifti",
    "DECODER_EXTRA",
    "IMAGE_SOP_CLASSES",
    "NOT_AN_IMAGE_FIX",
    "DicomSeries",
    "DicomIndex",
    "index_dicom",
    "read_volume",
    "read_dicom_series",
    "DICOM_SOP_CLASSES",
    "MR_UNITS",
    "write_dicom_series",
    "write_dicom_multiframe",
    "write_dicom_seg",
]
