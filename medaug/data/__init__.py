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
    declared_mask_labels,
    mask_label_names,
)
from .prepared import PreparedInfo, load_info, read_manifest, load_split, load_split_masks
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
    "load_split_masks",
    "declared_mask_labels",
    "mask_label_names",
    "fingerprint",
    "SLICE_RULES",
    "prepare_dataset",
]
