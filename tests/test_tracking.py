"""MLflow tracking against a local sqlite store and against a real `mlflow server` on loopback."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from medaug.tracking import MLflowTracker, flatten

from .conftest import TINY, compose_cfg


def test_flatten_hides_paths():
    flat = flatten({"paths": {"output_dir": "/data/Jane_Doe"}, "training": {"lr": 0.1}, "data": {"labels": "/x"}})
    assert flat == {"paths.output_dir": "<path>", "training.lr": "0.1", "data.labels": "<path>"}


def test_sqlite_tracker_logs_and_reopens(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = MLflowTracker(uri, "exp", artifact_dir=tmp_path / "art")
    run_id = t.start(run_name="r")
    t.log_params({"a": 1})
    t.log_metrics({"train/loss": 0.5}, step=3)
    (tmp_path / "f.txt").write_text("hello")
    t.log_artifact(tmp_path / "f.txt", "things")
    t.end()
    t2 = MLflowTracker(uri, "exp", artifact_dir=tmp_path / "art")
    assert t2.start(run_id=run_id) == run_id
    t2.log_metrics({"fidelity/x": 1.0})
    t2.end()
    run = t2.client.get_run(run_id)
    assert run.data.metrics == {"train/loss": 0.5, "fidelity/x": 1.0} and run.data.params == {"a": "1"}
    assert (tmp_path / "art").rglob("f.txt")
    assert t2.start(run_id="0" * 32) != run_id  # an unknown id starts a fresh run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            mlflow,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if _get(base + "/health") == b"OK":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not become healthy in 60 s")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # stop it (and its workers) by PID
        proc.wait(timeout=30)


@pytest.mark.slow
def test_smoke_pipeline_against_mlflow_server(tmp_path, mlflow_server):
    from pipelines import prepare, sample, train

    out = tmp_path / "job"
    overrides = [*TINY, "experiment=demo_2d", "tracking=mlflow", f"tracking.uri={mlflow_server}"]
    for stage in (prepare, train, sample):
        stage.run(compose_cfg(stage.__name__.split(".")[-1], out, overrides))
    exp = json.loads(_get(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=medaug-demo_2d"))
    runs = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                f"{mlflow_server}/api/2.0/mlflow/runs/search",
                method="POST",
                data=json.dumps({"experiment_ids": [exp["experiment"]["experiment_id"]]}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=10,
        ).read()
    )["runs"]
    assert len(runs) == 1  # train and sample share one run
    run = runs[0]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert "train/loss" in metrics and metrics["train/loss"] > 0
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["training.max_steps"] == "4" and params["paths.output_dir"] == "<path>"
    query = urllib.parse.urlencode({"run_uuid": run["info"]["run_id"], "path": "samples/grid.png"})
    png = _get(f"{mlflow_server}/get-artifact?{query}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_rank_zero_gets_a_real_tracker(tmp_path, monkeypatch):
    from medaug.tracking import NullTracker
    from pipelines.common import make_tracker

    cfg = compose_cfg("train", tmp_path, ["experiment=demo_2d", "tracking=mlflow"])
    monkeypatch.setenv("RANK", "1")
    assert isinstance(make_tracker(cfg), NullTracker)
    assert not (tmp_path / "mlflow.db").exists()  # the store is not even opened
    monkeypatch.setenv("RANK", "0")
    assert isinstance(make_tracker(cfg), MLflowTracker)


class RecordingTracker:
    """A tracker that records what is called on it; ``fail_end`` makes ``end`` raise."""

    def __init__(self, fail_end: bool = False):
        self.calls, self.fail_end, self.run_id = [], fail_end, None

    def start(self, run_name=None, run_id=None, tags=None):
        self.calls.append(("start", run_name, run_id, tags))
        self.run_id = run_id or "new"
        return self.run_id

    def log_metrics(self, metrics, step=None):
        self.calls.append(("log_metrics", dict(metrics)))

    def end(self, status="FINISHED"):
        self.calls.append(("end", status))
        if self.fail_end:
            raise ConnectionError("server gone")


def test_tracked_ends_the_run_finished_after_the_block():
    from medaug.tracking import tracked

    t = RecordingTracker()
    with tracked(t, run_name="job", run_id="abc", tags={"medaug.job": "job"}) as inside:
        assert inside is t and t.calls == [("start", "job", "abc", {"medaug.job": "job"})]
        t.log_metrics({"train/loss": 0.5})
    assert t.calls[1:] == [("log_metrics", {"train/loss": 0.5}), ("end", "FINISHED")]


@pytest.mark.parametrize("error", [ValueError("bad value"), KeyboardInterrupt(), "terminated"])
def test_tracked_ends_the_run_killed_on_any_error_and_raises_it(error):
    from medaug.tracking import tracked
    from medaug.training import Terminated

    error = Terminated("SIGTERM") if error == "terminated" else error
    t = RecordingTracker()
    with pytest.raises(type(error)) as raised:
        with tracked(t, run_name="job"):
            raise error
    assert raised.value is error
    assert t.calls == [("start", "job", None, None), ("end", "KILLED")]


def test_tracked_raises_the_work_error_when_ending_the_killed_run_fails(caplog):
    from medaug.tracking import tracked

    t = RecordingTracker(fail_end=True)
    with pytest.raises(ValueError, match="bad value"):  # not the tracker's ConnectionError
        with tracked(t, run_name="job"):
            raise ValueError("bad value")
    assert t.calls[-1] == ("end", "KILLED")
    assert "could not end the run as KILLED (ConnectionError: server gone)" in caplog.text


def test_tracked_guarded_tracker_that_fails_lets_the_work_finish(caplog):
    from medaug.tracking import guarded, tracked

    t = RecordingTracker(fail_end=True)
    with tracked(guarded(t), run_name="job") as g:
        g.log_metrics({"a": 1.0})
    assert t.calls[-1] == ("end", "FINISHED") and "tracking failed in end" in caplog.text


def test_tracked_sqlite_run_status_is_finished_or_killed(tmp_path):
    from medaug.tracking import tracked

    t = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", artifact_dir=tmp_path / "art")
    with tracked(t, run_name="ok", tags={"medaug.job": "ok"}):
        t.log_metrics({"train/loss": 0.5}, step=1)
    ok = t.run_id
    with pytest.raises(RuntimeError):
        with tracked(t, run_name="broken"):
            raise RuntimeError("out of memory")
    runs = {r.info.run_name: r for r in t.client.search_runs([t.experiment_id])}
    assert runs["ok"].info.run_id == ok and runs["ok"].info.status == "FINISHED"
    assert runs["ok"].data.tags["medaug.job"] == "ok" and runs["ok"].data.metrics == {"train/loss": 0.5}
    assert runs["broken"].info.status == "KILLED"


def test_server_check_answers_for_a_uri_with_credentials_and_never_prints_them():
    """urllib reads ``user:pw@host`` as a host name: the probe must go to the host, and the line must not show pw."""
    import http.server
    import threading

    from medaug.tracking import TrackingUnavailable, check_server

    class AuthRequired(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), AuthRequired)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_server(f"http://alice:s3cret@127.0.0.1:{server.server_port}", timeout=5)  # up: no error
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(TrackingUnavailable) as err:
        check_server(f"http://alice:s3cret@127.0.0.1:{server.server_port}", timeout=2)  # now down
    assert "s3cret" not in str(err.value) and f"http://127.0.0.1:{server.server_port}" in str(err.value)
