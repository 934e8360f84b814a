"""sample: checkpoint → synthetic images per class (seeded), with a grid in MLflow.

python -m pipelines.sample experiment=demo_2d sample.num_per_class=32 sample.guidance_scale=3
medaug sample ckpt_path=model.pt 'sample.num_per_class={healthy: 10, multi_lesion: 50}'
medaug sample experiment=demo_2d_seg sample.masks=prepared:val      # a mask-conditioned model on the val masks
torchrun --nproc_per_node=4 -m pipelines.sample experiment=demo_2d     # batches shared out over 4 GPUs
"""

from __future__ import annotations

from omegaconf import DictConfig

from medaug.dp import describe
from medaug.generation import generate_samples
from medaug.model import load_checkpoint
from medaug.sampling import save_samples
from medaug.tracking import tracked
from pipelines.common import amp_dtype_of, container, default_ckpt, device_of, log, make_tracker, path, stage_main


def run(cfg: DictConfig) -> dict:
    tracker = make_tracker(cfg)  # first: a tracking server that does not answer stops the stage in seconds
    ckpt = load_checkpoint(default_ckpt(cfg), cfg.trust_checkpoint)
    device = device_of(cfg)
    out = generate_samples(
        ckpt,
        container(cfg.sample),
        device,
        prepared_dir=path(cfg.paths.prepared_dir),
        train_dir=path(cfg.paths.train_dir),
        amp_dtype=amp_dtype_of(cfg, device),
        compile_cache=cfg.paths.compile_cache,
        trust=cfg.trust_checkpoint,
    )
    if out.rank != 0:
        return {"samples": 0, "rank": out.rank}
    folder = save_samples(
        path(cfg.paths.samples_dir), out.images, out.rows, out.info, ckpt.meta["class_names"], masks=out.masks
    )
    with tracked(tracker, run_name=cfg.name, run_id=out.info["mlflow_run_id"], tags={"medaug.job": cfg.name}):
        tracker.set_tags({f"sample.{k}": v for k, v in container(cfg.sample).items()})
        tracker.log_artifact(folder / "grid.png", "samples")
    dp = describe(out.info["dp"])
    log.info("wrote %d samples (%s) to %s; differential privacy: %s", len(out.labels), out.counts, folder, dp)
    return {"samples": len(out.labels), "samples_dir": str(folder)}


main = stage_main("sample", run)

if __name__ == "__main__":
    main()
