"""augment: prepared dataset + checkpoint → mixed real + synthetic manifest for a downstream trainer.

python -m pipelines.augment experiment=demo_2d augment.policy=balance
medaug augment input=outputs/demo_2d/prepared ckpt_path=last.pt augment.policy=ratio augment.ratio=0.5
torchrun --nproc_per_node 4 -m pipelines.augment experiment=demo_2d      # shards by sample index
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import DictConfig

from medaug.augment import AugmentResult, augment, check_utility, save_synthetic_grid
from medaug.runtime import distributed
from medaug.tracking import flatten, tracked
from pipelines.common import amp_dtype_of, container, default_ckpt, device_of, log, make_tracker, path, stage_main


def log_run(cfg: DictConfig, result: AugmentResult) -> None:
    """The finished folder as MLflow run ``<name>-augment`` in the job's experiment: the settings (tags),
    real and synthetic counts, ``plan.json`` and a grid of the synthetic images (not the manifest: its
    paths lead to the user's folders, and a folder name may hold a patient's name)."""
    tracker = make_tracker(cfg, any_rank=True)  # whichever rank wrote the manifest
    with tracked(tracker, run_name=f"{cfg.name}-augment", tags={"medaug.job": cfg.name}):
        tracker.set_tags(flatten(container(cfg.augment), "augment."))
        tracker.log_metrics(
            {
                "augment/real": result.real,
                "augment/synthetic": sum(result.synthetic.values()),
                **{f"augment/synthetic/{name}": n for name, n in result.synthetic.items()},
            }
        )
        tracker.log_artifact(result.out_dir / "plan.json", "augment")
        with tempfile.TemporaryDirectory() as tmp:
            grid = save_synthetic_grid(result.out_dir, Path(tmp) / "synthetic_grid.png")
            if grid is not None:
                tracker.log_artifact(grid, "augment")


def run(cfg: DictConfig) -> dict:
    a = cfg.augment
    env_rank, _, env_world = distributed()
    rank = int(a.rank if a.rank is not None else env_rank)
    world_size = int(a.world_size if a.world_size is not None else env_world)
    ckpt_path = default_ckpt(cfg)
    utility = check_utility(path(cfg.paths.eval_dir), path(cfg.paths.samples_dir), ckpt_path, ignore=a.ignore_utility)
    (log.warning if utility.negative else log.info)("%s", utility.note)
    device = device_of(cfg)  # cuda:LOCAL_RANK under torchrun
    num = container(a)["num_per_class"]  # an int or a plain {class_name: count}
    result = augment(
        path(cfg.input),
        ckpt_path,
        path(cfg.output),
        policy=a.policy,
        num_per_class=num,
        ratio=a.ratio,
        split=a.split,
        guidance_scale=a.guidance_scale,
        sampler=a.sampler,
        steps=a.steps,
        eta=a.eta,
        seed=a.seed,
        batch_size=a.batch_size,
        chunk_size=a.chunk_size,
        use_ema=a.use_ema,
        rank=rank,
        world_size=world_size,
        device=device,
        amp_dtype=amp_dtype_of(cfg, device),
        overwrite=a.overwrite,
        trust_checkpoint=cfg.trust_checkpoint,
    )
    total = sum(result.synthetic.values())
    if result.complete and result.generated:  # this call finished the folder; a rerun that does nothing logs nothing
        log_run(cfg, result)
    if result.complete and result.generated == 0:
        log.info("%s is up to date (%d real + %d synthetic items); nothing to do", result.out_dir, result.real, total)
    elif result.complete:
        log.info(
            "wrote %s: %d real + %d synthetic items %s",
            result.out_dir / "manifest.csv",
            result.real,
            total,
            result.synthetic,
        )
    else:
        log.info(
            "rank %d/%d generated %d samples; the last rank to finish writes the manifest",
            rank,
            world_size,
            result.generated,
        )
    return {
        "augment_dir": str(result.out_dir),
        "real": result.real,
        "synthetic": total,
        "generated": result.generated,
        "complete": result.complete,
        "utility": utility.note,
    }


main = stage_main("augment", run)

if __name__ == "__main__":
    main()
