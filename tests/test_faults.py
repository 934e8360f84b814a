"""Faults from outside: SIGTERM and SIGKILL while training, temp files of killed writers, a dead tracking server."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medaug.model import load_checkpoint
from pipelines import prepare, train

from .conftest import TINY, compose_cfg

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["experiment=demo_2d", *TINY, "training.log_every=1", "training.ckpt_every=2", "training.device=cpu"]


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    from medaug.atomic import atomic_folder, remove_stale_temps, temp_name

    target = tmp_path / "last.pt"
    pid = dead_pid()
    dead, live = tmp_path / f".last.pt.tmp{pid}", temp_name(target)
    dead.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    (tmp_path / f".last.pt.tmp{pid}.nii.gz").write_bytes(b"x")  # a suffix after the pid
    folder = tmp_path / f".eval.tmp{pid}"
    (folder / "sub").mkdir(parents=True)
    other = tmp_path / f".other.pt.tmp{pid}"  # another file's temp: not this writer's business
    other.write_bytes(b"x")
    assert sorted(p.name for p in remove_stale_temps(target)) == sorted([dead.name, f"{dead.name}.nii.gz"])
    assert live.exists() and other.exists() and not dead.exists()
    with atomic_folder(tmp_path / "eval") as tmp:  # a writer removes the stale temps of its target when it starts
        (tmp / "a.txt").write_text("a")
    assert not folder.exists() and (tmp_path / "eval" / "a.txt").is_file()


def test_checkpoint_write_removes_a_killed_writers_temp(tmp_path):
    from .test_model import _saved

    stale = tmp_path / f".c.pt.tmp{dead_pid()}"
    stale.write_bytes(b"\0" * 1000)
    _saved(tmp_path)
    assert not stale.exists() and load_checkpoint(tmp_path / "c.pt").step == 3


@pytest.fixture(scope="module")
def prepared_job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("job")
    prepare.run(compose_cfg("prepare", out, ["experiment=demo_2d", *TINY]))
    return out / "prepared"


def start_training(out: Path, prepared: Path) -> subprocess.Popen:
    """`python -m pipelines.train` that would run for a long time, on the CPU, one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.train",
            f"paths.output_dir={out}",
            f"paths.prepared_dir={prepared}",
            *TRAIN,
            "training.max_steps=100000",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"training ended with {proc.returncode} before writing {path}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint after {timeout} s")
        time.sleep(0.05)


def weights(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    return {**ckpt.model, **{f"ema.{k}": v for k, v in ckpt.ema["model"].items()}}


def train_to(out: Path, prepared: Path, steps: int) -> dict:
    torch.set_num_threads(1)  # as the subprocess: the same float sums
    train.run(compose_cfg("train", out, [f"paths.prepared_dir={prepared}", *TRAIN, f"training.max_steps={steps}"]))
    return weights(out / "train" / "checkpoints" / "last.pt")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_training_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, prepared_job, sig):
    ckpt = tmp_path / "job" / "train" / "checkpoints" / "last.pt"
    proc = start_training(tmp_path / "job", prepared_job)
    wait_for(ckpt, proc)  # the first periodic checkpoint (step 2) is written
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    stopped = load_checkpoint(ckpt).step
    if sig == signal.SIGTERM:  # handled like Ctrl-C: the step under way ends, the checkpoint is written
        assert proc.returncode == 143, stderr[-2000:]
        assert f"after step {stopped}; checkpoint saved" in stderr.strip().splitlines()[-1]
    else:  # nothing is handled: the last periodic checkpoint is what is left
        assert proc.returncode == -signal.SIGKILL and stopped % 2 == 0
    assert stopped >= 2
    half_written = ckpt.with_name(f".last.pt.tmp{proc.pid}")  # what a kill during a checkpoint write leaves
    half_written.write_bytes(b"\0" * 4096)
    resumed = train_to(tmp_path / "job", prepared_job, stopped + 2)
    assert not list(ckpt.parent.glob(".last.pt.tmp*"))  # removed: its writer is dead
    straight = train_to(tmp_path / "straight", prepared_job, stopped + 2)
    assert resumed.keys() == straight.keys()
    for key in straight:  # one Adam step moves weights by ~lr = 2e-4: a replayed or skipped step shows
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


@pytest.mark.slow
def test_dead_tracking_server_stops_train_in_seconds_naming_the_uri(tmp_path, prepared_job):
    uri = f"http://127.0.0.1:{closed_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.train",
            f"paths.output_dir={tmp_path}",
            f"paths.prepared_dir={prepared_job}",
            *TRAIN,
            "tracking=mlflow",
            f"tracking.uri={uri}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # before: hung > 120 s
    took = time.monotonic() - started
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and "tracking.on_error=continue" in lines[0], r.stderr
    assert took < 15 + 15  # Python, torch and MONAI imports included (~15 s on a busy 2-core machine)


def test_server_that_accepts_but_never_answers_is_found_out_in_seconds():
    from medaug.tracking import TrackingUnavailable, check_server

    with socket.socket() as s:  # connections complete in the kernel's backlog; nothing ever replies
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        port = s.getsockname()[1]
        uri = f"http://user:secret@127.0.0.1:{port}"
        started = time.monotonic()
        with pytest.raises(TrackingUnavailable, match="does not answer") as err:
            check_server(uri, timeout=1.0)
        assert time.monotonic() - started < 10
    assert "secret" not in str(err.value) and f"http://127.0.0.1:{port}" in str(err.value)


def test_dead_tracking_server_with_on_error_continue_tracks_locally(tmp_path, caplog):
    from pipelines.common import make_tracker

    uri = f"http://127.0.0.1:{closed_port()}"
    cfg = compose_cfg(
        "train",
        tmp_path,
        ["experiment=demo_2d", "tracking=mlflow", f"tracking.uri={uri}", "tracking.on_error=continue"],
    )
    tracker = make_tracker(cfg)
    assert tracker.uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and (tmp_path / "mlflow.db").is_file()
    assert any(uri in r.getMessage() and str(tmp_path / "mlflow.db") in r.getMessage() for r in caplog.records)
