"""augment: prepared dataset + checkpoint → mixed real + synthetic manifest for a downstream trainer.

python -m pipelines.augment experiment=demo_2d augment.policy=balance
medaug augment input=outputs/demo_2d/prepared ckpt_path=last.pt augment.policy=ratio augment.ratio=0.5
torchrun --nproc_per_node 4 -m pipelines.augment experiment=demo_2d      # shards by sample index
"""

from __future__ import annotations

from omegaconf import DictConfig

from medaug.augment import augment, check_utility, log_augment
from pipelines.common import amp_dtype_of, container, default_ckpt, device_of, log, make_tracker, path, stage_main


def run(cfg: DictConfig) -> dict:
    settings = container(cfg.augment)  # num_per_class: an int or a plain {class_name: count}
    ckpt_path = default_ckpt(cfg)
    ignore = settings.pop("ignore_utility")
    utility = check_utility(path(cfg.paths.eval_dir), path(cfg.paths.samples_dir), ckpt_path, ignore=ignore)
    (log.warning if utility.negative else log.info)("%s", utility.note)
    device = device_of(cfg)  # cuda:LOCAL_RANK under torchrun
    result = augment(
        path(cfg.input),
        ckpt_path,
        path(cfg.output),
        **settings,  # rank / world_size null: torchrun's
        device=device,
        amp_dtype=amp_dtype_of(cfg, device),
        trust_checkpoint=cfg.trust_checkpoint,
    )
    if result.complete and result.generated:  # this call finished the folder; a rerun that does nothing logs nothing
        tracker = make_tracker(cfg, any_rank=True)  # whichever rank wrote the manifest
        log_augment(tracker, result, container(cfg.augment), f"{cfg.name}-augment", cfg.name)
    log.info("%s", result.describe())
    return {
        "augment_dir": str(result.out_dir),
        "real": result.real,
        "synthetic": sum(result.synthetic.values()),
        "generated": result.generated,
        "complete": result.complete,
        "utility": utility.note,
    }


main = stage_main("augment", run)

if __name__ == "__main__":
    main()
