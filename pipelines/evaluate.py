"""evaluate: synthetic images + held-out real data → eval/ (metrics, report, pictures) and MLflow.

    python -m pipelines.evaluate experiment=demo_2d
    medaug evaluate experiment=demo_3d evaluate.privacy.max_copy_rate=0.05 evaluate.utility.seeds=[0,1,2]
    medaug evaluate evaluate.encoder.weights=my_encoder.pt \
        'evaluate.encoder.network={_target_: monai.networks.nets.DenseNet121, spatial_dims: 2,
                                  in_channels: 1, out_channels: 2}'

Writes ``metrics.json`` (what MLflow holds), ``privacy.json`` (verdict, reasons, copy threshold),
``per_sample.csv`` (copy score and nearest training item per synthetic sample; export's copy
filter reads these), ``report.md`` and the pictures; all logged under ``evaluation/``. The real-trained classifiers are
cached beside that folder, in ``<paths.eval_dir>_classifiers/`` (the work: :mod:`medaug.evaluation`).
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from medaug.evaluation import EvalSettings, evaluate
from medaug.masks import mask_checkpoint
from medaug.tracking import flatten, tracked
from pipelines.common import container, default_ckpt, device_of, log, make_tracker, path, stage_main


def run(cfg: DictConfig) -> dict:
    tracker = make_tracker(cfg)  # first: a tracking server that does not answer stops the stage in seconds
    section, mask_ckpt = container(cfg.evaluate), cfg.sample.get("mask_ckpt")
    result = evaluate(
        path(cfg.paths.samples_dir),
        path(cfg.paths.prepared_dir),
        path(cfg.paths.eval_dir),
        EvalSettings.from_dict(section),
        device_of(cfg),
        ckpt_path=default_ckpt(cfg),  # the membership-inference attack's checkpoint (or one beside it)
        trust=cfg.trust_checkpoint,
        mask_ckpt_path=path(mask_ckpt) if mask_ckpt else mask_checkpoint(path(cfg.paths.train_dir)),  # generated masks
    )
    tags = flatten(section, "evaluate.")
    if section["encoder"]["weights"]:
        tags["evaluate.encoder.weights"] = "<path>"
    with tracked(tracker, run_name=cfg.name, run_id=result.mlflow_run_id, tags={"medaug.job": cfg.name}):
        tracker.set_tags(
            tags | {"evaluate.extractor": " | ".join(result.extractors), "privacy.verdict": result.verdict}
        )
        tracker.log_metrics({key: v for key, v in result.metrics.items() if math.isfinite(v)})
        for file in sorted(result.out_dir.iterdir()):
            if file.name != "DONE":
                tracker.log_artifact(file, "evaluation")
    for key in sorted(result.metrics):
        if key.count("/") == 1 and not key.endswith("_std"):
            log.info("  %-32s %.4f", key, result.metrics[key])
    log.info("privacy verdict: %s%s", result.verdict.upper(), "".join(f"\n  - {r}" for r in result.reasons))
    log.info("report written to %s", result.out_dir / "report.md")
    return result.metrics | {"privacy/verdict": result.verdict}


main = stage_main("evaluate", run)

if __name__ == "__main__":
    main()
