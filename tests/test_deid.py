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

from medaug.data import DatasetError, prepare_dataset
from medaug.deid import ALLOWED_META, PHIError, allowed_meta, apply_policy, scan_header
from medaug.io import write_dicom_series
from pipelines import prepare

from .conftest import CONF_DIR, WINDOW, compose_cfg
from .test_pipelines import _cli

REPO = CONF_DIR.parent

# Distinctive values, one per kind of attribute of the basic profile.
PLANTED = {
    "PatientName": "DOE^JANE^QX",
    "PatientID": "MRN-778899",
    "OtherPatientIDs": "ALT-554433",
    "PatientBirthDate": "19311231",
    "PatientAddress": "12 Qwerty Lane Zzyzx",
    "PatientTelephoneNumbers": "555-0199-77",
    "PatientAge": "083Y",
    "InstitutionName": "St Qwertyuiop Hospital",
    "InstitutionAddress": "1 Asdfgh Road",
    "ReferringPhysicianName": "HOUSE^GREGORYQ",
    "PerformingPhysicianName": "WILSON^JAMESQ",
    "OperatorsName": "CUDDY^LISAQ",
    "AccessionNumber": "ACC99887766",
    "StudyID": "STUDY5544",
    "StudyDate": "20190417",
    "SeriesDate": "20190418",
    "AcquisitionDate": "20190419",
    "ContentDate": "20190420",
    "StudyTime": "101530.123",
    "StationName": "CTSTATION-QZ",
    "DeviceSerialNumber": "SN-QZ-4242",
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


def test_refuse_is_one_line_and_the_report_file_lists_every_planted_tag(tmp_path):
    labels = phi_corpus(tmp_path / "raw")
    with pytest.raises(PHIError) as err:
        prepare_dataset(labels, tmp_path / "p", WINDOW, spatial_size=[6, 6, -1], spatial_dims=2)
    message = str(err.value)
    assert message.startswith("de-identification gate (refuse): ") and "\n" not in message
    assert "findings in 24 DICOM files" in message and "PatientName" in message  # counts and tag names
    report_file = tmp_path / "deid_report.csv"  # beside the job's folders
    assert str(report_file) in message and "prepare.deid=strip" in message  # where to look, the fix
    assert report_file.stat().st_mode & 0o077 == 0  # its owner's only
    rows = list(csv.DictReader(open(report_file)))
    assert len(rows) == int(message.split(": ", 1)[1].split()[0])
    tags = {r["tag"].split(") ", 1)[1] for r in rows}
    assert tags >= {*PLANTED, "BurnedInAnnotation", "PatientIdentityRemoved", "private"}
    assert str(tmp_path / "raw" / "case0" / "slice_0000.dcm") in {r["file"] for r in rows}  # which file
    for text in (message, report_file.read_text()):
        assert not any(v in text for v in [*PLANTED.values(), PRIVATE_VALUE])  # never the values
    assert sorted(tmp_path.iterdir()) == [report_file, tmp_path / "raw"]  # nothing half-written


def test_a_passing_prepare_removes_an_earlier_refusal_report(tmp_path):
    labels = phi_corpus(tmp_path / "raw", burned_in=False)
    with pytest.raises(PHIError):
        prepare_dataset(labels, tmp_path / "p", WINDOW, spatial_size=[6, 6, -1], spatial_dims=2)
    assert (tmp_path / "deid_report.csv").is_file()
    prepare_dataset(
        labels,
        tmp_path / "p",
        WINDOW,
        spatial_size=[6, 6, -1],
        spatial_dims=2,
        split_fractions=(0.5, 0.5, 0),
        deid="strip",
    )
    assert not (tmp_path / "deid_report.csv").exists()


def test_refusal_from_the_cli_is_one_line_and_mlflow_gets_nothing(tmp_path):
    labels = phi_corpus(tmp_path / "raw")
    out = tmp_path / "job"
    r = _cli(
        [
            "pipelines.prepare",
            "data=labels",
            f"data.labels={labels}",
            "data.image_size=[6,6]",
            "tracking=mlflow",
            f"paths.output_dir={out}",
        ],
        REPO,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "medaug prepare: error" in line]
    assert len(errors) == 1 and errors[0].startswith("medaug prepare: error: de-identification gate (refuse)")
    assert r.stderr.strip().splitlines()[-1] == errors[0] and str(out / "deid_report.csv") in errors[0]
    assert not any(v in r.stderr + r.stdout for v in [*PLANTED.values(), PRIVATE_VALUE])
    assert sorted(p.name for p in out.iterdir() if p.name != "hydra") == ["deid_report.csv"]  # no store, no data


def _declared_header(patient: str) -> dict:
    return {
        "PatientID": patient,
        "PatientName": patient,
        "PatientIdentityRemoved": "YES",
        "DeidentificationMethod": "test corpus",
    }


def _series(folder: Path, header: dict, uid: str, seed: int = 0) -> None:
    hu = np.random.default_rng(seed).integers(-1000, 400, size=(6, 6, 3)).astype(np.float32)
    write_dicom_series(folder, hu, np.eye(4), {**header, "SeriesInstanceUID": uid})


@pytest.mark.parametrize("phi_first", [True, False], ids=["phi-first", "clean-first"])
def test_a_phi_folder_and_a_declared_clean_copy_with_one_series_uid_are_refused(tmp_path, phi_first):
    raw = tmp_path / "raw"
    uid = "1.2.826.0.1.3680043.8.498.1"
    _series(raw / "phi", {**PLANTED, "PatientIdentityRemoved": "NO"}, uid)
    _series(raw / "clean", _declared_header("anon1"), uid)
    _series(raw / "other", _declared_header("anon2"), "1.2.826.0.1.3680043.8.498.2", seed=1)
    order = ["phi", "clean"] if phi_first else ["clean", "phi"]
    rows = [
        {"path": order[0], "patient_id": "p1", "label": "a"},
        {"path": order[1], "patient_id": "p1", "label": "a"},
        {"path": "other", "patient_id": "p2", "label": "b"},
    ]
    labels = _csv(raw / "labels.csv", rows)
    with pytest.raises(DatasetError, match=rf"labels.csv:3: DICOM series {uid} is also reached by row 2"):
        prepare_dataset(
            labels, tmp_path / "p", WINDOW, spatial_size=[6, 6, -1], spatial_dims=2, split_fractions=(0.5, 0.5, 0)
        )
    assert not (tmp_path / "p").exists()


def test_every_file_read_passes_the_gate_not_one_header_set_per_series_uid(tmp_path, monkeypatch):
    """The gate sees the headers of each entry's own files: with the duplicate check out of the way, a PHI
    folder listed before a declared-clean copy of its SeriesInstanceUID is still refused."""
    from medaug.data import prepare as dataset

    raw = tmp_path / "raw"
    uid = "1.2.826.0.1.3680043.8.498.1"
    _series(raw / "phi", {**PLANTED, "PatientIdentityRemoved": "NO"}, uid)
    _series(raw / "clean", _declared_header("anon1"), uid)
    labels = _csv(
        raw / "labels.csv",
        [{"path": "phi", "patient_id": "p1", "label": "a"}, {"path": "clean", "patient_id": "p2", "label": "b"}],
    )
    monkeypatch.setattr(dataset, "_refuse_shared_dicom", lambda items: None, raising=False)  # the gate alone
    with pytest.raises(PHIError, match="findings in 3 DICOM files"):
        prepare_dataset(labels, tmp_path / "p", WINDOW, spatial_size=[6, 6, -1], spatial_dims=2)


def test_one_series_under_two_patients_is_refused_naming_both_rows(tmp_path):
    raw = tmp_path / "raw"
    uid = "1.2.826.0.1.3680043.8.498.7"
    _series(raw / "s1", _declared_header("anon1"), uid)
    _series(raw / "s2", _declared_header("anon2"), "1.2.826.0.1.3680043.8.498.8", seed=1)
    labels = _csv(
        raw / "labels.csv",
        [
            {"path": uid, "patient_id": "p1", "label": "a"},  # by its UID
            {"path": "s2", "patient_id": "p2", "label": "b"},
            {"path": "s1", "patient_id": "p3", "label": "b"},
        ],
    )  # and by its folder
    with pytest.raises(DatasetError, match=rf"labels.csv:4: DICOM series {uid} is also reached by row 2"):
        prepare_dataset(labels, tmp_path / "p", WINDOW, spatial_size=[6, 6, -1], spatial_dims=2)


def test_copied_instances_under_a_new_series_uid_are_refused(tmp_path):
    raw = tmp_path / "raw"
    _series(raw / "s1", _declared_header("anon1"), "1.2.826.0.1.3680043.8.498.11")
    (raw / "s2").mkdir()
    for f in sorted((raw / "s1").iterdir()):  # the same files, relabelled as another series
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.12"
        ds.save_as(raw / "s2" / f.name)
    labels = _csv(
        raw / "labels.csv",
        [{"path": "s1", "patient_id": "p1", "label": "a"}, {"path": "s2", "patient_id": "p2", "label": "b"}],
    )
    with pytest.raises(
        DatasetError,
        match=r"labels.csv:3: DICOM instance .* \(a copy of one file\) is also reached "
        r"by row 2",
    ):
        prepare_dataset(labels, tmp_path / "p", WINDOW, spatial_size=[6, 6, -1], spatial_dims=2)


def test_a_dicom_mask_passes_the_gate_too(tmp_path):
    raw = tmp_path / "raw"
    rows = []
    for i, label in enumerate("aabb"):
        _series(raw / f"img{i}", _declared_header(f"anon{i}"), f"1.2.826.0.1.3680043.8.498.2{i}", seed=i)
        mask_header = _declared_header(f"anon{i}") if i else {**PLANTED, "PatientIdentityRemoved": "NO"}
        hu = np.zeros((6, 6, 3), np.float32)
        hu[2:4, 2:4] = 1
        write_dicom_series(
            raw / f"mask{i}", hu, np.eye(4), {**mask_header, "SeriesInstanceUID": f"1.2.826.0.1.3680043.8.498.3{i}"}
        )
        rows.append({"path": f"img{i}", "patient_id": f"p{i}", "label": label, "mask": f"mask{i}"})
    labels = _csv(raw / "labels.csv", rows)
    with pytest.raises(PHIError, match="findings in 3 DICOM files"):
        prepare_dataset(labels, tmp_path / "p", WINDOW, spatial_size=[6, 6, -1], spatial_dims=2)
    rows = list(csv.DictReader(open(tmp_path / "deid_report.csv")))
    assert {Path(r["file"]).parent.name for r in rows} == {"mask0"}


def test_nested_phi_in_a_declared_clean_file_is_found():
    ds = Dataset()
    ds.PatientID, ds.PatientName = "anon0001", "ANON"
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "tool X, basic profile"
    inner, outer = Dataset(), Dataset()
    inner.PatientName, inner.PatientID = "DOE^JANE^QX", "MRN-778899"
    outer.ReferencedPatientSequence = [inner]
    ds.ReferencedImageSequence = [outer]  # two sequences deep
    tags = [f.tag for f in scan_header(Path("f"), ds)]
    assert tags == ["(0010,0010) PatientName", "(0010,0020) PatientID"]  # the nested pair only


def test_overlay_bitmaps_labels_and_comments_are_findings():
    ds = Dataset()
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "tool X, basic profile"
    ds.add_new(0x60003000, "OW", b"\x01\x00" * 8)  # overlay bitmap, group 6000
    ds.add_new(0x60024000, "LT", "Jane's scan")  # overlay comments, group 6002
    ds.add_new(0x60001500, "LO", "label")
    tags = sorted(f.tag for f in scan_header(Path("f"), ds))
    assert tags == ["(6000,1500) OverlayLabel", "(6000,3000) OverlayData", "(6002,4000) OverlayComments"]


def _csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_declared_deidentification_lets_pseudonymous_ids_pass():
    ds = Dataset()
    ds.PatientID, ds.PatientName = "phantom0001", "PHANTOM"
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "tool X, basic profile"
    assert scan_header(Path("f"), ds) == []
    ds.PatientBirthDate = "19500101"  # a tool that left a birth date in is still caught
    assert [f.tag for f in scan_header(Path("f"), ds)] == ["(0010,0030) PatientBirthDate"]
    del ds.DeidentificationMethod  # YES without saying how: ids are not trusted
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
    cfg = compose_cfg(
        "prepare",
        out,
        [
            "data=labels",
            f"data.labels={labels}",
            "data.image_size=[6,6]",
            "data.split=[0.5,0.5,0]",
            "tracking=mlflow",
            "prepare.deid=strip",
        ],
    )
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
        info = prepare_dataset(
            labels,
            tmp_path / "p",
            WINDOW,
            spatial_size=[6, 6, -1],
            spatial_dims=2,
            split_fractions=(0.5, 0.5, 0),
            deid="trust",
        )
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
