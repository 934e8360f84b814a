"""The de-identification gate: scan DICOM headers for protected health information.

``prepare`` calls :func:`scan_headers` on the header of every DICOM file it is about to
read (pixel data is not touched yet) and applies :func:`apply_policy`:

* ``refuse`` (default): stop with a one-line :class:`PHIError` (counts and tag names) that
  names a report file listing, per file, each offending tag and why (never the value); the
  report is written beside the job's folders, never into a prepared, exported or tracked one;
* ``strip``: keep going; the offending attributes are simply never read, and a
  de-identification log (file pseudonym, tag, why, action, no values) goes into the
  prepared folder;
* ``trust``: explicit opt-in; the findings are not checked, a warning is logged and the
  choice is recorded in ``dataset.json`` so the data card can say so.

What is checked (DICOM PS3.15 Annex E basic profile, the attributes that identify a
person or a visit): names, IDs, birth date, addresses and phone numbers, institution and
station, physician and operator names, accession number and study ID, the study /
series / acquisition / content dates and times, free-text descriptions and comments,
every private tag, overlays (60xx bitmaps, labels and comments can hold text),
``BurnedInAnnotation`` (text in the pixels: only ``trust`` lets it through, since stripping
headers cannot remove it) and ``PatientIdentityRemoved``; at every depth of nested sequences.

Pseudonymous IDs: a header that declares ``PatientIdentityRemoved = YES`` together with a
``DeidentificationMethod`` (or its code sequence) was produced by a de-identification
tool; its top-level ``PatientID`` and ``PatientName`` are then taken to be the pseudonyms the
profile allows (action Z, "replace with a dummy value") and are not findings. Every other
attribute above is still a finding, so a tool that left a birth date in is still caught.
Patient IDs are used only to split by patient and are replaced by ``patient_0001``... in
every output.

Whatever the policy, only the allow-listed acquisition basics of :data:`ALLOWED_META`
(modality, kVp, field strength, TR/TE, slice thickness) are ever copied out of a header;
geometry (orientation, position, spacing) is read to build the affine.

Example::

    findings = scan_headers({Path("ct/1.dcm"): pydicom.dcmread("ct/1.dcm", stop_before_pixels=True)})
    log_rows = apply_policy(findings, "refuse", "deid_report.csv")   # PHIError; findings in the report
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

from .atomic import atomic_file

POLICIES = ("refuse", "strip", "trust")
DECLARED_PSEUDONYMS = ("PatientID", "PatientName")

_NAMES = "a person's name"
_IDS = "an identifier of the patient or the visit"
_DATES = "a date or time of the visit (basic profile: remove or shift)"
_PLACE = "the place of care or acquisition"
_TEXT = "free text that may name the patient"

#: Keyword → why it identifies someone (PS3.15 Annex E basic profile, non-UID attributes).
PHI_ATTRIBUTES: dict[str, str] = {
    "PatientName": _NAMES,
    "OtherPatientNames": _NAMES,
    "PatientBirthName": _NAMES,
    "PatientMotherBirthName": _NAMES,
    "ReferringPhysicianName": _NAMES,
    "PerformingPhysicianName": _NAMES,
    "NameOfPhysiciansReadingStudy": _NAMES,
    "PhysiciansOfRecord": _NAMES,
    "RequestingPhysician": _NAMES,
    "OperatorsName": _NAMES,
    "ScheduledPerformingPhysicianName": _NAMES,
    "ResponsiblePerson": _NAMES,
    "PatientID": _IDS,
    "OtherPatientIDs": _IDS,
    "OtherPatientIDsSequence": _IDS,
    "IssuerOfPatientID": _IDS,
    "MedicalRecordLocator": _IDS,
    "AccessionNumber": _IDS,
    "StudyID": _IDS,
    "PatientInsurancePlanCodeSequence": _IDS,
    "MilitaryRank": _IDS,
    "PerformedProcedureStepID": _IDS,
    "RequestedProcedureID": _IDS,
    "AdmissionID": _IDS,
    "DeviceSerialNumber": _IDS,
    "PatientBirthDate": "the patient's birth date",
    "PatientBirthTime": "the patient's birth time",
    "PatientAge": "the patient's age (basic profile: remove)",
    "PatientAddress": "the patient's address",
    "PatientTelephoneNumbers": "the patient's phone number",
    "RegionOfResidence": "the patient's address",
    "CountryOfResidence": "the patient's address",
    "ReferringPhysicianAddress": "a physician's address",
    "ReferringPhysicianTelephoneNumbers": "a physician's phone number",
    "InstitutionName": _PLACE,
    "InstitutionAddress": _PLACE,
    "InstitutionalDepartmentName": _PLACE,
    "InstitutionCodeSequence": _PLACE,
    "StationName": _PLACE,
    "StudyDate": _DATES,
    "SeriesDate": _DATES,
    "AcquisitionDate": _DATES,
    "ContentDate": _DATES,
    "OverlayDate": _DATES,
    "CurveDate": _DATES,
    "AcquisitionDateTime": _DATES,
    "StudyTime": _DATES,
    "SeriesTime": _DATES,
    "AcquisitionTime": _DATES,
    "ContentTime": _DATES,
    "InstanceCreationDate": _DATES,
    "PerformedProcedureStepStartDate": _DATES,
    "PerformedProcedureStepStartTime": _DATES,
    "StudyDescription": _TEXT,
    "SeriesDescription": _TEXT,
    "ImageComments": _TEXT,
    "PatientComments": _TEXT,
    "AdditionalPatientHistory": _TEXT,
    "RequestAttributesSequence": _TEXT,
    "PerformedProcedureStepDescription": _TEXT,
    "AdmittingDiagnosesDescription": _TEXT,
    "Occupation": _TEXT,
    "ProtocolName": _TEXT,
    # Overlays (60xx): a bitmap can hold burned-in text, and their labels and comments free text.
    "OverlayData": "overlay bitmap (may hold burned-in text; basic profile: remove)",
    "OverlayComments": _TEXT,
    "OverlayLabel": _TEXT,
    "OverlayDescription": _TEXT,
}

#: Header fields that may leave a header (into ``Volume.meta``): keyword → meta key.
ALLOWED_META: dict[str, str] = {
    "Modality": "modality",
    "KVP": "kvp",
    "MagneticFieldStrength": "field_strength_t",
    "RepetitionTime": "tr_ms",
    "EchoTime": "te_ms",
    "SliceThickness": "slice_thickness_mm",
}


class PHIError(ValueError):
    """A DICOM header holds identifying data and the policy is ``refuse``."""


@dataclass(frozen=True)
class Finding:
    """One offending attribute of one file: where, which tag, why; never its value."""

    file: Path
    tag: str  # "(0010,0010) PatientName"
    reason: str


def _keyword(elem) -> str:
    """The element's keyword; repeating groups (overlays, 60xx) are looked up by their masked tag."""
    return elem.keyword or keyword_for_tag(elem.tag) or ""


