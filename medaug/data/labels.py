"""Labels in: the label CSV, folder-per-class trees, MSD/nnU-Net dataset.json, patient-level splits."""

from __future__ import annotations

import csv
import json
import logging
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np


SPLITS = ("train", "val", "test")
DEID_REPORT = "deid_report.csv"
LABEL_COLUMNS = {"path", "series_uid", "patient_id", "label", "split", "mask"}
MANIFEST_FIELDS = ["item_id", "path", "patient", "label", "class_name", "split", "source_lo", "source_hi"]
log = logging.getLogger("medaug")


class DatasetError(ValueError):
    """Bad labels or dataset input; the message names the file and the fix."""


@dataclass
class Case:
    """One labelled input: an image file/folder, or a DICOM series named by its SeriesInstanceUID."""

    source: str  # path relative to the labels file, or a series UID
    patient_id: str  # raw id from the labels: used to split, never written out
    label: str
    split: str = ""
    mask: str = ""  # optional mask path (non-zero = foreground), relative like source
    where: str = ""  # "labels.csv:3", for error messages
    many_series: bool = False  # a folder may hold several series (folder-per-class layout)


def _looks_like_uid(value: str) -> bool:
    return bool(re.fullmatch(r"[0-9]+(\.[0-9]+){3,}", value.strip()))


