"""Augment: policies, idempotence, resume after a kill, sharding, the MONAI dataset, the stage."""

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import medaug
from medaug.augment import MixedDataset, augment, read_mixed_manifest, synthetic_counts
from medaug.data import load_info, read_manifest
from medaug.model import EMA, network_from_spec, save_checkpoint
from pipelines import augment as augment_stage

from .conftest import CONF_DIR, compose_cfg

REPO = CONF_DIR.parent
FAST = dict(steps=2, batch_size=2, progress=False)


def tiny_checkpoint(prepared, path):
    info = load_info(prepared)
    spec = {
        "_target_": "monai.networks.nets.DiffusionModelUNet",
        "spatial_dims": info.spatial_dims,
        "in_channels": 1,
        "out_channels": 1,
        "channels": [8, 8],
        "attention_levels": [False, False],
        "num_res_blocks": 1,
        "num_head_channels": 8,
        "norm_num_groups": 8,
        "num_class_embeds": info.num_classes + 1,
    }
    torch.manual_seed(0)
    net = network_from_spec(spec)
    scheduler = {
        "_target_": "monai.networks.schedulers.DDPMScheduler",
        "num_train_timesteps": 1000,
        "schedule": "linear_beta",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "clip_sample": True,
    }
    meta = dict(
        class_names=info.class_names,
        spatial_dims=info.spatial_dims,
        image_shape=info.image_shape,
        window=info.window.as_dict(),
        affine=info.affine.tolist(),
        dataset=info.fingerprint,
    )
    return save_checkpoint(
        path, model=net, ema=EMA(net), optimizer=None, step=0, config={"model": spec, "scheduler": scheduler}, meta=meta
    )


