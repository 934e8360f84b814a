"""train: prepared dataset → checkpoint + MLflow run (resumes from the last checkpoint).

python -m pipelines.train experiment=demo_2d
medaug train experiment=demo_2d training.max_steps=3000     # continue a finished run further
medaug train experiment=demo_2d_controlnet   # a ControlNet on the mask added to demo_2d's class model (frozen)
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medaug.masks import mask_model_overrides
from medaug.model import build_scheduler, last_checkpoint
from medaug.privacy import PrivacyFlags
from medaug.runtime import process_group
from medaug.tracking import flatten
from medaug.trainer import train_diffusion, training_data, training_network
from medaug.training import seed_all
from pipelines.common import amp_dtype_of, container, device_of, log, make_tracker, path, stage_main, training_ckpt

OTHER_STAGES = ("prepare", "sample", "evaluate", "export", "augment", "input", "output")  # not train's params


def run(cfg: DictConfig) -> dict:
    device = device_of(cfg)
    with process_group(device) as (rank, world):
        result = _train(cfg, device, rank, world)
        if cfg.training.get("mask_model"):  # the mask model of sample.masks=generate, in <train_dir>/mask
            overrides = mask_model_overrides(container(cfg.paths), cfg.name, cfg.tracking.experiment)
            mask_cfg = OmegaConf.merge(cfg, overrides)
            result["mask_checkpoint"] = _train(mask_cfg, device, rank, world)["checkpoint"]
    return result


def _train(cfg: DictConfig, device: torch.device, rank: int, world: int) -> dict:
    tracker = make_tracker(cfg)  # first: a tracking server that does not answer stops the run in seconds
    seed_all(cfg.seed)
    config = container(cfg)
    data = training_data(
        path(cfg.paths.prepared_dir),
        device,
        model=config["model"],
        scheduler=config["scheduler"],
        latent=config.get("latent"),
        autoencoder=config.get("autoencoder"),
        on_device=cfg.training.data_on_device,
        make_tracker=lambda: make_tracker(cfg),
        run_name=f"{cfg.name}-autoencoder",
        trust=cfg.trust_checkpoint,
        amp_dtype=amp_dtype_of(cfg, device),
    )
    config["model"] = data.spec  # stored in the checkpoint: sample rebuilds the network from it
    net = training_network(data).to(
        device
    )  # the spec's network (a ControlNet run: the base UNet, frozen, + ControlNet)
    fused = {"fused": True} if device.type == "cuda" else {}
    out_ckpt = last_checkpoint(path(cfg.paths.train_dir))
    result = train_diffusion(
        net,
        instantiate(cfg.training.optimizer, **fused)([p for p in net.parameters() if p.requires_grad]),
        build_scheduler(config["scheduler"]),
        data,
        config["training"],
        scheduler_spec=config["scheduler"],
        stored_config=config,
        ckpt_path=out_ckpt,
        resume_from=training_ckpt(cfg),
        tracker=tracker,
        params=flatten({k: v for k, v in config.items() if k not in OTHER_STAGES}),
        run_name=cfg.name,
        source=cfg.data.source,
        device=device,
        rank=rank,
        world_size=world,
        amp_dtype=amp_dtype_of(cfg, device),
        compile_cache=cfg.paths.compile_cache,
        register=cfg.tracking.get("register"),
        probe_flags=PrivacyFlags.from_dict(config["evaluate"]["privacy"]),
        probe_sampling=config["sample"],
        probe_heldout=config["evaluate"]["real_split"],
        trust=cfg.trust_checkpoint,
    )
    final = result.losses[-1][1] if result.losses else float("nan")
    if rank == 0:
        log.info("trained to step %d (loss %.4f); checkpoint %s", result.step, final, out_ckpt)
    return {"train/loss": final, "train/step": result.step, "checkpoint": str(out_ckpt)}


main = stage_main("train", run)

if __name__ == "__main__":
    main()
