"""The generator in the MLflow registry (pyfunc, models:/ checkpoints, serving), lineage, training previews."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medaug.data import load_info
from medaug.sampling import load_samples
from pipelines import prepare, sample, train

from .conftest import TINY, compose_cfg

REPO = Path(__file__).resolve().parents[1]
NAME = "demo-gen"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny 2D demo prepared and trained with tracking.register and previews every 2 steps (4 steps)."""
    out = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    overrides = [
        "experiment=demo_2d",
        *TINY,
        "tracking=mlflow",
        f"tracking.uri={uri}",
        f"tracking.register={NAME}",
        "training.preview_every=2",
        "data.demo.size=12",
        "data.image_size=[12,12]",
    ]
    prepare.run(compose_cfg("prepare", out, overrides))
    train.run(compose_cfg("train", out, overrides))
    return out, uri, overrides


def request(class_name, count, seed, steps=3):
    return {"class": class_name, "count": count, "seed": seed, "guidance": 2.0, "sampler": "ddim", "steps": steps}


def test_train_registers_logs_the_dataset_input_and_previews_at_their_steps(job):
    from mlflow.tracking import MlflowClient

    out, uri, _ = job
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("medaug-demo_2d")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    info = load_info(out / "prepared")
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == info.fingerprint[:36] and len(info.fingerprint) <= 36
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    source = json.loads(inp.dataset.source)
    assert source == {
        "origin": "demo",
        "format": "dicom" if info.summary.get("series") else "nifti",
        "modality": info.modality,
        "spatial_dims": 2,
        "classes": info.class_names,
    }
    patients = {r["patient"] for r in csv.DictReader(open(out / "prepared" / "manifest.csv"))}
    assert not any(p in inp.dataset.source for p in patients) and str(out) not in inp.dataset.source
    assert "/" not in inp.dataset.source
    # the prepare run (its own experiment) logged the same dataset
    (prep,) = client.search_runs([client.get_experiment_by_name("medaug-demo_2d-prepare").experiment_id])
    assert prep.inputs.dataset_inputs[0].dataset.digest == inp.dataset.digest
    # the registered model version came from this run
    (version,) = client.search_model_versions(f"name='{NAME}'")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    # previews: log_image at steps 2 and 4
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    steps = sorted(
        int(Path(p).name.split("+")[2])
        for p in images
        if p.endswith(".png") and Path(p).name.startswith("preview+step+")
    )
    assert steps == [2, 4]


def test_registered_model_predicts_the_requested_counts_with_reproducible_seeds(job, tmp_path, monkeypatch):
    import mlflow

    _, uri, _ = job
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    table = pd.DataFrame([request("healthy", 2, 5), request("multi_lesion", 3, 7), request("healthy", 2, 5)])
    got = model.predict(table, params={"output_dir": str(tmp_path / "files")})
    assert got["class"].tolist() == ["healthy"] * 2 + ["multi_lesion"] * 3 + ["healthy"] * 2
    assert got["seed"].tolist() == [5, 5, 7, 7, 7, 5, 5] and got["index"].tolist() == [0, 1, 0, 1, 2, 0, 1]
    first, again = np.stack(got["image"][:2]), np.stack(got["image"][5:])
    assert first.shape == (2, 1, 12, 12) and np.array_equal(first, again)  # same seed -> same images
    assert not np.array_equal(first[0], first[1])  # image i from seed + i
    assert sorted(p.name for p in (tmp_path / "files").glob("*.npy"))[:2] == ["healthy_5_0.npy", "healthy_5_1.npy"]
    with pytest.raises(Exception, match="unknown"):
        model.predict(pd.DataFrame([request("no_such_class", 1, 0)]))