@pytest.fixture(scope="module")
def ckpt_2d(prepared_2d, tmp_path_factory):
    return tiny_checkpoint(prepared_2d, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def folder_state(folder):
    """Every file under ``folder`` (relative path → bytes), NIfTI compared by their voxels."""
    state = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            state[rel] = np.asarray(nib.load(p).dataobj).tobytes() if p.name.endswith(".nii.gz") else p.read_bytes()
    return state


def test_policies_give_counts_per_class():
    real = {"a": 10, "b": 4, "c": 7}
    assert synthetic_counts(real, "balance") == {"a": 0, "b": 6, "c": 3}
    assert synthetic_counts(real, "per_class", num_per_class=5) == {"a": 5, "b": 5, "c": 5}
    assert synthetic_counts(real, "per_class", num_per_class={"b": 2}) == {"a": 0, "b": 2, "c": 0}
    assert synthetic_counts(real, "ratio", ratio=0.5) == {"a": 5, "b": 2, "c": 4}
    assert synthetic_counts(real, "per_class", num_per_class=0) == {"a": 0, "b": 0, "c": 0}  # real items only
    with pytest.raises(ValueError, match="augment.num_per_class names unknown classes"):
        synthetic_counts(real, "per_class", num_per_class={"z": 1})
    with pytest.raises(ValueError, match=r"augment.num_per_class=\{'a': -1\} asks for a negative count"):
        synthetic_counts(real, "per_class", num_per_class={"a": -1})
    with pytest.raises(ValueError, match="choose one of"):
        synthetic_counts(real, "oversample")
    with pytest.raises(ValueError, match="augment.ratio"):
        synthetic_counts(real, "ratio", ratio=-1)


def test_augment_writes_mixed_manifest_and_is_idempotent(prepared_2d, ckpt_2d, tmp_path):
    out = tmp_path / "aug"
    result = augment(prepared_2d, ckpt_2d, out, policy="per_class", num_per_class=3, **FAST)
    assert result.complete and result.generated == 9
    rows = read_mixed_manifest(out)
    real_train = [r for r in read_manifest(prepared_2d) if r["split"] == "train"]
    assert len(rows) == len(real_train) + 9 and [r["synthetic"] for r in rows].count(True) == 9
    synth = [r for r in rows if r["synthetic"]]
    assert [r["class_name"] for r in synth] == ["healthy"] * 3 + ["multi_lesion"] * 3 + ["single_lesion"] * 3
    assert [int(r["seed"]) for r in synth] == list(range(1234, 1243)) and all(r["patient"] == "" for r in synth)
    assert all(os.path.isfile(r["path"]) for r in rows)
    image = nib.load(synth[0]["path"])
    assert image.shape == (16, 16, 1) and np.abs(np.asarray(image.dataobj)).max() <= 1
    np.testing.assert_allclose(image.affine, load_info(prepared_2d).affine)

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = augment(prepared_2d, ckpt_2d, out, policy="per_class", num_per_class=3, **FAST)
    assert again.complete and again.generated == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(ValueError, match="other settings"):
        augment(prepared_2d, ckpt_2d, out, policy="per_class", num_per_class=2, **FAST)
    with pytest.raises(ValueError, match="multiple of"):
        augment(prepared_2d, ckpt_2d, tmp_path / "x", policy="balance", chunk_size=3, **FAST)


def test_interrupted_and_sharded_runs_equal_one_uninterrupted_run(prepared_2d, ckpt_2d, tmp_path):
    kwargs = dict(policy="per_class", num_per_class={"healthy": 3, "single_lesion": 2}, **FAST)
    reference = augment(prepared_2d, ckpt_2d, tmp_path / "ref", **kwargs)
    assert reference.complete and reference.generated == 5

    def crash_after_first(chunk):
        raise KeyboardInterrupt(f"killed after chunk {chunk}")

    with pytest.raises(KeyboardInterrupt):
        augment(prepared_2d, ckpt_2d, tmp_path / "resumed", on_chunk=crash_after_first, **kwargs)
    partial = tmp_path / "resumed"
    assert (partial / "chunks" / "chunk_00000" / "DONE").exists() and not (partial / "DONE").exists()
    assert not (partial / "manifest.csv").exists() and len(list((partial / "chunks").iterdir())) == 1
    (partial / "chunks" / ".chunk_00001.tmp99999").mkdir()  # killed while writing chunk 1
    resumed = augment(prepared_2d, ckpt_2d, partial, **kwargs)
    assert resumed.complete and resumed.generated == 3
    assert sorted(p.name for p in (partial / "chunks").iterdir()) == ["chunk_00000", "chunk_00001", "chunk_00002"]
    assert folder_state(partial) == folder_state(tmp_path / "ref")

    shard0 = augment(prepared_2d, ckpt_2d, tmp_path / "sharded", rank=0, world_size=2, **kwargs)
    assert not shard0.complete and shard0.generated == 3  # chunks 0 and 2
    shard1 = augment(prepared_2d, ckpt_2d, tmp_path / "sharded", rank=1, world_size=2, **kwargs)
    assert shard1.complete and shard1.generated == 2
    assert folder_state(tmp_path / "sharded") == folder_state(tmp_path / "ref")


@pytest.mark.slow
def test_stage_killed_mid_way_resumes_to_the_same_result(prepared_2d, ckpt_2d, tmp_path):
    args = [
        f"input={prepared_2d}",
        f"ckpt_path={ckpt_2d}",
        "tracking=none",
        f"paths.output_dir={tmp_path}",
        "augment.policy=per_class",
        "augment.num_per_class=4",
        "augment.batch_size=1",
        "augment.steps=25",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.augment", *args, f"output={tmp_path}/killed"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = tmp_path / "killed" / "chunks" / "chunk_00000" / "DONE"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "DONE").exists()
    for name in ("killed", "clean"):
        cfg = compose_cfg("augment", tmp_path, [*args, f"output={tmp_path}/{name}"])
        result = augment_stage.run(cfg)
        assert result["complete"] and result["synthetic"] == 12
        assert result["generated"] < 12 if name == "killed" else result["generated"] == 12
    assert folder_state(tmp_path / "killed") == folder_state(tmp_path / "clean")


def test_mixed_dataset_trains_a_monai_classifier_for_one_step(prepared_2d, ckpt_2d, tmp_path):
    from monai.data import DataLoader
    from monai.networks.nets import Classifier

    augment(prepared_2d, ckpt_2d, tmp_path / "aug", policy="ratio", ratio=0.5, **FAST)
    ds = MixedDataset(tmp_path / "aug")  # the two lines a MONAI script needs
    loader = DataLoader(ds, batch_size=len(ds), shuffle=False)
    batch = next(iter(loader))
    n_real = len(MixedDataset(tmp_path / "aug", synthetic=False))
    assert len(ds) == n_real + len(MixedDataset(tmp_path / "aug", real=False)) and n_real < len(ds)
    assert batch["image"].shape == (len(ds), 1, 16, 16) and batch["synthetic"].sum() == len(ds) - n_real
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    net = Classifier(in_shape=(1, 16, 16), classes=3, channels=(4, 8), strides=(2, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    loss = torch.nn.functional.cross_entropy(net(batch["image"].as_tensor()), batch["label"])
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_stage_logs_one_mlflow_run_with_counts_plan_and_grid(prepared_2d, ckpt_2d, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = compose_cfg(
        "augment",
        tmp_path,
        [
            f"input={prepared_2d}",
            f"ckpt_path={ckpt_2d}",
            "tracking=mlflow",
            "name=aug",
            "augment.policy=per_class",
            "augment.num_per_class=2",
            "augment.steps=2",
        ],
    )
    augment_stage.run(cfg)
    augment_stage.run(cfg)  # nothing left to do: no second run
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medaug-aug").experiment_id])
    assert [r.info.run_name for r in runs] == ["aug-augment"]
    run = runs[0]
    assert run.data.metrics["augment/synthetic"] == 6 and run.data.metrics["augment/synthetic/healthy"] == 2
    assert run.data.tags["augment.policy"] == "per_class"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "augment")}
    assert logged == {"augment/plan.json", "augment/synthetic_grid.png"}
    grid_file = client.download_artifacts(run.info.run_id, "augment/synthetic_grid.png", str(tmp_path))
    grid = np.asarray(Image.open(grid_file))
    assert grid.shape[0] * 8 == grid.shape[1] * 3  # a row per class, 8 tiles a row: two images, then empty tiles
    assert grid[:, : grid.shape[1] // 4].max() > 0 and grid[:, grid.shape[1] // 4 + 1 :].max() == 0


def test_3d_augment_and_dataset(prepared_3d, tmp_path):
    ckpt = tiny_checkpoint(prepared_3d, tmp_path / "tiny3d.pt")
    result = augment(prepared_3d, ckpt, tmp_path / "aug", policy="per_class", num_per_class={"healthy": 1}, **FAST)
    assert result.complete and result.generated == 1
    ds = MixedDataset(tmp_path / "aug", real=False)
    item = ds[0]
    assert len(ds) == 1 and item["image"].shape == (1, 12, 12, 12) and item["label"] == 0 and item["synthetic"]


def test_callable_api_stage_and_light_import(prepared_2d, ckpt_2d, tmp_path):
    result = medaug.augment(prepared_2d, ckpt_2d, tmp_path / "api", policy="balance", **FAST)
    assert result.complete and callable(medaug.augment) and medaug.augment.MixedDataset is MixedDataset
    cfg = compose_cfg(
        "augment",
        tmp_path,
        [
            f"input={prepared_2d}",
            f"ckpt_path={ckpt_2d}",
            "tracking=none",
            "augment.policy=per_class",
            "augment.num_per_class=1",
            "augment.steps=2",
            "augment.rank=0",
            "augment.world_size=1",
        ],
    )
    first, second = augment_stage.run(cfg), augment_stage.run(cfg)
    assert first == {**second, "generated": 3} and second["generated"] == 0 and second["synthetic"] == 3
    assert (tmp_path / "augment" / "manifest.csv").is_file()
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, medaug; print('torch' in sys.modules)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert probe.stdout.strip() == "False"


def evaluation(out, ckpt, gain, std, of_ckpt=True):
    """A samples folder of ``ckpt`` (or of another checkpoint) in ``out/samples`` and a finished
    evaluation of it in ``out/eval`` whose augmentation gain is ``gain ± std`` (accuracy)."""
    from medaug.atomic import atomic_folder
    from medaug.model import file_id
    from medaug.sampling import samples_id, save_samples

    rows = [{"index": i, "label": i % 3, "class_name": "abc"[i % 3]} for i in range(3)]
    info = {"checkpoint_id": file_id(ckpt) if of_ckpt else "0123456789ab"}
    save_samples(out / "samples", torch.zeros(3, 1, 16, 16), rows, info, ["a", "b", "c"])
    metrics = {"utility/aug_gain_acc": gain, "utility/aug_gain_acc_std": std, "utility/real_acc": 0.825}
    with atomic_folder(out / "eval") as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics))
        (tmp / "privacy.json").write_text(json.dumps({"samples_id": samples_id(out / "samples")}))


def augment_cfg(prepared, ckpt, out, *extra):
    return compose_cfg(
        "augment",
        out,
        [
            f"input={prepared}",
            f"ckpt_path={ckpt}",
            "tracking=none",
            "augment.policy=per_class",
            "augment.num_per_class=1",
            "augment.steps=2",
            *extra,
        ],
    )


def test_negative_augmentation_gain_stops_the_stage_with_one_line(prepared_2d, ckpt_2d, tmp_path):
    evaluation(tmp_path, ckpt_2d, gain=-0.079, std=0.02)  # the 0.746 against 0.825
    with pytest.raises(
        ValueError,
        match=r"utility/aug_gain_acc=-0\.079, interval \[-0\.099, -0\.059\].*"
        r"augment\.ignore_utility=true",
    ):
        augment_stage.run(augment_cfg(prepared_2d, ckpt_2d, tmp_path))
    assert not (tmp_path / "augment").exists()  # stopped before generating anything
    args = [f"input={prepared_2d}", f"ckpt_path={ckpt_2d}", "tracking=none", f"paths.output_dir={tmp_path}"]
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.augment", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert r.returncode == 2 and len(errors) == 1 and "interval [-0.099, -0.059]" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_ignore_utility_augments_despite_a_negative_gain(prepared_2d, ckpt_2d, tmp_path):
    evaluation(tmp_path, ckpt_2d, gain=-0.079, std=0.02)
    result = augment_stage.run(augment_cfg(prepared_2d, ckpt_2d, tmp_path, "augment.ignore_utility=true"))
    assert result["complete"] and result["synthetic"] == 3
    assert result["utility"].startswith("utility checked: negative gain utility/aug_gain_acc=-0.079")


@pytest.mark.parametrize("case", ["none", "other_checkpoint", "interval_holds_zero", "positive"])
def test_augment_proceeds_without_a_negative_evaluation_of_its_checkpoint(prepared_2d, ckpt_2d, tmp_path, case):
    if case == "other_checkpoint":
        evaluation(tmp_path, ckpt_2d, gain=-0.079, std=0.02, of_ckpt=False)
    elif case != "none":
        evaluation(tmp_path, ckpt_2d, gain=-0.02 if case == "interval_holds_zero" else 0.05, std=0.03)
    result = augment_stage.run(augment_cfg(prepared_2d, ckpt_2d, tmp_path))
    assert result["complete"] and result["synthetic"] == 3
    expected = {
        "none": "utility was not checked: no evaluation in",
        "other_checkpoint": "utility was not checked: the evaluation in",
        "interval_holds_zero": "utility checked: utility/aug_gain_acc=-0.020, interval [-0.050, +0.010]",
        "positive": "utility checked: utility/aug_gain_acc=+0.050, interval [+0.020, +0.080]",
    }[case]
    assert result["utility"].startswith(expected), result["utility"]