def _tag_name(elem) -> str:
    return f"({elem.tag.group:04X},{elem.tag.element:04X}) {_keyword(elem) or 'private'}"


def _elements(ds: Dataset, depth: int = 0) -> Iterator[tuple[int, object]]:
    """Every element of ``ds`` with its depth (0: top level), sequence items included at any depth."""
    for elem in ds:
        yield depth, elem
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from _elements(item, depth + 1)


def _declares_deidentified(ds: Dataset) -> bool:
    method = ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence")
    return str(ds.get("PatientIdentityRemoved", "")).strip().upper() == "YES" and bool(method)


def scan_header(path: Path, ds: Dataset) -> list[Finding]:
    """The findings of one header (read with ``stop_before_pixels=True``), at every depth; values are not kept.

    Only the top-level ``PatientID``/``PatientName`` of a header that declares itself de-identified
    are taken as pseudonyms: the same attributes inside a sequence are findings like any other.
    """
    found = []
    declared = _declares_deidentified(ds)
    for depth, elem in _elements(ds):
        if elem.tag.is_private:
            found.append(Finding(path, _tag_name(elem), "private tag (may hold anything; basic profile: remove)"))
            continue
        keyword = _keyword(elem)
        reason = PHI_ATTRIBUTES.get(keyword)
        if reason is None or elem.value in (None, "", b"") or (elem.VR == "SQ" and len(elem.value) == 0):
            continue
        if declared and depth == 0 and keyword in DECLARED_PSEUDONYMS:
            continue  # a de-identification tool declared these to be pseudonyms
        found.append(Finding(path, _tag_name(elem), reason))
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        found.append(
            Finding(
                path,
                "(0028,0301) BurnedInAnnotation",
                "text burned into the pixels; stripping headers cannot remove it",
            )
        )
    removed = str(ds.get("PatientIdentityRemoved", "")).strip().upper()
    if removed != "YES":
        found.append(
            Finding(
                path,
                "(0012,0062) PatientIdentityRemoved",
                f"is {removed or 'absent'}: the file does not declare that identity was removed",
            )
        )
    elif not declared:
        found.append(
            Finding(path, "(0012,0063) DeidentificationMethod", "absent: PatientIdentityRemoved=YES without saying how")
        )
    return found


