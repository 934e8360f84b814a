"""Datasets: labels in, the prepare run, the prepared-dataset reader."""

from __future__ import annotations

from .labels import (
    SPLITS,
    DEID_REPORT,
    LABEL_COLUMNS,
    MANIFEST_FIELDS,
    DatasetError,
    Case,
    read_labels,
    read_cases,
    split_patients,
)
from .prepared import PreparedInfo, load_info, read_manifest, load_split
from .prepare import fingerprint, SLICE_RULES, prepare_dataset

__all__ = [
    "SPLITS",
    "DEID_REPORT",
    "LABEL_COLUMNS",
    "MANIFEST_FIELDS",
    "DatasetError",
    "Case",
    "read_labels",
    "read_cases",
    "split_patients",
    "PreparedInfo",
    "load_info",
    "read_manifest",
    "load_split",
    "fingerprint",
    "SLICE_RULES",
    "prepare_dataset",
]
