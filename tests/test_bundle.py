"""The generator as a MONAI bundle (medaug export_bundle): layout, metadata, verify_metadata offline, ckpt_export,
the inference config against `medaug sample`, no path or PHI inside."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medaug.bundle import (
    METADATA_SCHEMA,
    evaluation_summary,
    export_torchscript,
    pack_inputs,
    verify_bundle,
)
from medaug.export import ExportError
from medaug.model import load_checkpoint
from medaug.sampling import load_samples
from pipelines import cli, evaluate, export_bundle, prepare, sample, train

from .conftest import TINY, compose_cfg

pytestmark = pytest.mark.slow  # one tiny job (prepare, train, sample, evaluate, export_bundle) of ~25 s, shared

REPO = Path(__file__).resolve().parents[1]
SEED = 11


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny 2D demo: prepare, train (4 steps), sample 2 per class (seed 11, ddim 3 steps), evaluate, export_bundle."""
    out = tmp_path_factory.mktemp("bundlejob")
    overrides = [
        "experiment=demo_2d",
        *TINY,
        "data.demo.size=12",
        "data.image_size=[12,12]",
        "sample.num_per_class=2",
        f"sample.seed={SEED}",
        "sample.sampler=ddim",
        "sample.steps=3",
        "evaluate.utility.seeds=[]",
        "export_bundle.num_per_class=2",
        f"export_bundle.eval_dir={out / 'eval'}",
        "export_bundle.authors=medaug tests",
    ]
    for stage in (prepare, train, sample, evaluate):
        stage.run(compose_cfg(stage.__name__.split(".")[-1], out, overrides))
    result = export_bundle.run(compose_cfg("export_bundle", out, overrides))
    return out, Path(result["bundle_dir"]), result


def test_layout_metadata_and_weights(job):
    import monai

    out, bundle, result = job
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == [
        "DONE",
        "LICENSE",
        "configs/inference.json",
        "configs/metadata.json",
        "docs/README.md",
        "docs/license.txt",
        "models/model.pt",
        "models/model.ts",
    ]
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert set(METADATA_SCHEMA["required"]) <= set(meta)
    assert meta["monai_version"] == monai.__version__ and meta["numpy_version"] == np.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0] and meta["name"] == "medaug_demo_2d"
    assert meta["class_names"] == ["healthy", "multi_lesion", "single_lesion"] and meta["image_shape"] == [12, 12]
    inputs, pred = meta["network_data_format"]["inputs"], meta["network_data_format"]["outputs"]["pred"]
    assert (inputs["image"]["num_channels"], inputs["image"]["spatial_shape"]) == (1, [12, 12])
    assert (pred["num_channels"], pred["spatial_shape"]) == (1, [12, 12]) and pred["channel_def"] == {"0": "epsilon"}
    assert inputs["class_labels"]["channel_def"]["1"] == "multi_lesion" and inputs["class_labels"]["value_range"] == [
        0,
        3,
    ]
    assert inputs["timesteps"]["value_range"] == [0, 999] and "not for diagnosis" in meta["intended_use"]
    # the evaluation and the privacy verdict, as the eval folder has them
    privacy = json.loads((out / "eval" / "privacy.json").read_text())
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert meta["privacy"]["verdict"] == privacy["verdict"] == result["privacy_verdict"]
    assert meta["eval_metrics"] and all(meta["eval_metrics"][k] == metrics[k] for k in meta["eval_metrics"])
    assert "privacy/copy_rate" in meta["eval_metrics"] and meta["privacy"]["deidentification"] == "gate policy `refuse`"
    readme = (bundle / "docs" / "README.md").read_text()
    assert f"verdict **{privacy['verdict']}**" in readme and "`privacy/copy_rate`" in readme
    assert "python -m monai.bundle run --config_file configs/inference.json" in readme
    assert "data-use agreement" in (bundle / "LICENSE").read_text()
    # models/model.pt: the EMA weights, tensors only
    ckpt = load_checkpoint(out / "train" / "checkpoints" / "last.pt")
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert meta["checkpoint"] == {"id": ckpt.id, "step": 4, "weights": "ema"}
    assert weights.keys() == ckpt.ema["model"].keys()
    assert all(torch.equal(weights[k], ckpt.ema["model"][k]) for k in weights)
    assert not all(torch.equal(weights[k], ckpt.model[k]) for k in weights)  # not the training weights


