"""DICOMweb ingest and export against a real Orthanc (tests/orthanc.py)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medaug.data import load_info, prepare_dataset
from medaug.deid import PHIError
from medaug.dicomweb import ENV_PASSWORD, ENV_USER, DicomwebError, Server, fetch_series, store_export
from medaug.io import read_dicom_series
from medaug.phantoms import make_demo_dataset
from tests.conftest import WINDOW
from tests.orthanc import PASSWORD, USER, free_port


@pytest.fixture
def creds(monkeypatch):
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)


def upload(server, root: Path, **kw) -> list[dict]:
    """Write all-DICOM phantoms under ``root``, store them in ``server``; rows (SeriesInstanceUID, label)."""
    labels = make_demo_dataset(
        root,
        spatial_dims=kw.pop("spatial_dims", 2),
        n_per_class=kw.pop("n", 2),
        size=kw.pop("size", 16),
        dicom_every=1,
        seed=0,
    )
    rows, web = [], Server(server.dicomweb, retries=0)
    for row in csv.DictReader(open(labels)):
        files = sorted((root / row["path"]).glob("*.dcm"))
        datasets = [pydicom.dcmread(f) for f in files]
        for ds in datasets:
            ds.BodyPartExamined = row["label"].upper()[:16]
            for k, v in kw.items():
                setattr(ds, k, v)
        web.client.store_instances(datasets)
        rows.append(
            dict(SeriesInstanceUID=str(datasets[0].SeriesInstanceUID), label=row["label"], patient_id=row["patient_id"])
        )
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_fetch_prepare_and_no_second_download(orthanc, creds, tmp_path, caplog):
    orthanc.clear()
    rows = upload(orthanc, tmp_path / "raw")
    labels = write_csv(tmp_path / "series.csv", [{k: r[k] for k in ("SeriesInstanceUID", "label")} for r in rows])
    web = dict(url=orthanc.dicomweb, cache_dir=tmp_path / "cache", retries=0)
    with caplog.at_level(logging.DEBUG):
        info = prepare_dataset(
            labels, tmp_path / "prepared", WINDOW, spatial_size=[16, 16, -1], spatial_dims=2, dicomweb=web
        )
    assert info.summary["series"] == len(rows) == 6 and sorted(info.class_names) == sorted({r["label"] for r in rows})
    local = list(csv.DictReader(open(tmp_path / "cache" / "labels.csv")))
    assert [r["path"] for r in local] == [f"series/{r['SeriesInstanceUID']}/dicom" for r in rows]
    assert all(r["patient_id"].startswith("pid_") for r in local)  # PatientID hashed, never copied
    sent = orthanc.statistics()
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*")}
    # rerun: the cache answers; a dead URL proves no request is made for cached series given by UID
    again = fetch_series(f"http://127.0.0.1:{free_port()}/dicom-web", labels, tmp_path / "cache", retries=0)
    assert again == tmp_path / "cache" / "labels.csv"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*")} == mtimes
    assert orthanc.statistics() == sent
    text = caplog.text + "".join(
        p.read_text(errors="ignore") for p in (tmp_path / "prepared").rglob("*") if p.is_file() and p.suffix != ".gz"
    )
    assert PASSWORD not in text


def test_query_with_label_column(orthanc, creds, tmp_path):
    orthanc.clear()
    rows = upload(orthanc, tmp_path / "raw", n=1)
    labels = fetch_series(
        orthanc.dicomweb, None, tmp_path / "cache", query={"Modality": "CT"}, label_column="BodyPartExamined", retries=0
    )
    local = list(csv.DictReader(open(labels)))
    assert sorted(r["label"] for r in local) == sorted(r["label"].upper()[:16] for r in rows)
    assert {r["path"] for r in local} == {f"series/{r['SeriesInstanceUID']}/dicom" for r in rows}
    with pytest.raises(DicomwebError, match="no series match"):
        fetch_series(
            orthanc.dicomweb, None, tmp_path / "cache", query={"Modality": "MR"}, label_column="Modality", retries=0
        )


def test_phi_on_server_refused_before_pixels(orthanc, creds, tmp_path):
    orthanc.clear()
    rows = upload(orthanc, tmp_path / "raw", n=1, PatientIdentityRemoved="NO", InstitutionName="St Elsewhere")
    labels = write_csv(tmp_path / "series.csv", rows)
    with pytest.raises(PHIError, match="InstitutionName"):
        fetch_series(orthanc.dicomweb, labels, tmp_path / "cache", report_path=tmp_path / "report.csv", retries=0)
    assert not (tmp_path / "cache" / "series").exists()  # nothing downloaded
    assert "InstitutionName" in (tmp_path / "report.csv").read_text()


def test_wrong_password_one_clear_line(orthanc, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, "not-the-Password-42")
    labels = write_csv(tmp_path / "s.csv", [dict(SeriesInstanceUID="1.2.3.4.5", label="a")])
    with caplog.at_level(logging.DEBUG), pytest.raises(DicomwebError, match="refused the credentials") as err:
        fetch_series(orthanc.dicomweb, labels, tmp_path / "cache", retries=0)
    assert "\n" not in str(err.value) and "not-the-Password-42" not in str(err.value) + caplog.text


def test_dead_port_retries_then_one_line(tmp_path):
    labels = write_csv(tmp_path / "s.csv", [dict(SeriesInstanceUID="1.2.3.4.5", label="a")])
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(DicomwebError, match=r"not reachable .*connection refused.* after 3 tries") as err:
        fetch_series(url, labels, tmp_path / "cache", retries=2, backoff_s=0.01)
    assert "\n" not in str(err.value)


def test_url_with_password_refused(tmp_path):
    with pytest.raises(DicomwebError, match="holds a user name or password") as err:
        Server("http://u:hunter2@127.0.0.1:1/dicom-web")
    assert "hunter2" not in str(err.value)


def test_killed_during_download_leaves_no_partial_series(orthanc, creds, tmp_path, monkeypatch):
    orthanc.clear()
    rows = upload(orthanc, tmp_path / "raw", n=1, spatial_dims=3, size=8)
    labels = write_csv(tmp_path / "s.csv", rows[:1])
    real = pydicom.Dataset.save_as
    calls = []

    def failing(self, *a, **kw):  # the connection drops after 3 instances, on every try
        calls.append(1)
        if len(calls) % 4 == 0:
            raise ConnectionError("connection reset")
        return real(self, *a, **kw)

    monkeypatch.setattr(pydicom.Dataset, "save_as", failing)
    with pytest.raises(DicomwebError, match="not reachable"):
        fetch_series(orthanc.dicomweb, labels, tmp_path / "cache", retries=1, backoff_s=0.01)
    assert not any((tmp_path / "cache" / "series").iterdir())  # no half series in the cache
    monkeypatch.setattr(pydicom.Dataset, "save_as", real)
    fetch_series(orthanc.dicomweb, labels, tmp_path / "cache", retries=0)
    folder = tmp_path / "cache" / "series" / rows[0]["SeriesInstanceUID"]
    assert len(list(folder.glob("dicom/*.dcm"))) == 8 and (folder / "DONE").is_file()


def test_store_export_once(orthanc, creds, tmp_path):
    orthanc.clear()
    from medaug.io import write_dicom_series
    from medaug.export import dicom_header

    out = tmp_path / "export"
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    write_dicom_series(
        out / "dicom" / "synth_00000_a", np.zeros((8, 8, 4), np.float32), affine, dicom_header("SYN00000", "a")
    )
    first = store_export(out, orthanc.dicomweb, retries=0)
    assert [s["sent"] for s in first["series"]] == [True] and orthanc.statistics()["CountInstances"] == 4
    second = store_export(out, orthanc.dicomweb, retries=0)
    assert [s["sent"] for s in second["series"]] == [False] and orthanc.statistics()["CountInstances"] == 4
    web = Server(orthanc.dicomweb, retries=0)
    s = first["series"][0]
    back = list(web.client.iter_series(s["study_uid"], s["series_uid"]))
    assert len(back) == 4 and "SYNTHETIC" in str(back[0].SeriesDescription)
    assert [float(v) for v in back[0].PixelSpacing] == [2.0, 2.0]


def test_round_trip_prepare_train_export_back(orthanc, creds, tmp_path, capfd):
    """Phantoms in Orthanc -> prepare from DICOMweb -> tiny train -> sample -> export with STOW-RS -> WADO-RS back."""
    from pipelines import export, prepare, sample, train
    from tests.conftest import TINY, compose_cfg

    orthanc.clear()
    rows = upload(orthanc, tmp_path / "pacs_src", n=4, size=16)
    labels = write_csv(tmp_path / "series.csv", rows)
    over = [
        *TINY,
        "data.source=dicomweb",
        f"data.labels={labels}",
        f"data.dicomweb.url={orthanc.dicomweb}",
        "data.dicomweb.retries=0",
        "data.image_size=[16,16]",
        "export.format=[nifti,dicom]",
        f"export.dicomweb.url={orthanc.dicomweb}",
        "export.copy_filter=false",
        "sample.num_per_class=1",
    ]
    before = orthanc.statistics()["CountSeries"]
    prepare.run(compose_cfg("prepare", tmp_path, over))
    assert load_info(tmp_path / "prepared").summary["series"] == 12
    train.run(compose_cfg("train", tmp_path, over))
    sample.run(compose_cfg("sample", tmp_path, over))
    export.run(compose_cfg("export", tmp_path, over))
    import json

    record = json.loads((tmp_path / "export" / "dicomweb_stored.json").read_text())
    assert len(record["series"]) == 3 and all(s["sent"] for s in record["series"])
    assert orthanc.statistics()["CountSeries"] == before + 3
    web = Server(orthanc.dicomweb, retries=0)
    for s in record["series"]:
        back = list(web.client.iter_series(s["study_uid"], s["series_uid"]))
        folder = tmp_path / "back" / s["series_uid"]
        folder.mkdir(parents=True)
        for k, ds in enumerate(back):
            ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
        volume = read_dicom_series(sorted(folder.glob("*.dcm")))
        assert volume.array.shape[:2] == (16, 16)
        assert np.allclose(np.linalg.norm(volume.affine[:3, :3], axis=0)[:2], 4.0)  # the phantoms' 4 mm pixels
        assert "SYNTHETIC" in str(back[0].SeriesDescription) and "SYNTHETIC" in str(back[0].ImageComments)
    out, err = capfd.readouterr()
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "pacs_src" not in p.parts]
    assert not any(PASSWORD.encode() in p.read_bytes() for p in files) and PASSWORD not in out + err


def test_stage_server_down_exit_2_one_line(tmp_path):
    import os
    import subprocess
    import sys

    labels = write_csv(tmp_path / "s.csv", [dict(SeriesInstanceUID="1.2.3.4.5", label="a")])
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        ENV_USER: USER,
        ENV_PASSWORD: PASSWORD,
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "pipelines.prepare",
        f"paths.output_dir={tmp_path / 'out'}",
        "tracking=none",
        "data.source=dicomweb",
        f"data.labels={labels}",
        f"data.dicomweb.url=http://127.0.0.1:{free_port()}/x",
        "data.dicomweb.retries=1",
        "data.dicomweb.backoff_s=0.01",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if "not reachable" in ln]
    assert len(lines) == 1 and "after 2 tries" in lines[0]
    outputs = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not any(PASSWORD in p.read_text(errors="ignore") for p in outputs) and PASSWORD not in done.stderr


# --- issue 18 acceptance: faults against the real server


def big_series(root: Path, instances: int = 128, size: int = 512) -> list[pydicom.Dataset]:
    """One phantom CT series grown to ``instances`` slices of ``size``² (512 KB each, 64 MB): a WADO-RS response
    larger than the socket buffers can hold (here tcp_wmem max 4 MB + tcp_rmem max 32 MB; 32 MB went through
    whole), so that a server killed as the first file is written dies mid-transfer."""
    import copy

    from pydicom.uid import generate_uid

    labels = make_demo_dataset(root, spatial_dims=2, n_per_class=1, size=16, dicom_every=1, seed=0)
    first = pydicom.dcmread(next((root / next(csv.DictReader(open(labels)))["path"]).glob("*.dcm")))
    out = []
    for k in range(instances):
        ds = copy.deepcopy(first)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber, ds.ImagePositionPatient = k + 1, [0.0, 0.0, float(k)]
        ds.Rows = ds.Columns = size
        ds.PixelData = np.full((size, size), k, np.int16).tobytes()
        out.append(ds)
    return out


def test_server_killed_during_download_then_rerun_completes(creds, tmp_path, monkeypatch):
    """A PACS of its own (real Orthanc), SIGKILLed by its PID as the first file of a 64 MB series is written: the
    transfer breaks mid-series, the fetch fails in one line after its retries and the cache holds no part of the
    series; restarted on the same storage, a rerun fetches the whole series."""
    from tests.orthanc import missing, start_orthanc

    if missing():
        pytest.skip(missing())
    server = start_orthanc(tmp_path / "pacs")
    try:
        datasets = big_series(tmp_path / "raw")
        web = Server(server.dicomweb, retries=0)
        for i in range(0, len(datasets), 16):
            web.client.store_instances(datasets[i : i + 16])
        uid = str(datasets[0].SeriesInstanceUID)
        labels = write_csv(tmp_path / "s.csv", [dict(SeriesInstanceUID=uid, label="a", patient_id="p0")])
        real, saved = pydicom.Dataset.save_as, []

        def save_and_kill(self, *a, **kw):
            saved.append(1)
            if len(saved) == 1:
                server.process.kill()
                server.process.wait(timeout=10)
            return real(self, *a, **kw)

        monkeypatch.setattr(pydicom.Dataset, "save_as", save_and_kill)
        with pytest.raises(DicomwebError, match=r"not reachable for WADO-RS retrieve .* after 2 tries") as err:
            fetch_series(server.dicomweb, labels, tmp_path / "cache", retries=1, backoff_s=0.01)
        assert "\n" not in str(err.value) and 1 < len(saved) < len(datasets)  # it broke mid-series
        monkeypatch.setattr(pydicom.Dataset, "save_as", real)
        assert not any((tmp_path / "cache" / "series").iterdir())  # no partial series, no temp folder
        server = start_orthanc(tmp_path / "pacs")  # same storage, new port
        fetch_series(server.dicomweb, labels, tmp_path / "cache", retries=0)
        folder = tmp_path / "cache" / "series" / uid
        files = sorted(folder.glob("dicom/*.dcm"))
        assert (folder / "DONE").is_file() and len(files) == len(datasets)
        assert {int(pydicom.dcmread(f).pixel_array[0, 0]) for f in files} == set(range(len(datasets)))
    finally:
        server.stop()


def test_stage_wrong_password_exit_2_and_the_password_nowhere(orthanc, tmp_path):
    import os
    import subprocess
    import sys

    wrong = "Wrong-Pa55word-xyz"
    labels = write_csv(tmp_path / "s.csv", [dict(SeriesInstanceUID="1.2.3.4.5", label="a")])
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        ENV_USER: USER,
        ENV_PASSWORD: wrong,
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "pipelines.prepare", f"paths.output_dir={tmp_path / 'out'}", "tracking=none"]
    cmd += ["data.source=dicomweb", f"data.labels={labels}", f"data.dicomweb.url={orthanc.dicomweb}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("medaug prepare: error:")]
    assert len(lines) == 1 and "refused the credentials (HTTP 401)" in lines[0]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and not any(wrong.encode() in p.read_bytes() for p in files)
    assert wrong not in done.stdout + done.stderr


def test_phi_gate_refuses_a_stored_series_exactly_as_from_a_folder(orthanc, creds, tmp_path):
    """The same PHI-bearing files, from a folder (prepare) and from the PACS (fetch_series): the same findings
    (tags and reasons per instance), the same one-line refusal."""
    orthanc.clear()
    labels = make_demo_dataset(tmp_path / "raw", spatial_dims=2, n_per_class=1, size=16, dicom_every=1, seed=0)
    row = next(csv.DictReader(open(labels)))
    folder = tmp_path / "phi" / "s0"
    folder.mkdir(parents=True)
    datasets = []
    for k, f in enumerate(sorted((tmp_path / "raw" / row["path"]).glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        ds.PatientIdentityRemoved, ds.InstitutionName, ds.OperatorsName = "NO", "St Elsewhere", "Doe^Jane"
        ds.save_as(folder / f"{k:05d}.dcm", enforce_file_format=True)
        datasets.append(ds)
    Server(orthanc.dicomweb, retries=0).client.store_instances(datasets)
    local = write_csv(tmp_path / "local.csv", [dict(path="phi/s0", patient_id="p0", label="a")])
    with pytest.raises(PHIError) as from_folder:
        prepare_dataset(
            local, tmp_path / "prepared", WINDOW, spatial_size=[16, 16, -1], spatial_dims=2,
            deid_report=tmp_path / "folder.csv",
        )  # fmt: skip
    web = write_csv(tmp_path / "web.csv", [dict(SeriesInstanceUID=str(datasets[0].SeriesInstanceUID), label="a")])
    with pytest.raises(PHIError) as from_server:
        fetch_series(orthanc.dicomweb, web, tmp_path / "cache", report_path=tmp_path / "web_report.csv", retries=0)

    def findings(report: Path) -> list[tuple[str, str]]:
        return sorted((r["tag"], r["reason"]) for r in csv.DictReader(open(report)))

    assert findings(tmp_path / "folder.csv") == findings(tmp_path / "web_report.csv")
    assert {t for t, _ in findings(tmp_path / "folder.csv")} >= {
        "(0008,0080) InstitutionName",
        "(0008,1070) OperatorsName",
    }
    summary = lambda err: str(err.value).split(": ", 1)[1].split(";")[0]  # "N findings in M DICOM files (tags: ..)"
    assert summary(from_folder) == summary(from_server)
    assert not (tmp_path / "cache" / "series").exists() and not (tmp_path / "prepared").exists()
