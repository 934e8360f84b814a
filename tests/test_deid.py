"""The de-identification gate: every planted PS3.15 attribute is reported; strip leaves no value anywhere."""

import csv
import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from medaug.dataset import prepare_dataset
from medaug.deid import ALLOWED_META, PHIError, allowed_meta, apply_policy, scan_header
from medaug.io import write_dicom_series
from pipelines import prepare

from .conftest import WINDOW, compose_cfg

# Distinctive values, one per kind of attribute of the basic profile.
PLANTED = {
    "PatientName": "DOE^JANE^QX", "PatientID": "MRN-778899", "OtherPatientIDs": "ALT-554433",
    "PatientBirthDate": "19311231", "PatientAddress": "12 Qwerty Lane Zzyzx", "PatientTelephoneNumbers": "555-0199-77",
    "PatientAge": "083Y", "InstitutionName": "St Qwertyuiop Hospital", "InstitutionAddress": "1 Asdfgh Road",
    "ReferringPhysicianName": "HOUSE^GREGORYQ", "PerformingPhysicianName": "WILSON^JAMESQ",
    "OperatorsName": "CUDDY^LISAQ", "AccessionNumber": "ACC99887766", "StudyID": "STUDY5544",
    "StudyDate": "20190417", "SeriesDate": "20190418", "AcquisitionDate": "20190419", "ContentDate": "20190420",
    "StudyTime": "101530.123", "StationName": "CTSTATION-QZ", "DeviceSerialNumber": "SN-QZ-4242",
    "StudyDescription": "CT chest for Jane Qx",
}
PRIVATE_VALUE = "Secret Ward Q7"


def write_case(folder: Path, seed: int, burned_in: bool = True, extra: dict | None = None) -> None:
    hu = np.random.default_rng(seed).integers(-1000, 400, size=(6, 6, 3)).astype(np.float32)
    header = {**PLANTED, "PatientIdentityRemoved": "NO", **(extra or {})}
    if burned_in:
        header["BurnedInAnnotation"] = "YES"
    for f in write_dicom_series(folder, hu, np.eye(4), header):
        ds = pydicom.dcmread(f)
        ds.private_block(0x0011, "ACME HOSP", create=True).add_new(0x01, "LO", PRIVATE_VALUE)
        ds.save_as(f)


def phi_corpus(root: Path, burned_in: bool = True) -> Path:
    """Four patients (two per class) with two series each, every attribute planted in every file."""
    rows = []
    for i, label in enumerate(["a", "a", "b", "b", "a", "a", "b", "b"]):
        write_case(root / f"case{i}", i, burned_in)
        rows.append({"path": f"case{i}", "patient_id": f"MRN-77889{i // 2}", "label": label})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "patient_id", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


def test_refuse_reports_every_planted_tag_and_writes_nothing(tmp_path):
    labels = phi_corpus(tmp_path / "raw")
    with pytest.raises(PHIError) as err:
        prepare_dataset(labels, tmp_path / "p", WINDOW, spatial_size=[6, 6, -1], spatial_dims=2)
    report = str(err.value)
    assert report.startswith("de-identification gate (refuse): ")
    for keyword in [*PLANTED, "BurnedInAnnotation", "PatientIdentityRemoved"]:
        assert f") {keyword}: " in report, keyword
    assert "(0011,0010) private" in report and "(0011,1001) private" in report
    assert str(tmp_path / "raw" / "case0" / "slice_0000.dcm") in report    # which file
    assert "prepare.deid=strip" in report                                      # the fix
    assert not any(v in report for v in [*PLANTED.values(), PRIVATE_VALUE])   # never the values
    assert list(tmp_path.iterdir()) == [tmp_path / "raw"]                     # nothing half-written