def test_sample_from_the_registry_gives_the_pyfunc_images(job, tmp_path, monkeypatch):
    import mlflow

    out, uri, overrides = job
    for ref in (f"models:/{NAME}/1", f"models:/{NAME}@best"):
        if "@" in ref:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri, registry_uri=uri).set_registered_model_alias(NAME, "best", "1")
        sample.run(
            compose_cfg(
                "sample",
                tmp_path,
                [
                    *overrides,
                    f"ckpt_path={ref}",
                    "sample.num_per_class=2",
                    "sample.seed=11",
                    "sample.sampler=ddim",
                    "sample.steps=3",
                    "sample.guidance_scale=2.0",
                ],
            )
        )
        images, labels, rows, info = load_samples(tmp_path / "samples")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        got = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(pd.DataFrame([request("healthy", 2, 11)]))
        assert torch.equal(images[labels == 0], torch.from_numpy(np.stack(got["image"])))
    with pytest.raises(ValueError, match="not found in the model registry"):
        sample.run(compose_cfg("sample", tmp_path, [*overrides, "ckpt_path=models:/nope/3"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_scoring_request(job):
    _, uri, _ = job
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # uvicorn of this venv
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{NAME}/1",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        body = json.dumps({"dataframe_records": [request("healthy", 2, 3)]}).encode()
        deadline = time.monotonic() + 120
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(req, timeout=30) as answer:
                    predictions = json.loads(answer.read())["predictions"]
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"server did not answer: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        assert [p["class"] for p in predictions] == ["healthy", "healthy"] and predictions[1]["index"] == 1
        assert np.asarray(predictions[0]["image"]).shape == (1, 12, 12)
    finally:  # the CLI and the uvicorn it starts: the process group of the PID started here
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_latent_generator_samples_from_the_registry_with_its_own_autoencoder(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        "experiment=ldm_3d_demo",
        *TINY,
        "tracking=mlflow",
        f"tracking.uri={uri}",
        "tracking.register=ldm",
        "autoencoder.max_steps=2",
        "training.max_steps=2",
        "training.preview_every=0",
        "data.demo.n_per_class=3",
        "data.demo.size=12",
        "data.image_size=[12,12,12]",
    ]
    prepare.run(compose_cfg("prepare", tmp_path, overrides))
    train.run(compose_cfg("train", tmp_path, overrides))
    (tmp_path / "autoencoder" / "checkpoints" / "last.pt").rename(tmp_path / "moved.pt")  # not where training left it
    sample.run(
        compose_cfg(
            "sample",
            tmp_path / "elsewhere",
            [
                *overrides,
                "ckpt_path=models:/ldm/1",
                "sample.num_per_class=1",
                "sample.seed=3",
                "sample.sampler=ddim",
                "sample.steps=2",
            ],
        )
    )
    images, labels, _, _ = load_samples(tmp_path / "elsewhere" / "samples")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    got = mlflow.pyfunc.load_model("models:/ldm/1").predict(pd.DataFrame([request("healthy", 1, 3, steps=2)]))
    # the same latents; decoding in other batch sizes may round differently in the last bits
    assert images.shape[2:] == (12, 12, 12)
    assert torch.allclose(images[labels == 0], torch.from_numpy(got["image"][0])[None], atol=1e-4)


@pytest.mark.slow
def test_registered_model_by_name_in_a_fresh_process_gives_the_images_of_medaug_sample(job, tmp_path):
    """`medaug sample` on the training checkpoint, then a new Python process that knows only the store and the
    model's name: mlflow.pyfunc.load_model("models:/<name>/1").predict for the same seeds gives the same images."""
    out, uri, overrides = job
    settings = ["sample.num_per_class=2", "sample.seed=11", "sample.sampler=ddim", "sample.steps=3"]
    sample.run(compose_cfg("sample", tmp_path, [*overrides, f"ckpt_path={out}/train/checkpoints/last.pt", *settings]))
    images, labels, _, info = load_samples(tmp_path / "samples")
    names = info["class_names"]
    rows = [request(n, 2, 11 + 2 * k) for k, n in enumerate(names)]  # class k of `medaug sample`: seeds 11 + 2k, ...
    script = (
        "import sys, json, numpy as np, pandas as pd, mlflow\n"
        f"model = mlflow.pyfunc.load_model('models:/{NAME}/1')\n"
        "got = model.predict(pd.DataFrame(json.loads(sys.argv[1])))\n"
        "np.save(sys.argv[2], np.stack(got['image']))\n"
    )
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),  # the same reduction order as this process
    }
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(rows), str(tmp_path / "got.npy")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.from_numpy(np.load(tmp_path / "got.npy"))
    assert got.shape == images.shape == (6, 1, 12, 12)
    assert torch.equal(got, images), (got - images).abs().max()
