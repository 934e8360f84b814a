"""evaluate: synthetic images + held-out real data → metrics.json and MLflow metrics.

    python -m pipelines.evaluate experiment=demo_2d
"""

from __future__ import annotations

import json
import math

import torch
from omegaconf import DictConfig

from medaug.dataset import load_info, load_split
from medaug.io import atomic_folder
from medaug.metrics import make_classifier, realism_metrics, train_classifier
from medaug.sampling import load_samples, save_grid
from pipelines.common import log, make_tracker, path, stage_main


def label_classifier(prepared_dir, train_x, train_y, num_classes: int, steps: int, seed: int):
    """The label-fidelity classifier, trained once per dataset and setting, cached beside the data."""
    cache = prepared_dir / "classifiers" / f"label_clf_s{steps}_seed{seed}.pt"
    if cache.exists():
        model = make_classifier(train_x.shape[2:], num_classes)
        model.load_state_dict(torch.load(cache, map_location="cpu"))
        return model.eval()
    model = train_classifier(train_x, train_y, num_classes, steps=steps, seed=seed)
    cache.parent.mkdir(exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model


def run(cfg: DictConfig) -> dict:
    e = cfg.evaluate
    synth_x, synth_y, _, info = load_samples(path(cfg.paths.samples_dir))
    prepared = load_info(path(cfg.paths.prepared_dir))
    if prepared.class_names != info["class_names"]:
        raise ValueError(f"samples have classes {info['class_names']} but {prepared.root} has {prepared.class_names}")
    train_x, train_y = load_split(prepared.root, "train")
    test_x, test_y = load_split(prepared.root, e.real_split)
    if len(test_x) == 0:
        raise ValueError(f"{prepared.root}: split {e.real_split!r} is empty; set evaluate.real_split=val or train")
    clf = label_classifier(prepared.root, train_x, train_y, prepared.num_classes, e.classifier_steps, e.seed)
    metrics = realism_metrics(clf, train_x, train_y, test_x, test_y, synth_x, synth_y, prepared.class_names,
                              n_pairs=e.n_pairs, seed=e.seed)
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}

    out_dir = path(cfg.paths.eval_dir)
    with atomic_folder(out_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps({k: (v if math.isfinite(v) else None)
                                                      for k, v in sorted(metrics.items())}, indent=2))
        save_grid(test_x, test_y, prepared.class_names, tmp / "real_grid.png")
    tracker = make_tracker(cfg)
    tracker.start(run_name=cfg.name, run_id=info.get("mlflow_run_id"), tags={"medaug.job": cfg.name})
    tracker.log_metrics(finite)
    tracker.log_artifact(out_dir / "metrics.json", "evaluation")
    tracker.log_artifact(out_dir / "real_grid.png", "evaluation")
    tracker.end()
    for key in sorted(metrics):
        if "/" not in key.split("/", 1)[1]:
            log.info("  %-28s %.4f", key, metrics[key])
    log.info("metrics written to %s", out_dir / "metrics.json")
    return metrics


main = stage_main("evaluate", run)

if __name__ == "__main__":
    main()