def test_declared_deidentification_lets_pseudonymous_ids_pass():
    ds = Dataset()
    ds.PatientID, ds.PatientName = "phantom0001", "PHANTOM"
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "tool X, basic profile"
    assert scan_header(Path("f"), ds) == []
    ds.PatientBirthDate = "19500101"                # a tool that left a birth date in is still caught
    assert [f.tag for f in scan_header(Path("f"), ds)] == ["(0010,0030) PatientBirthDate"]
    del ds.DeidentificationMethod                   # YES without saying how: ids are not trusted
    tags = {f.tag.split()[1] for f in scan_header(Path("f"), ds)}
    assert {"PatientID", "PatientName", "DeidentificationMethod"} <= tags


def test_strip_refuses_burned_in_annotation_only(tmp_path):
    labels = phi_corpus(tmp_path / "raw", burned_in=True)
    with pytest.raises(PHIError, match=r"gate \(strip\).*burned into the pixels") as err:
        prepare_dataset(labels, tmp_path / "p", WINDOW, spatial_size=[6, 6, -1], spatial_dims=2, deid="strip")
    assert "PatientName" not in str(err.value)


def _all_bytes(folder: Path) -> bytes:
    """Every file under ``folder``, gzip members decompressed (NIfTI items, MLflow artifacts)."""
    out = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        out.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
        out.append(str(f.relative_to(folder)).encode())
    return b"\n".join(out)


@pytest.mark.slow  # creating the MLflow sqlite store takes ~10 s
def test_strip_leaves_no_planted_value_in_outputs_or_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    labels = phi_corpus(tmp_path / "raw", burned_in=False)
    out = tmp_path / "job"
    cfg = compose_cfg("prepare", out, ["data=labels", f"data.labels={labels}", "data.image_size=[6,6]",
                                        "data.split=[0.5,0.5,0]", "tracking=mlflow", "prepare.deid=strip"])
    result = prepare.run(cfg)
    assert result["data/patients"] == 4 and result["data/series"] == 8
    prepared = out / "prepared"
    assert (out / "mlflow.db").is_file() and (prepared / "DONE").is_file()
    blob = _all_bytes(out)
    for value in [*PLANTED.values(), PRIVATE_VALUE, "MRN-77889"]:
        assert value.encode() not in blob, value
    log = list(csv.DictReader(open(prepared / "deid_log.csv")))
    assert {r["tag"].split()[1] for r in log} >= set(PLANTED) | {"private", "PatientIdentityRemoved"}
    assert all(r["file"].startswith("file_") and r["action"] == "not read, not copied" for r in log)
    meta = json.loads((prepared / "dataset.json").read_text())
    assert meta["deid"]["policy"] == "strip" and meta["deid"]["files"] == 24
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medaug-default-prepare").experiment_id])
    assert run.info.run_name == "default-prepare" and run.data.tags["deid.policy"] == "strip"
    assert run.data.metrics["data/patients"] == 4 and run.data.metrics["data/source_slices"] == 24
    assert run.data.params["data.labels"] == "<path>"


def test_trust_is_explicit_warned_and_recorded(tmp_path, caplog):
    labels = phi_corpus(tmp_path / "raw", burned_in=True)
    with caplog.at_level(logging.WARNING, logger="medaug"):
        info = prepare_dataset(labels, tmp_path / "p", WINDOW, spatial_size=[6, 6, -1], spatial_dims=2,
                               split_fractions=(0.5, 0.5, 0), deid="trust")
    warned = [r.getMessage() for r in caplog.records if "'trust'" in r.getMessage()]
    assert len(warned) == 1 and f"{info.deid['findings']} header findings" in warned[0]
    assert info.deid["policy"] == "trust" and info.deid["findings"] > 0
    assert (tmp_path / "p" / "deid_log.csv").is_file()
    with pytest.raises(ValueError, match="prepare.deid='maybe'"):
        apply_policy([], "maybe")


def test_only_allow_listed_basics_leave_a_header():
    ds = Dataset()
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.Modality, ds.KVP, ds.SliceThickness = "CT", "120", "2.5"
    meta = allowed_meta(ds)
    assert meta == {"modality": "CT", "kvp": 120.0, "slice_thickness_mm": 2.5}
    assert set(meta) <= set(ALLOWED_META.values())
