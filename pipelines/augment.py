"""augment: prepared dataset + checkpoint → mixed real + synthetic manifest for a downstream trainer.

    python -m pipelines.augment experiment=demo_2d augment.policy=balance
    medaug augment input=outputs/demo_2d/prepared ckpt_path=last.pt augment.policy=ratio augment.ratio=0.5
    torchrun --nproc_per_node 4 -m pipelines.augment experiment=demo_2d      # shards by sample index
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from medaug.augment import augment
from pipelines.common import amp_dtype_of, default_ckpt, device_of, distributed, log, path, stage_main


def run(cfg: DictConfig) -> dict:
    a = cfg.augment
    env_rank, _, env_world = distributed()
    rank = int(a.rank if a.rank is not None else env_rank)
    world_size = int(a.world_size if a.world_size is not None else env_world)
    device = device_of(cfg)  # cuda:LOCAL_RANK under torchrun
    num = OmegaConf.to_container(a.num_per_class) if OmegaConf.is_config(a.num_per_class) else a.num_per_class
    result = augment(path(cfg.input), default_ckpt(cfg), path(cfg.output), policy=a.policy, num_per_class=num,
                     ratio=a.ratio, split=a.split, guidance_scale=a.guidance_scale, sampler=a.sampler, steps=a.steps,
                     eta=a.eta, seed=a.seed, batch_size=a.batch_size, chunk_size=a.chunk_size, use_ema=a.use_ema,
                     rank=rank, world_size=world_size, device=device, amp_dtype=amp_dtype_of(cfg, device),
                     overwrite=a.overwrite)
    total = sum(result.synthetic.values())
    if result.complete and result.generated == 0:
        log.info("%s is up to date (%d real + %d synthetic items); nothing to do", result.out_dir, result.real, total)
    elif result.complete:
        log.info("wrote %s: %d real + %d synthetic items %s", result.out_dir / "manifest.csv", result.real, total,
                 result.synthetic)
    else:
        log.info("rank %d/%d generated %d samples; the last rank to finish writes the manifest",
                 rank, world_size, result.generated)
    return {"augment_dir": str(result.out_dir), "real": result.real, "synthetic": total,
            "generated": result.generated, "complete": result.complete}


main = stage_main("augment", run)

if __name__ == "__main__":
    main()
