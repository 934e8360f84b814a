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
