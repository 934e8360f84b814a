"""The de-identification gate: scan DICOM headers for protected health information.

``prepare`` calls :func:`scan_headers` on the header of every DICOM file it is about to
read (pixel data is not touched yet) and applies :func:`apply_policy`:

* ``refuse`` (default): stop with a :class:`PHIError` whose report lists, per file, each
  offending tag and why (never the value);
* ``strip``: keep going; the offending attributes are simply never read, and a
  de-identification log (file pseudonym, tag, why, action, no values) goes into the
  prepared folder;
* ``trust``: explicit opt-in; the findings are not checked, a warning is logged and the
  choice is recorded in ``dataset.json`` so the data card can say so.

What is checked (DICOM PS3.15 Annex E basic profile, the attributes that identify a
person or a visit): names, IDs, birth date, addresses and phone numbers, institution and
station, physician and operator names, accession number and study ID, the study /
series / acquisition / content dates and times, free-text descriptions and comments,
every private tag, ``BurnedInAnnotation`` (text in the pixels: only ``trust`` lets it
through, since stripping headers cannot remove it) and ``PatientIdentityRemoved``.

Pseudonymous IDs: a header that declares ``PatientIdentityRemoved = YES`` together with a
``DeidentificationMethod`` (or its code sequence) was produced by a de-identification
tool; its ``PatientID`` and ``PatientName`` are then taken to be the pseudonyms the
profile allows (action Z, "replace with a dummy value") and are not findings. Every other
attribute above is still a finding, so a tool that left a birth date in is still caught.
Patient IDs are used only to split by patient and are replaced by ``patient_0001``... in
every output.

Whatever the policy, only the allow-listed acquisition basics of :data:`ALLOWED_META`
(modality, kVp, field strength, TR/TE, slice thickness) are ever copied out of a header;
geometry (orientation, position, spacing) is read to build the affine.

Example::

    findings = scan_headers({Path("ct/1.dcm"): pydicom.dcmread("ct/1.dcm", stop_before_pixels=True)})
    log_rows = apply_policy(findings, "refuse")   # raises PHIError listing every finding
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pydicom.dataset import Dataset

POLICIES = ("refuse", "strip", "trust")
DECLARED_PSEUDONYMS = ("PatientID", "PatientName")

_NAMES = "a person's name"
_IDS = "an identifier of the patient or the visit"
_DATES = "a date or time of the visit (basic profile: remove or shift)"
_PLACE = "the place of care or acquisition"
_TEXT = "free text that may name the patient"

#: Keyword → why it identifies someone (PS3.15 Annex E basic profile, non-UID attributes).
PHI_ATTRIBUTES: dict[str, str] = {
    "PatientName": _NAMES, "OtherPatientNames": _NAMES, "PatientBirthName": _NAMES,
    "PatientMotherBirthName": _NAMES, "ReferringPhysicianName": _NAMES,
    "PerformingPhysicianName": _NAMES, "NameOfPhysiciansReadingStudy": _NAMES,
    "PhysiciansOfRecord": _NAMES, "RequestingPhysician": _NAMES, "OperatorsName": _NAMES,
    "ScheduledPerformingPhysicianName": _NAMES, "ResponsiblePerson": _NAMES,
    "PatientID": _IDS, "OtherPatientIDs": _IDS, "OtherPatientIDsSequence": _IDS,
    "IssuerOfPatientID": _IDS, "MedicalRecordLocator": _IDS, "AccessionNumber": _IDS,
    "StudyID": _IDS, "PatientInsurancePlanCodeSequence": _IDS, "MilitaryRank": _IDS,
    "PerformedProcedureStepID": _IDS, "RequestedProcedureID": _IDS, "AdmissionID": _IDS,
    "DeviceSerialNumber": _IDS,
    "PatientBirthDate": "the patient's birth date", "PatientBirthTime": "the patient's birth time",
    "PatientAge": "the patient's age (basic profile: remove)",
    "PatientAddress": "the patient's address", "PatientTelephoneNumbers": "the patient's phone number",
    "RegionOfResidence": "the patient's address", "CountryOfResidence": "the patient's address",
    "ReferringPhysicianAddress": "a physician's address",
    "ReferringPhysicianTelephoneNumbers": "a physician's phone number",
    "InstitutionName": _PLACE, "InstitutionAddress": _PLACE, "InstitutionalDepartmentName": _PLACE,
    "InstitutionCodeSequence": _PLACE, "StationName": _PLACE,
    "StudyDate": _DATES, "SeriesDate": _DATES, "AcquisitionDate": _DATES, "ContentDate": _DATES,
    "OverlayDate": _DATES, "CurveDate": _DATES, "AcquisitionDateTime": _DATES, "StudyTime": _DATES,
    "SeriesTime": _DATES, "AcquisitionTime": _DATES, "ContentTime": _DATES, "InstanceCreationDate": _DATES,
    "PerformedProcedureStepStartDate": _DATES, "PerformedProcedureStepStartTime": _DATES,
    "StudyDescription": _TEXT, "SeriesDescription": _TEXT, "ImageComments": _TEXT,
    "PatientComments": _TEXT, "AdditionalPatientHistory": _TEXT, "RequestAttributesSequence": _TEXT,
    "PerformedProcedureStepDescription": _TEXT, "AdmittingDiagnosesDescription": _TEXT,
    "Occupation": _TEXT, "ProtocolName": _TEXT,
}

#: Header fields that may leave a header (into ``Volume.meta``): keyword → meta key.
ALLOWED_META: dict[str, str] = {
    "Modality": "modality", "KVP": "kvp", "MagneticFieldStrength": "field_strength_t",
    "RepetitionTime": "tr_ms", "EchoTime": "te_ms", "SliceThickness": "slice_thickness_mm",
}


class PHIError(ValueError):
    """A DICOM header holds identifying data and the policy is ``refuse``."""


@dataclass(frozen=True)
class Finding:
    """One offending attribute of one file: where, which tag, why; never its value."""

    file: Path
    tag: str       # "(0010,0010) PatientName"
    reason: str


def _tag_name(elem) -> str:
    return f"({elem.tag.group:04X},{elem.tag.element:04X}) {elem.keyword or 'private'}"


def _declares_deidentified(ds: Dataset) -> bool:
    method = ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence")
    return str(ds.get("PatientIdentityRemoved", "")).strip().upper() == "YES" and bool(method)


def scan_header(path: Path, ds: Dataset) -> list[Finding]:
    """The findings of one header (read with ``stop_before_pixels=True``); values are not kept."""
    found = []
    declared = _declares_deidentified(ds)
    for elem in ds.iterall():
        if elem.tag.is_private:
            found.append(Finding(path, _tag_name(elem), "private tag (may hold anything; basic profile: remove)"))
            continue
        reason = PHI_ATTRIBUTES.get(elem.keyword)
        if reason is None or elem.value in (None, "", b"") or (elem.VR == "SQ" and len(elem.value) == 0):
            continue
        if declared and elem.keyword in DECLARED_PSEUDONYMS:
            continue  # a de-identification tool declared these to be pseudonyms
        found.append(Finding(path, _tag_name(elem), reason))
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        found.append(Finding(path, "(0028,0301) BurnedInAnnotation",
                             "text burned into the pixels; stripping headers cannot remove it"))
    removed = str(ds.get("PatientIdentityRemoved", "")).strip().upper()
    if removed != "YES":
        found.append(Finding(path, "(0012,0062) PatientIdentityRemoved",
                             f"is {removed or 'absent'}: the file does not declare that identity was removed"))
    elif not declared:
        found.append(Finding(path, "(0012,0063) DeidentificationMethod",
                             "absent: PatientIdentityRemoved=YES without saying how"))
    return found


def scan_headers(headers: Mapping[Path, Dataset]) -> list[Finding]:
    """Findings of every header, in file order."""
    return [f for path in sorted(headers) for f in scan_header(path, headers[path])]


def format_report(findings: list[Finding], limit: int = 200) -> str:
    """A multi-line report: one line per finding, ``file: tag: why``, grouped by file."""
    lines = [f"  {f.file}: {f.tag}: {f.reason}" for f in findings[:limit]]
    if len(findings) > limit:
        lines.append(f"  ... and {len(findings) - limit} more")
    return "\n".join(lines)


def file_pseudonym(path: Path) -> str:
    """A stable short name for a source file that does not reveal its path (which may name a patient)."""
    return "file_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]


def apply_policy(findings: list[Finding], policy: str) -> list[dict]:
    """Apply ``policy`` to ``findings``; return the de-identification log rows (no values, no paths).

    ``refuse`` raises :class:`PHIError` if there is any finding; ``strip`` refuses only
    burned-in annotation; ``trust`` lets everything through (the caller says so, see ``prepare_dataset``).
    """
    if policy not in POLICIES:
        raise ValueError(f"prepare.deid={policy!r}; choose one of {', '.join(POLICIES)}")
    if policy == "trust":
        return [dict(file=file_pseudonym(f.file), tag=f.tag, reason=f.reason, action="trusted") for f in findings]
    blocking = findings if policy == "refuse" else [f for f in findings if "BurnedInAnnotation" in f.tag]
    if blocking:
        files = len({f.file for f in blocking})
        fix = ("de-identify the files (PS3.15 basic profile), or set prepare.deid=strip to drop these "
               "attributes and keep going, or prepare.deid=trust if you know the data is de-identified"
               if policy == "refuse" else
               "text burned into the pixels cannot be stripped; remove these files or set prepare.deid=trust")
        raise PHIError(f"de-identification gate ({policy}): {len(blocking)} findings in {files} DICOM files; "
                       f"{fix}:\n{format_report(blocking)}")
    return [dict(file=file_pseudonym(f.file), tag=f.tag, reason=f.reason, action="not read, not copied")
            for f in findings]


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
