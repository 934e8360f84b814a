"""Every stage and experiment, end to end on tiny data; the CLI; multirun; error exits."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medaug.data import load_split
from medaug.io import read_volume
from medaug.model import load_checkpoint, network_from_spec
from medaug.sampling import load_samples
from pipelines import evaluate, export, prepare, sample, train

from .conftest import CONF_DIR, TINY, WINDOW, compose_cfg

STAGES = {"prepare": prepare, "train": train, "sample": sample, "evaluate": evaluate, "export": export}
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
COMPOSE_ONLY = {"ldm_3d_ct128"}  # sized for one 80 GB GPU; composed in tests/test_latent.py, not smoke-run
REPO = CONF_DIR.parent


def run_all(out: Path, overrides):
    return {name: mod.run(compose_cfg(name, out, overrides)) for name, mod in STAGES.items()}


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e not in COMPOSE_ONLY])
def test_every_experiment_composes_and_smoke_runs(tmp_path, experiment):
    cfg = compose_cfg("train", tmp_path, [f"experiment={experiment}"])
    assert cfg.name == experiment and cfg.model.spatial_dims == cfg.data.spatial_dims
    autoencoder = ["autoencoder.max_steps=4"] if cfg.get("autoencoder") else []  # latent experiments
    size = ["data.demo.size=12", "data.image_size=" + ("[12,12]" if cfg.data.spatial_dims == 2 else "[12,12,12]")]
    seg = ["evaluate.segmentation.steps=5", "evaluate.segmentation.seeds=[0]"]  # tiny segmenters (mask experiments)
    base = []
    if cfg.model.get("condition") == "controlnet":  # its base: a class model of the same data, trained first
        base_experiment = Path(cfg.model.controlnet.base_ckpt).parents[2].name  # <output_dir>/../demo_2d/train/...
        base_job = [f"experiment={base_experiment}", *TINY, *autoencoder, *size]
        base_out = tmp_path / "base"
        prepare.run(compose_cfg("prepare", base_out, base_job))
        base = [f"model.controlnet.base_ckpt={train.run(compose_cfg('train', base_out, base_job))['checkpoint']}"]
    results = run_all(tmp_path, [f"experiment={experiment}", *TINY, *autoencoder, *size, *seg, *base])
    assert results["train"]["train/step"] == 4
    ckpt = load_checkpoint(tmp_path / "train" / "checkpoints" / "last.pt")
    spec = ckpt.config["model"].get("unet", ckpt.config["model"])  # a ControlNet's: its base UNet's spec
    assert spec["num_class_embeds"] == 4  # 3 demo classes + the null class
    images, labels, rows, info = load_samples(tmp_path / "samples")
    per_class = [0, 0, 1, 1, 2, 2]
    if str(cfg.sample.masks).startswith("prepared:"):  # one image per mask of the split, with its class
        per_class = load_split(tmp_path / "prepared", cfg.sample.masks.split(":")[1])[1].tolist()
    assert images.shape[2:] == tuple([12] * cfg.data.spatial_dims) and labels.tolist() == per_class
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["fidelity/label_acc"] <= 1
    card = (tmp_path / "export" / "DATA_CARD.md").read_text()
    assert info["checkpoint_id"] in card and "fidelity/label_acc" in card  # the checkpoint the samples came from
    if cfg.get("ckpt_path") == "best_private":  # memorisation-aware: a probed checkpoint, shared
        assert info["checkpoint_id"] != ckpt.id and (tmp_path / "train" / "checkpoints" / "probes.json").is_file()
    else:
        assert info["checkpoint_id"] == ckpt.id
    pairs = cfg.model.get("condition", "class") != "class"  # image/label pairs go out as nnU-Net's imagesTr/labelsTr
    folders = ("imagesTr", "labelsTr") if pairs else ("images",)
    assert [len(list((tmp_path / "export" / f).glob("*.nii.gz"))) for f in folders] == [len(labels)] * len(folders)


def test_stages_share_one_mlflow_run_in_local_store(tmp_path):
    from mlflow.tracking import MlflowClient

    run_all(tmp_path, ["experiment=demo_2d", *TINY, "tracking=mlflow"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medaug-demo_2d").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert {"train/loss", "fidelity/label_acc", "diversity/msssim/healthy"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "samples", "evaluation", "export"} <= artifacts
    inputs = {t.value: i.dataset for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert set(inputs) == {"training", "synthetic"}  # lineage: the prepared set made the model made the synthetic set
    assert json.loads(inputs["synthetic"].source)["trained_on"].startswith(inputs["training"].digest)
    assert (tmp_path / "mlartifacts").is_dir()


def test_train_resumes_in_same_run_dir(tmp_path):
    overrides = ["experiment=demo_2d", *TINY]
    prepare.run(compose_cfg("prepare", tmp_path, overrides))
    train.run(compose_cfg("train", tmp_path, overrides))
    result = train.run(compose_cfg("train", tmp_path, [*overrides, "training.max_steps=6"]))
    assert result["train/step"] == 6


def test_sample_counts_by_class_name(tmp_path):
    overrides = ["experiment=demo_2d", *TINY]
    for name in ("prepare", "train"):
        STAGES[name].run(compose_cfg(name, tmp_path, overrides))
    sample.run(compose_cfg("sample", tmp_path, [*overrides, "sample.num_per_class={healthy:1,single_lesion:3}"]))
    _, labels, rows, _ = load_samples(tmp_path / "samples")
    assert [r["class_name"] for r in rows] == ["healthy"] + ["single_lesion"] * 3
    with pytest.raises(ValueError, match="unknown classes"):
        sample.run(compose_cfg("sample", tmp_path, [*overrides, "sample.num_per_class={tumour:2}"]))


def test_export_and_train_refuse_what_no_longer_matches(tmp_path):
    from medaug.export import ExportError

    overrides = ["experiment=demo_2d", *TINY]
    run_all(tmp_path, overrides)
    sample.run(compose_cfg("sample", tmp_path, [*overrides, "sample.seed=99"]))  # new samples, old evaluation
    with pytest.raises(ExportError, match="evaluated other samples"):
        export.run(compose_cfg("export", tmp_path, overrides))
    evaluate.run(compose_cfg("evaluate", tmp_path, overrides))
    assert export.run(compose_cfg("export", tmp_path, overrides))["samples"] == 6
    prepare.run(compose_cfg("prepare", tmp_path, [*overrides, "data.image_size=[16,16]"]))  # re-prepared smaller
    with pytest.raises(ValueError, match=r"trained with image_shape \[32, 32\], but .* has \[16, 16\]"):
        train.run(compose_cfg("train", tmp_path, [*overrides, "data.image_size=[16,16]"]))
    prepare.run(compose_cfg("prepare", tmp_path, [*overrides, "data.image_size=[15,16]"]))
    with pytest.raises(ValueError, match=r"halves the image 1x.*\[15, 16\] must divide by 2"):
        train.run(compose_cfg("train", tmp_path, [*overrides, "data.image_size=[15,16]"]))


def test_own_labels_without_data_labels_group_are_refused_before_any_demo_data(tmp_path):
    cfg = compose_cfg("prepare", tmp_path, ["experiment=demo_2d", *TINY, f"data.labels={tmp_path}/study/labels.csv"])
    with pytest.raises(
        FileNotFoundError,
        match=r"study/labels.csv: labels file not found; for your own data add "
        r"data=labels",
    ):
        prepare.run(cfg)
    assert not (tmp_path / "raw").exists()  # no phantoms written


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_and_multirun(tmp_path):
    common = ["experiment=demo_2d", *TINY, f"paths.output_dir={tmp_path}/job"]
    r = _cli(["pipelines.cli", "prepare", *common], REPO)
    assert r.returncode == 0, r.stderr
    r = _cli(
        [
            "pipelines.train",
            "-m",
            *common,
            "training.max_steps=2,3",
            f"paths.train_dir={tmp_path}/sweep/" + "${training.max_steps}",
        ],
        REPO,
    )
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(tmp_path / "sweep" / "2" / "checkpoints" / "last.pt").step == 2
    assert load_checkpoint(tmp_path / "sweep" / "3" / "checkpoints" / "last.pt").step == 3


def test_a_gpu_stage_turns_on_tf32_and_cudnn_autotuning(monkeypatch):
    from omegaconf import OmegaConf

    from pipelines.common import device_of

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    flags = [
        (torch.backends.cudnn, "benchmark"),
        (torch.backends.cudnn, "allow_tf32"),
        (torch.backends.cuda.matmul, "allow_tf32"),
    ]
    saved = [getattr(module, name) for module, name in flags]
    try:
        for module, name in flags:
            setattr(module, name, False)
        assert device_of(OmegaConf.create({"training": {"device": "cpu"}})) == torch.device("cpu")
        assert current == [] and not any(getattr(module, name) for module, name in flags)
        assert device_of(OmegaConf.create({"training": {"device": "cuda:1"}})) == torch.device("cuda:1")
        assert current == [torch.device("cuda:1")] and all(getattr(module, name) for module, name in flags)
    finally:
        for (module, name), value in zip(flags, saved):
            setattr(module, name, value)


@pytest.mark.slow
def test_bad_input_exits_nonzero_with_one_line(tmp_path):
    r = _cli(["pipelines.train", "experiment=demo_2d", "tracking=none", f"paths.output_dir={tmp_path}"], REPO)
    assert r.returncode == 2
    assert "medaug train: error:" in r.stderr and "run `medaug prepare` first" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli(["pipelines.cli", "nonsense"], REPO)
    assert r.returncode == 2 and "usage: medaug" in r.stderr
    r = _cli(["pipelines.prepare", "data=labels", "tracking=none", f"paths.output_dir={tmp_path}"], REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "medaug prepare: error: data.labels has no value; give one on the command line" in r.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.spatial_dims=3", "data.image_size=[8,8,8]", "data.pixdim=[2,2]"],
            r"data.pixdim=\[2, 2\] has 2 entries; data.spatial_dims=3 needs 3 \(X, Y, Z\)",
        ),
        (
            ["data.image_size=[32,32,32]"],
            r"data.image_size=\[32, 32, 32\] has 3 entries; data.spatial_dims=2 needs 2 "
            r"\(X, Y\)",
        ),
    ],
)
def test_prepare_checks_image_size_and_pixdim_against_spatial_dims(tmp_path, overrides, message):
    cfg = compose_cfg("prepare", tmp_path, ["experiment=demo_2d", "tracking=none", *overrides])
    with pytest.raises(ValueError, match=message):
        prepare.run(cfg)
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "raw").exists()


@pytest.mark.slow
def test_ddp_two_cpu_ranks_match_one_process_with_double_batch(tmp_path):
    common = [
        "experiment=demo_2d",
        *TINY,
        f"paths.output_dir={tmp_path}",
        "training.max_steps=3",
        "training.grad_clip=null",
    ]
    prepare.run(compose_cfg("prepare", tmp_path, common))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "pipelines.train",
            *common,
            "training.batch_size=2",
            f"paths.train_dir={tmp_path}/ddp",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    train.run(compose_cfg("train", tmp_path, [*common, "training.batch_size=4", f"paths.train_dir={tmp_path}/one"]))
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    assert ddp.step == one.step == 3
    # float sums in a different order (all-reduce of two half-batch means) differ by ~1e-5 after three Adam
    # steps; a different batch or different noise would move weights by ~lr = 5e-4 per step
    for name, w in one.model.items():
        torch.testing.assert_close(ddp.model[name], w, atol=1e-4, rtol=1e-3)
    torch.manual_seed(one.config["seed"])  # the initial weights, as train builds them
    init = network_from_spec(one.config["model"]).state_dict()
    moved = max(float((one.model[k].float() - init[k].float()).abs().max()) for k in one.model)
    assert moved > 1e-3  # training moved the weights far more than the tolerance


@pytest.mark.slow
def test_sampling_sharded_over_two_ranks_equals_one_process(tmp_path):
    common = ["experiment=demo_2d", *TINY, f"paths.output_dir={tmp_path}"]
    prepare.run(compose_cfg("prepare", tmp_path, common))
    train.run(compose_cfg("train", tmp_path, common))
    opts = ["sample.num_per_class=3", "sample.batch_size=2", "sample.steps=3", "sample.sampler=dpmpp_2m_sde"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "pipelines.sample",
            *common,
            *opts,
            f"paths.samples_dir={tmp_path}/two",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sample.run(compose_cfg("sample", tmp_path, [*common, *opts, f"paths.samples_dir={tmp_path}/one"]))
    two, labels2, rows2, _ = load_samples(tmp_path / "two")
    one, labels1, rows1, _ = load_samples(tmp_path / "one")
    assert len(one) == 9 and torch.equal(labels1, labels2) and rows1 == rows2
    torch.testing.assert_close(two, one, atol=1e-6, rtol=0)


def test_slurm_launcher_config_composes(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "experiment=demo_2d", f"paths.output_dir={tmp_path}"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.timeout_min == 240 and launcher.tasks_per_node == 1


def test_share_export_filters_planted_copies_and_regenerates(tmp_path):
    from medaug.data import load_split
    from medaug.sampling import save_samples

    overrides = ["experiment=demo_2d", *TINY, "evaluate.utility.seeds=[]"]
    for name in ("prepare", "train", "sample"):
        STAGES[name].run(compose_cfg(name, tmp_path, overrides))
    images, labels, rows, info = load_samples(tmp_path / "samples")
    train_x, train_y = load_split(tmp_path / "prepared", "train")
    planted = [int((train_y == int(y)).nonzero()[0]) for y in labels[:2]]  # two training images as "samples"
    images[:2] = train_x[planted]
    save_samples(tmp_path / "samples", images, rows, info, info["class_names"])
    evaluate.run(compose_cfg("evaluate", tmp_path, overrides))
    # the planted copies fail the audit (copy rate 2/6): the share gate needs its override to test the filter
    export.run(compose_cfg("export", tmp_path, [*overrides, "export.profile=share", "export.allow_failed_audit=true"]))
    manifest = list(csv.DictReader(open(tmp_path / "export" / "manifest.csv")))
    assert len(manifest) == len(rows)  # the two copies were replaced by new samples of their class
    assert sorted(m["class_name"] for m in manifest) == sorted(r["class_name"] for r in rows)
    card = (tmp_path / "export" / "DATA_CARD.md").read_text()
    assert "2 of 6 samples dropped and 2 regenerated" in card
    exported = torch.stack([torch.from_numpy(read_volume(tmp_path / "export" / m["path"]).array) for m in manifest])
    hu_train = torch.from_numpy(WINDOW.to_source(train_x[planted].numpy()))
    for copy in hu_train:
        assert min(float((copy[0] - e[:, :, 0]).abs().max()) for e in exported) > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["cifti", "singular_affine"])
def test_prepare_on_an_affine_less_or_singular_nifti_exits_2_with_one_line_naming_it(tmp_path, bad):
    """Before: a CIFTI file raised AttributeError and a singular affine MONAI's RuntimeError: tracebacks, exit 1."""
    import shutil

    import nibabel as nib
    import numpy as np

    from medaug.io import write_nifti

    raw, rows = tmp_path / "raw", ["path,patient_id,label"]
    raw.mkdir()
    for i in range(6):
        write_nifti(raw / f"img{i}.nii.gz", np.random.default_rng(i).normal(size=(8, 8, 3)), np.eye(4))
        rows.append(f"img{i}.nii.gz,p{i},{'ab'[i % 2]}")
    if bad == "cifti":
        shutil.copy(Path(nib.__file__).parent / "tests" / "data" / "row_major.dconn.nii", raw / "bad.dconn.nii")
        rows[1] = "bad.dconn.nii,p0,a"
        message = r"bad.dconn.nii: a CIFTI-2 image (\(dconn.nii\) )?has no affine"
    else:
        hdr = nib.Nifti1Image(np.ones((8, 8, 3), np.float32), np.eye(4)).header
        hdr["sform_code"], hdr["qform_code"], hdr["srow_y"] = 1, 0, [0, 0, 0, 0]
        nib.save(nib.Nifti1Image(np.ones((8, 8, 3), np.float32), None, hdr), raw / "bad.nii.gz")
        rows[1] = "bad.nii.gz,p0,a"
        message = r"bad.nii.gz: its affine \(voxel → mm, from the sform\) is singular.*fix the header's sform/qform"
    (raw / "labels.csv").write_text("\n".join(rows) + "\n")
    r = _cli(
        [
            "pipelines.prepare",
            "data=labels",
            f"data.labels={raw / 'labels.csv'}",
            "data.image_size=[8,8]",
            "tracking=none",
            f"paths.output_dir={tmp_path}/job",
        ],
        REPO,
    )
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("medaug prepare: error: ") and re.search(message, last), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "job" / "prepared").exists()


