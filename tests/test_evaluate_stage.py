"""The evaluate stage end to end on planted synthetic sets: files, verdict, per-sample scores, MLflow."""

import csv
import json

import pytest
import torch

from medaug.data import load_info, load_split, read_manifest
from medaug.privacy import copy_filter, read_copy_scores
from medaug.sampling import save_samples
from pipelines import evaluate

from .conftest import compose_cfg

FAST = [
    "evaluate.classifier_steps=20",
    "evaluate.utility.seeds=[0]",
    "evaluate.utility.steps=5",
    "evaluate.n_pairs=4",
    "evaluate.fidelity.kid_subsets=5",
]


def planted_samples(prepared, splits, out):
    """A samples folder whose "synthetic" images are the real images of ``splits``."""
    info = load_info(prepared)
    parts = [load_split(prepared, s) for s in splits]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    rows = [dict(index=i, label=int(v), class_name=info.class_names[int(v)]) for i, v in enumerate(y)]
    save_samples(
        out, x, rows, dict(class_names=info.class_names, checkpoint_id="planted", mlflow_run_id=None), info.class_names
    )
    return x


def run_eval(tmp_path, prepared, overrides=()):
    cfg = compose_cfg(
        "evaluate",
        tmp_path,
        [f"paths.prepared_dir={prepared}", f"paths.samples_dir={tmp_path / 's'}", "tracking=none", *FAST, *overrides],
    )
    return evaluate.run(cfg)


def test_training_set_as_synthetic_fails_and_writes_the_copy_filter_inputs(tmp_path, prepared_2d):
    planted_samples(prepared_2d, ["train"], tmp_path / "s")
    result = run_eval(tmp_path, prepared_2d)
    assert result["privacy/verdict"] == "fail" and result["privacy/copy_rate"] == 1.0
    out = tmp_path / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["privacy/copy_rate"] == 1.0 and metrics["privacy/memorised_patients"] == 1.0
    assert all(v is None or isinstance(v, float) for v in metrics.values())
    privacy = json.loads((out / "privacy.json").read_text())
    with open(out / "per_sample.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    train_ids = [r["item_id"] for r in read_manifest(prepared_2d) if r["split"] == "train"]
    assert [r["nn_train_item"] for r in rows] == train_ids  # every image finds itself
    keep = copy_filter([float(r["copy_score"]) for r in rows], privacy["threshold"])
    assert not keep.any() and all(r["is_copy"] == "1" for r in rows)
    index, scores, threshold = read_copy_scores(out)
    assert index.tolist() == list(range(len(train_ids))) and threshold == privacy["threshold"]
    assert not copy_filter(scores, threshold).any()
    assert privacy["verdict"] == "fail" and privacy["flags"]["max_copy_rate"] == 0.1 and privacy["reasons"]
    assert "DenseNet classifier trained on the real train split" in privacy["extractors"][0]
    report = (out / "report.md").read_text()
    assert "**FAIL**" in report and "fidelity/fd" in report and "real-vs-real floor" in report
    for name in ("grids.png", "nearest_pairs.png", "nn_histograms.png", "real_grid.png", "synthetic_grid.png"):
        assert (out / name).stat().st_size > 500


def test_heldout_volumes_pass_with_25d_features_and_flags_from_config(tmp_path, prepared_3d):
    planted_samples(prepared_3d, ["val", "test"], tmp_path / "s")
    result = run_eval(tmp_path, prepared_3d)
    assert result["privacy/verdict"] == "pass" and result["privacy/copy_rate"] <= 0.1
    assert {"fidelity/fd_25d", "fidelity/fd_25d_floor", "fidelity/precision_25d/healthy"} <= set(result)
    assert "2.5D" in " ".join(json.loads((tmp_path / "eval" / "privacy.json").read_text())["extractors"])
    strict = run_eval(
        tmp_path,
        prepared_3d,
        ["evaluate.privacy.max_copy_rate=0.0", "evaluate.utility.seeds=[]", "evaluate.real_split=test"],
    )
    assert strict["privacy/verdict"] == "fail" and not any(k.startswith("utility/") for k in strict)


def test_read_copy_scores_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `medaug evaluate`"):
        read_copy_scores(tmp_path)


def test_artifacts_land_under_evaluation_in_mlflow(tmp_path, prepared_2d):
    from mlflow.tracking import MlflowClient

    planted_samples(prepared_2d, ["test"], tmp_path / "s")
    run_eval(tmp_path, prepared_2d, ["tracking=mlflow"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("medaug-default").experiment_id])[0]
    files = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/metrics.json",
        "evaluation/report.md",
        "evaluation/per_sample.csv",
        "evaluation/nearest_pairs.png",
    } <= files
    assert "privacy/copy_rate" in run.data.metrics and run.data.tags["privacy.verdict"] in {"pass", "warn", "fail"}
    assert "DenseNet" in run.data.tags["evaluate.extractor"]