def test_verify_metadata_offline_and_refuses_a_missing_key(job, tmp_path, monkeypatch):
    import monai.apps.utils

    _, bundle, _ = job

    def no_network(*args, **kwargs):
        raise AssertionError("verify_metadata tried to download the schema")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", no_network)
    verify_bundle(bundle)  # the schema file is in place: no download
    broken = tmp_path / "broken"
    (broken / "configs").mkdir(parents=True)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    del meta["copyright"]
    meta["network_data_format"]["inputs"]["image"].pop("spatial_shape")
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="copyright|spatial_shape"):
        verify_bundle(broken)


def test_unet_does_not_script_and_ckpt_export_traces_the_packed_network(job, tmp_path):
    from monai.networks.nets import DiffusionModelUNet

    out, bundle, _ = job
    spec = json.loads((bundle / "configs" / "inference.json").read_text())["network_def"]
    unet = DiffusionModelUNet(**{k: v for k, v in spec.items() if k != "_target_"})
    unet.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    unet.eval()
    with pytest.raises(RuntimeError, match="cannot statically infer the expected size of a list"):
        torch.jit.script(unet)  # the attention block's x.reshape(*shape[:2], -1): why the bundle traces instead
    ts = torch.jit.load(str(bundle / "models" / "model.ts"))
    x, t, y = torch.randn(3, 1, 12, 12), torch.tensor([0, 417, 999]), torch.tensor([2, 0, 3])
    with torch.no_grad():
        assert torch.allclose(ts(pack_inputs(x, t, y)), unet(x, t, class_labels=y), atol=1e-5)
    assert b"/" + str(out).strip("/").encode() not in (bundle / "models" / "model.ts").read_bytes()
    # the command docs/README.md gives rebuilds it
    readme = (bundle / "docs" / "README.md").read_text()
    command = readme.split("Rebuild it with\n\n```bash\n")[1].split("```")[0].replace("\\\n", " ")
    assert '--input_shape "[1, 3, 12, 12]"' in command
    args = shlex.split(command.replace("models/model.ts", str(tmp_path / "again.ts")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args[1:]], cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    again = torch.jit.load(str(tmp_path / "again.ts"))
    with torch.no_grad():
        assert torch.allclose(again(pack_inputs(x, t, y)), unet(x, t, class_labels=y), atol=1e-5)
    assert export_torchscript(bundle) == bundle / "models" / "model.ts"


def test_inference_config_gives_the_images_of_medaug_sample(job, tmp_path):
    from monai.bundle import ConfigParser

    out, bundle, _ = job
    images, labels, _, info = load_samples(out / "samples")
    names = info["class_names"]
    # the README's command, from the bundle folder: default requests (2 per class, seed 11, ddim 3 steps)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same rounding
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    cmd += ["--output_dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.stack([np.load(tmp_path / "run" / f"healthy_{SEED}_{i}.npy") for i in range(2)])
    assert sorted(p.name for p in (tmp_path / "run").glob("*.npy")) == sorted(
        f"{n}_{SEED}_{i}.npy" for n in names for i in range(2)
    )
    assert torch.equal(torch.from_numpy(got), images[labels == 0])  # with 1 thread vs 2 here: 9e-8 apart
    # in Python with ConfigParser: class k of `medaug sample` came from seeds 11 + 2k, 11 + 2k + 1
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["output_dir"] = None
    parser["requests"] = [
        {"class": n, "count": 2, "seed": SEED + 2 * k, "sampler": "ddim", "steps": 3} for k, n in enumerate(names)
    ]
    table = parser.get_parsed_content("sample")
    assert table["class"].tolist() == [n for n in names for _ in range(2)]
    assert torch.equal(torch.from_numpy(np.stack(table["image"])), images)


def test_no_path_or_patient_id_in_the_bundle(job):
    out, bundle, _ = job
    patients = {r["patient"] for r in csv.DictReader(open(out / "prepared" / "manifest.csv"))}
    assert patients
    forbidden = [str(out), str(Path.home()), sys.prefix, str(REPO), *patients]
    for path in bundle.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found = [f for f in forbidden if f.encode() in data]
            assert not found, f"{path.relative_to(bundle)} holds {found}"


def test_evaluation_of_another_checkpoint_or_a_latent_model_refused(job, tmp_path):
    out, _, _ = job
    with pytest.raises(ExportError, match="evaluated samples of checkpoint .* not of the exported 0123456789ab"):
        evaluation_summary(out / "eval", "0123456789ab", out / "samples")
    with pytest.raises(ExportError, match="no complete evaluation"):
        evaluation_summary(tmp_path, "0123456789ab", out / "samples")
    over = ["experiment=demo_2d", *TINY, f"ckpt_path={out / 'train' / 'checkpoints' / 'last.pt'}"]
    ckpt = load_checkpoint(out / "train" / "checkpoints" / "last.pt")
    ckpt.meta["latent"] = {"autoencoder_path": "x.pt"}
    from medaug.bundle import write_bundle

    cfg = compose_cfg("export_bundle", tmp_path, over)
    with pytest.raises(ExportError, match="latent diffusion checkpoint"):
        write_bundle(ckpt, tmp_path / "bundle", dict(cfg.export_bundle))
    assert not (tmp_path / "bundle").exists() and "export_bundle" in cli.STAGES


def test_cli_stage_bad_eval_dir_exit_2_one_line_and_no_bundle(job, tmp_path):
    out, _, _ = job
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipelines.cli", "export_bundle", f"paths.output_dir={out}", "tracking=none"]
    cmd += [f"export_bundle.eval_dir={tmp_path}", f"export_bundle.dir={tmp_path / 'bundle'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("medaug export_bundle: error:")]
    assert f"export_bundle.eval_dir={tmp_path}: no complete evaluation there; run `medaug evaluate`" in line
    assert not (tmp_path / "bundle").exists()


def test_3d_checkpoint_bundle_samples_as_the_registry_generator_and_exports(tmp_path):
    """A 3D checkpoint made directly (random weights, no training): the bundle verifies, ckpt_export traces the 3D
    network, and its inference config gives the images medaug's Generator gives for the same seeds."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import DiffusionModelUNet

    from medaug.bundle import write_bundle
    from medaug.model import EMA, save_checkpoint
    from medaug.registry import Generator

    spec = dict(
        _target_="monai.networks.nets.DiffusionModelUNet",
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        num_res_blocks=1,
        channels=[8, 8],
        attention_levels=[False, False],
        num_head_channels=8,
        norm_num_groups=8,
        num_class_embeds=3,
    )
    torch.manual_seed(0)
    net = DiffusionModelUNet(**{k: v for k, v in spec.items() if k != "_target_"})
    scheduler = {"_target_": "monai.networks.schedulers.DDPMScheduler", "num_train_timesteps": 1000}
    meta = dict(
        class_names=["a", "b"],
        spatial_dims=3,
        image_shape=[8, 8, 8],
        window=dict(lo=0.0, hi=1.0, unit="a.u."),
        affine=np.diag([2.0, 2.0, 3.0, 1.0]).tolist(),
        modality="MR",
    )
    path = save_checkpoint(
        tmp_path / "c.pt",
        model=net,
        ema=EMA(net),
        optimizer=None,
        step=1,
        config={"model": spec, "scheduler": scheduler},
        meta=meta,
    )
    settings = dict(
        name="mr3d",
        version="1.0.0",
        weights="ema",
        eval_dir=None,
        torchscript=True,
        num_per_class=1,
        seed=4,
        guidance=1.5,
        sampler="ddim",
        steps=2,
        authors="t",
        copyright="t",
        intended_use="tests",
        license="CC0-1.0",
    )
    bundle = write_bundle(load_checkpoint(path), tmp_path / "bundle", settings)
    meta_json = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta_json["network_data_format"]["inputs"]["image"]["spatial_shape"] == [8, 8, 8]
    assert meta_json["spacing_mm"] == [2.0, 2.0, 3.0] and meta_json["privacy"]["verdict"] == "not audited"
    assert (bundle / "LICENSE").read_text() == "CC0-1.0\n"
    x, t, y = torch.randn(2, 1, 8, 8, 8), torch.tensor([1, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        ts = torch.jit.load(str(bundle / "models" / "model.ts"))
        assert torch.allclose(ts(pack_inputs(x, t, y)), net.eval()(x, t, class_labels=y), atol=1e-5)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"], parser["output_dir"] = str(bundle), None
    table = parser.get_parsed_content("sample")
    want = Generator(path)
    for name in ("a", "b"):
        (got,) = table["image"][table["class"] == name]
        assert got.shape == (1, 8, 8, 8)
        assert torch.equal(torch.from_numpy(got)[None], want.sample(name, 1, 4, guidance=1.5, sampler="ddim", steps=2))