def read_labels(labels_csv: str | Path) -> list[dict]:
    """Rows of a labels CSV with columns ``path`` (or ``series_uid``), ``patient_id``, ``label``.

    Optional columns: ``split`` (train/val/test), ``mask`` (a mask image on the same grid).
    ``path`` may also hold a SeriesInstanceUID, looked up in the DICOM files under the CSV's folder.
    """
    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise DatasetError(f"{labels_csv}: labels file not found; pass data.labels=<csv with path,patient_id,label>")
    with open(labels_csv, newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: Excel's byte order mark
        reader = csv.DictReader(fh)
        columns = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = columns
        rows = list(reader)
    for row in rows:
        for name in LABEL_COLUMNS & row.keys():
            row[name] = (row[name] or "").strip()  # "a.nii.gz, p1, tumour": spaces after commas
        if "path" not in columns and "series_uid" in columns:
            row["path"] = row["series_uid"]
    missing = {"path", "patient_id", "label"} - set(columns) - ({"path"} if "series_uid" in columns else set())
    if missing:
        raise DatasetError(
            f"{labels_csv}: needs columns path (or series_uid), patient_id, label "
            f"(missing: {sorted(missing)}; found: {columns})"
        )
    if not rows:
        raise DatasetError(f"{labels_csv}: no rows under the header; add one row per image")
    listed: dict[Path, str] = {}
    for i, row in enumerate(rows, start=2):
        if not row["path"]:
            raise DatasetError(f"{labels_csv}:{i}: empty path")
        _refuse_repeat(listed, row["path"], str(i), f"{labels_csv}:{i}", "rows ")
        if not _looks_like_uid(row["path"]) and not (labels_csv.parent / row["path"]).exists():
            raise DatasetError(f"{labels_csv}:{i}: image {row['path']!r} not found (paths are relative to the CSV)")
        if row.get("mask") and not (labels_csv.parent / row["mask"]).exists():
            raise DatasetError(f"{labels_csv}:{i}: mask {row['mask']!r} not found (paths are relative to the CSV)")
        if not row["label"]:
            raise DatasetError(f"{labels_csv}:{i}: empty label")
        if not row["patient_id"]:
            raise DatasetError(f"{labels_csv}:{i}: empty patient_id (needed to split by patient)")
        if row.get("split") and row["split"] not in SPLITS:
            raise DatasetError(f"{labels_csv}:{i}: split {row['split']!r} unknown; use one of {', '.join(SPLITS)}")
    return rows


def _refuse_repeat(listed: dict[Path, str], image: str, entry: str, where: str, noun: str = "") -> None:
    """Refuse ``image`` when an earlier entry of the labels file named it (``listed``: image → that entry;
    as paths, so "./a.nii" and "a.nii" are one image)."""
    first = listed.setdefault(Path(image), entry)
    if first != entry:
        raise DatasetError(
            f"{where}: image {image!r} is listed twice ({noun}{first} and {entry}); an image belongs "
            "in one entry of the labels file: remove the duplicate"
        )


def _cases_from_folders(root: Path) -> list[Case]:
    """Folder-per-class layout: ``root/<class>/<case>``, a case being a NIfTI file, a DICOM file or a folder.

    The case's name is its patient id (one folder per patient); a case folder may hold several
    DICOM series (each becomes an item of that patient).
    """
    visible = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    if visible and not any(p.is_dir() for p in visible):
        raise DatasetError(
            f"{root}: the folder-per-class layout needs one sub-folder per class; found image files "
            f"directly in it (e.g. {visible[0].name}): move them into <folder>/<class>/, or list "
            "them in a labels CSV (path,patient_id,label) and pass data.labels=<csv>"
        )
    loose = [p.name for p in visible if not p.is_dir()]
    if loose:
        warnings.warn(
            f"{root}: {len(loose)} file(s) beside the class folders ignored (e.g. {loose[0]}); an image "
            "belongs inside its class folder",
            stacklevel=2,
        )
    cases = []
    for class_dir in (p for p in visible if p.is_dir()):
        for entry in sorted(p for p in class_dir.iterdir() if not p.name.startswith(".")):
            patient = entry.name[: -len(".nii.gz")] if entry.name.endswith(".nii.gz") else entry.stem
            cases.append(
                Case(str(entry.relative_to(root)), patient, class_dir.name, where=str(entry), many_series=True)
            )
    if not cases:
        raise DatasetError(
            f"{root}: folder with no images; expected one sub-folder per class holding images "
            "(or pass a labels CSV / dataset.json)"
        )
    return cases


def _mask_class(mask_path: Path, names: dict[int, str]) -> str:
    """The class of a segmentation: its foreground label with most voxels, or the background name."""
    values, counts = np.unique(np.asarray(nib.load(str(mask_path)).dataobj).astype(np.int64), return_counts=True)
    fg = [(c, v) for v, c in zip(values, counts) if v != 0]
    return names.get(max(fg)[1], str(max(fg)[1])) if fg else names.get(0, "background")


def _label_names(meta: dict) -> dict[int, str]:
    """``{value: name}`` of an MSD (``"1": "tumour"``) or nnU-Net v2 (``"tumour": 1``) ``labels`` entry."""
    labels = meta.get("labels", {})
    if labels and all(isinstance(v, int) for v in labels.values()):  # nnU-Net v2: name → value
        return {int(v): k for k, v in labels.items()}
    return {int(k): v for k, v in labels.items() if str(k).lstrip("-").isdigit()}  # MSD: "value" → name


def declared_mask_labels(names: Mapping[str, int]) -> dict[int, str]:
    """``{value: name}`` of the mask labels a user names (``data.mask_labels``, nnU-Net v2 style ``{name: value}``,
    e.g. ``{"lesion": 1}``; ``background: 0`` may be given or not: it is always there). Raises DatasetError for a
    value outside 1..255 (0 is the background), or two names of one value."""
    out: dict[int, str] = {0: "background"}
    for name, value in names.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise DatasetError(f"data.mask_labels.{name}={value!r}: give each label an integer value 1..255")
        if value == 0 and name != "background":
            raise DatasetError(f"data.mask_labels.{name}=0: 0 is the background; give {name} a value 1..255")
        if value in out and out[value] != name:
            raise DatasetError(f"data.mask_labels names value {value} twice ({out[value]}, {name}); one name a value")
        out[value] = str(name)
    return out


def mask_label_names(labels: str | Path) -> dict[int, str]:
    """The names of the mask values an MSD / nnU-Net ``dataset.json`` declares (``{0: "background", 1: ...}``);
    ``{}`` for a labels CSV or a folder-per-class tree (their masks get ``label_<k>``)."""
    labels = Path(labels)
    if labels.suffix != ".json" or not labels.is_file():
        return {}
    try:
        return _label_names(json.loads(labels.read_text()))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{labels}: not valid JSON ({err})") from err


def _cases_from_dataset_json(path: Path) -> list[Case]:
    """MSD / nnU-Net v2 ``dataset.json``: images and masks of ``training``; the class of each case is its
    ``class`` entry when given, else the mask's foreground label with most voxels (``labels`` names it)."""
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from err
    names = _label_names(meta)
    entries = meta.get("training")
    if not entries and (path.parent / "imagesTr").is_dir():  # nnU-Net v2 lists no files
        ending = meta.get("file_ending", ".nii.gz")
        entries = [
            {"image": str(p.relative_to(path.parent)), "label": f"labelsTr/{p.name[: -len('_0000' + ending)]}{ending}"}
            for p in sorted((path.parent / "imagesTr").glob(f"*_0000{ending}"))
        ]
    if not entries:
        raise DatasetError(f"{path}: no 'training' entries and no imagesTr/ folder; nothing to prepare")
    cases, listed = [], {}
    for i, entry in enumerate(entries):
        image = str(entry.get("image", "")).removeprefix("./")
        mask = str(entry.get("label", "") or "").removeprefix("./")
        where = f"{path}: training[{i}]"
        if not image or not (path.parent / image).exists():
            raise DatasetError(f"{where}: image {image!r} not found (paths are relative to dataset.json)")
        _refuse_repeat(listed, image, f"training[{i}]", where)
        if mask and not (path.parent / mask).exists():
            raise DatasetError(f"{where}: label {mask!r} not found (paths are relative to dataset.json)")
        label = entry.get("class") or (_mask_class(path.parent / mask, names) if mask else "")
        if not label:
            raise DatasetError(f"{where}: no 'class' and no label mask; medaug needs a class per image")
        case_id = Path(image).name.split(".")[0].removesuffix("_0000")
        cases.append(
            Case(image, str(entry.get("patient_id", case_id)), str(label), entry.get("split", ""), mask, where)
        )
    return cases


def read_cases(labels: str | Path) -> list[Case]:
    """The labelled inputs of a labels CSV, a folder-per-class root or an MSD/nnU-Net ``dataset.json``."""
    labels = Path(labels)
    if labels.is_dir():
        return _cases_from_folders(labels)
    if labels.suffix == ".json":
        if not labels.is_file():
            raise DatasetError(f"{labels}: dataset.json not found")
        return _cases_from_dataset_json(labels)
    return [
        Case(r["path"], r["patient_id"], r["label"], r.get("split", ""), r.get("mask", ""), f"{labels}:{i}")
        for i, r in enumerate(read_labels(labels), start=2)
    ]


def split_patients(patient_labels: dict[str, str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Assign each patient to train/val/test, stratified by the patient's class, seeded.

    Every class with at least as many patients as non-empty splits puts at least one
    patient in each. Returns ``{patient: split}``.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise DatasetError(f"split fractions must be 3 non-negative numbers summing to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = defaultdict(list)
    for patient, label in sorted(patient_labels.items()):
        by_class[label].append(patient)
    assignment = {}
    for label in sorted(by_class):
        patients = list(rng.permutation(by_class[label]))
        n = len(patients)
        counts = [int(round(f * n)) for f in fractions]
        for i, f in enumerate(fractions):  # at least one per non-empty split when possible
            if f > 0 and counts[i] == 0 and n >= sum(1 for g in fractions if g > 0):
                counts[i] = 1
        while sum(counts) > n:
            counts[int(np.argmax(counts))] -= 1
        counts[0] += n - sum(counts)
        start = 0
        for split, count in zip(SPLITS, counts):
            for patient in patients[start : start + count]:
                assignment[patient] = split
            start += count
    return assignment