def test_user_encoder_weights_drive_the_features_and_are_named(tmp_path, prepared_2d):
    from medaug.metrics import make_classifier

    planted_samples(prepared_2d, ["test"], tmp_path / "s")
    torch.save(make_classifier((16, 16), 3).state_dict(), tmp_path / "enc.pt")
    net = (
        "evaluate.encoder.network={_target_:monai.networks.nets.DenseNet,spatial_dims:2,in_channels:1,"
        "out_channels:3,init_features:16,growth_rate:8,block_config:[2,2,2],bn_size:2}"
    )
    run_eval(
        tmp_path, prepared_2d, [f"evaluate.encoder.weights={tmp_path / 'enc.pt'}", net, "evaluate.utility.seeds=[]"]
    )
    extractors = json.loads((tmp_path / "eval" / "privacy.json").read_text())["extractors"]
    assert extractors[0].startswith("user encoder monai.networks.nets.DenseNet (weights sha256 ")
    with pytest.raises(ValueError, match="evaluate.encoder.network is not"):
        run_eval(tmp_path, prepared_2d, [f"evaluate.encoder.weights={tmp_path / 'enc.pt'}"])


def test_classifier_cache_lives_beside_the_eval_folder_and_a_second_evaluate_reuses_it(
    tmp_path, prepared_2d, monkeypatch
):
    from medaug import evaluation

    def listing(folder):
        return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}

    planted_samples(prepared_2d, ["test"], tmp_path / "s")
    before = listing(prepared_2d)
    first = run_eval(tmp_path, prepared_2d, ["evaluate.utility.seeds=[]"])
    assert listing(prepared_2d) == before  # evaluate never writes into prepare's folder
    cached = sorted((tmp_path / "eval_classifiers").iterdir())
    assert [p.name[:19] for p in cached] == ["label_clf_s20_seed0"] and cached[0].stat().st_size > 1000
    assert not [p for p in (tmp_path / "eval").iterdir() if p.is_dir()]  # the eval folder holds only its own files

    trained = []
    monkeypatch.setattr(evaluation, "train_classifier", lambda *a, **k: trained.append(1) or pytest.fail("retrained"))
    second = run_eval(tmp_path, prepared_2d, ["evaluate.utility.seeds=[]"])  # the eval folder is rewritten ...
    assert not trained and sorted((tmp_path / "eval_classifiers").iterdir()) == cached  # ... the cache is reused
    assert {k: v for k, v in second.items() if k != "privacy/verdict"} == pytest.approx(
        {k: v for k, v in first.items() if k != "privacy/verdict"}, nan_ok=True
    )
    with pytest.raises(pytest.fail.Exception, match="retrained"):  # other settings: another classifier
        run_eval(tmp_path, prepared_2d, ["evaluate.utility.seeds=[]", "evaluate.classifier_steps=21"])


def test_settings_come_from_the_plain_evaluate_section_and_refuse_unknown_keys(tmp_path):
    from omegaconf import OmegaConf

    from medaug.evaluation import EvalSettings

    section = OmegaConf.to_container(
        compose_cfg("evaluate", tmp_path, ["evaluate.real_split=test"]).evaluate, resolve=True
    )
    s = EvalSettings.from_dict(section)
    assert s.real_split == ("test",) and s.utility.seeds == (0, 1) and s.utility.steps == s.classifier_steps == 400
    assert s.encoder.weights is None and s.privacy.flags.max_copy_rate == 0.1 and s.fidelity["pr_k"] == 3
    weights = EvalSettings.from_dict(dict(section, encoder=dict(section["encoder"], weights="enc.pt")))
    assert weights.encoder.weights.is_absolute() and weights.encoder.weights.name == "enc.pt"
    with pytest.raises(ValueError, match="evaluate.privacy.max_copy: unknown setting"):
        EvalSettings.from_dict(dict(section, privacy=dict(section["privacy"], max_copy=0.2)))
