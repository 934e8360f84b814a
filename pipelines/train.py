"""train: prepared dataset → checkpoint + MLflow run (resumes from the last checkpoint).

python -m pipelines.train experiment=demo_2d
medaug train experiment=demo_2d training.max_steps=3000     # continue a finished run further
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from medaug.model import build_scheduler
from medaug.privacy import PrivacyFlags
from medaug.runtime import process_group
from medaug.tracking import flatten
from medaug.trainer import train_diffusion, training_data, unet_spec
from medaug.training import seed_all
from pipelines.common import amp_dtype_of, container, default_ckpt, device_of, log, make_tracker, path, stage_main

OTHER_STAGES = ("prepare", "sample", "evaluate", "export", "augment", "input", "output")  # not train's params


def run(cfg: DictConfig) -> dict:
    device, config = device_of(cfg), container(cfg)
    with process_group(device) as (rank, world):
        tracker = make_tracker(cfg)  # first: a tracking server that does not answer stops the run in seconds
        seed_all(cfg.seed)
        data = training_data(
            path(cfg.paths.prepared_dir),
            device,
            scheduler=config["scheduler"],
            latent=config.get("latent"),
            autoencoder=config.get("autoencoder"),
            on_device=cfg.training.data_on_device,
            make_tracker=lambda: make_tracker(cfg),
            run_name=f"{cfg.name}-autoencoder",
            trust=cfg.trust_checkpoint,
            amp_dtype=amp_dtype_of(cfg, device),
        )
        config["model"] = unet_spec(config["model"], data)  # stored in the checkpoint: sample rebuilds it
        net = instantiate(config["model"], _convert_="all").to(device)
        fused = {"fused": True} if device.type == "cuda" else {}
        out_ckpt = path(cfg.paths.train_dir) / "checkpoints" / "last.pt"
        result = train_diffusion(
            net,
            instantiate(cfg.training.optimizer, **fused)(net.parameters()),
            build_scheduler(config["scheduler"]),
            data,
            config["training"],
            stored_config=config,
            ckpt_path=out_ckpt,
            resume_from=default_ckpt(cfg),
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
            trust=cfg.trust_checkpoint,
        )
    final = result.losses[-1][1] if result.losses else float("nan")
    if rank == 0:
        log.info("trained to step %d (loss %.4f); checkpoint %s", result.step, final, out_ckpt)
    return {"train/loss": final, "train/step": result.step, "checkpoint": str(out_ckpt)}


main = stage_main("train", run)

if __name__ == "__main__":
    main()