def _files(root: Path) -> dict:
    """Every output file of a job (not Hydra's own logs) with its mtime."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "hydra" not in p.parts}


def test_run_does_the_whole_job_then_skips_what_is_complete(tmp_path, capsys):
    from pipelines import run

    overrides = ["experiment=demo_2d", *TINY, "evaluate.utility.seeds=[]"]
    first = run.run(compose_cfg("run", tmp_path, overrides))
    assert first["ran"] == ["prepare", "train", "sample", "evaluate", "export"] and first["skipped"] == []
    assert len(list((tmp_path / "export" / "images").glob("*.nii.gz"))) == 6
    assert first["results"]["train"]["train/step"] == 4
    files = _files(tmp_path)
    capsys.readouterr()

    again = run.run(compose_cfg("run", tmp_path, overrides))
    assert again["ran"] == [] and again["skipped"] == ["prepare", "train", "sample", "evaluate", "export"]
    assert again["results"]["export"] == first["results"]["export"]
    assert _files(tmp_path) == files  # nothing rewritten
    out = capsys.readouterr().out  # the job's summary, although export did not run again
    assert f"Synthetic dataset : {tmp_path / 'export'}  (6 images)" in out and "Data card" in out

    # new sample settings: sample again and everything after it; prepare and train stay
    other = run.run(compose_cfg("run", tmp_path, [*overrides, "sample.seed=7"]))
    assert other["ran"] == ["sample", "evaluate", "export"] and other["skipped"] == ["prepare", "train"]
    _, _, rows, _ = load_samples(tmp_path / "samples")
    assert [int(r["seed"]) for r in rows] == list(range(7, 13))
    # a folder rewritten outside `medaug run` (settings unknown) is not trusted: it and the stages after it run again
    evaluate.run(compose_cfg("evaluate", tmp_path, [*overrides, "sample.seed=7", "evaluate.n_pairs=2"]))
    assert run.run(compose_cfg("run", tmp_path, [*overrides, "sample.seed=7"]))["ran"] == ["evaluate", "export"]


def test_train_logs_only_its_own_params(tmp_path, monkeypatch):
    from medaug.tracking import NullTracker

    logged = {}

    class Recorder(NullTracker):
        def log_params(self, params):
            logged.update(params)

    overrides = ["experiment=demo_2d", *TINY]
    prepare.run(compose_cfg("prepare", tmp_path, overrides))
    monkeypatch.setattr(train, "make_tracker", lambda cfg: Recorder())
    train.run(compose_cfg("train", tmp_path, [*overrides, "sample.num_per_class=3"]))
    assert logged["training.max_steps"] == "4" and "latent.train_if_missing" in logged and "ckpt_path" in logged
    sections = {key.split(".")[0] for key in logged}
    assert not sections & {"prepare", "sample", "evaluate", "export", "augment", "input", "output"}


@pytest.mark.slow
def test_run_stops_at_the_failing_stage_with_one_line(tmp_path):
    # 15 pixels do not halve: train refuses after prepare, and nothing after train runs
    r = _cli(
        [
            "pipelines.cli",
            "run",
            "experiment=demo_2d",
            *TINY,
            "data.image_size=[15,16]",
            f"paths.output_dir={tmp_path}",
        ],
        REPO,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("medaug run: error: ") and "must divide by 2" in errors[0]
    assert (tmp_path / "prepared" / "DONE").is_file()
    assert not (tmp_path / "train" / "checkpoints" / "last.pt").exists() and not (tmp_path / "samples").exists()