def scan_headers(headers: Mapping[Path, Dataset]) -> list[Finding]:
    """Findings of every header, in file order."""
    return [f for path in sorted(headers) for f in scan_header(path, headers[path])]


def write_report(findings: list[Finding], path: Path) -> Path:
    """The refusal report: a CSV of file, tag, why (never a value), readable by its owner only.

    It names source files, so it is written where the data owner runs, never into a prepared,
    exported or tracked folder; written to a temp name, then renamed.
    """
    path = Path(path)
    with atomic_file(path, mode=0o600) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "tag", "reason"])
        writer.writerows([str(f.file), f.tag, f.reason] for f in findings)
    return path


def summarise(findings: list[Finding]) -> str:
    """One line: how many findings in how many files, and every tag involved (names only, in tag order)."""
    tags = sorted({f.tag for f in findings})
    files = len({f.file for f in findings})
    return (
        f"{len(findings)} findings in {files} DICOM file{'s' * (files != 1)} "
        f"(tags: {', '.join(dict.fromkeys(t.split(') ', 1)[-1] for t in tags))})"
    )


def file_pseudonym(path: Path) -> str:
    """A stable short name for a source file that does not reveal its path (which may name a patient)."""
    return "file_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]


def apply_policy(findings: list[Finding], policy: str, report_path: str | Path | None = None) -> list[dict]:
    """Apply ``policy`` to ``findings``; return the de-identification log rows (no values, no paths).

    ``refuse`` raises :class:`PHIError` if there is any finding; ``strip`` refuses only
    burned-in annotation; ``trust`` lets everything through (the caller says so, see ``prepare_dataset``).
    The error is one line (counts and tag names); with ``report_path`` every blocking finding
    (file, tag, why) is written there first (:func:`write_report`) and the line names it.
    """
    if policy not in POLICIES:
        raise ValueError(f"prepare.deid={policy!r}; choose one of {', '.join(POLICIES)}")
    if policy == "trust":
        return [dict(file=file_pseudonym(f.file), tag=f.tag, reason=f.reason, action="trusted") for f in findings]
    blocking = findings if policy == "refuse" else [f for f in findings if "BurnedInAnnotation" in f.tag]
    if blocking:
        fix = (
            "de-identify the files (PS3.15 basic profile), or set prepare.deid=strip to drop these "
            "attributes and keep going, or prepare.deid=trust if you know the data is de-identified"
            if policy == "refuse"
            else "text burned into the pixels cannot be stripped; remove these files or set prepare.deid=trust"
        )
        where = f"; each file, tag and why (no values) in {write_report(blocking, report_path)}" if report_path else ""
        raise PHIError(f"de-identification gate ({policy}): {summarise(blocking)}{where}; {fix}")
    return [
        dict(file=file_pseudonym(f.file), tag=f.tag, reason=f.reason, action="not read, not copied") for f in findings
    ]


def allowed_meta(ds: Dataset) -> dict:
    """The allow-listed acquisition basics of a header, as plain strings/floats."""
    meta = {}
    for keyword, key in ALLOWED_META.items():
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        try:
            meta[key] = float(value) if keyword != "Modality" else str(value)
        except (TypeError, ValueError):
            continue
    meta.setdefault("modality", "unknown")
    return meta
