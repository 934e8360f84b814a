"""export_bundle: checkpoint → MONAI bundle (metadata, inference config, weights, TorchScript, model card).

medaug export_bundle experiment=demo_2d                                  # outputs/<name>/bundle
medaug export_bundle ckpt_path=models:/demo-generator/1 export_bundle.eval_dir=outputs/demo/eval
cd outputs/demo_2d/bundle && python -m monai.bundle run --config_file configs/inference.json
"""

from __future__ import annotations

from omegaconf import DictConfig

from medaug.bundle import evaluation_summary, write_bundle
from medaug.model import load_checkpoint
from medaug.release import deid_text
from medaug.tracking import tracked
from pipelines.common import container, default_ckpt, log, make_tracker, path, stage_main


def run(cfg: DictConfig) -> dict:
    settings = container(cfg.export_bundle)
    tracker = make_tracker(cfg)  # first: a tracking server that does not answer stops the stage in seconds
    ckpt = load_checkpoint(default_ckpt(cfg), cfg.trust_checkpoint)
    evaluation = None
    if settings["eval_dir"]:
        evaluation = evaluation_summary(path(settings["eval_dir"]), ckpt.id, path(cfg.paths.samples_dir))
    out = write_bundle(ckpt, path(settings["dir"]), settings, evaluation, deid_text(path(cfg.paths.prepared_dir)))

    with tracked(tracker, run_name=cfg.name, run_id=ckpt.meta.get("mlflow_run_id"), tags={"medaug.job": cfg.name}):
        for name in ("configs/metadata.json", "configs/inference.json", "docs/README.md"):
            tracker.log_artifact(out / name, "bundle")
    log.info(
        "MONAI bundle in %s; sample with: cd %s && python -m monai.bundle run --config_file configs/inference.json",
        out,
        out,
    )
    return {"bundle_dir": str(out), "checkpoint_id": ckpt.id, "privacy_verdict": (evaluation or {}).get("verdict")}


main = stage_main("export_bundle", run)

if __name__ == "__main__":
    main()
