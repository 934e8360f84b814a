"""train: prepared dataset → checkpoint + MLflow run (resumes from the last checkpoint).

python -m pipelines.train experiment=demo_2d
medaug train experiment=demo_2d training.max_steps=3000     # continue a finished run further
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from medaug.conditioning import conditioned_training_data
from medaug.data import load_info, load_split
from medaug.masks import mask_model_dir
from medaug.dp import private_training, train_patients
from medaug.latent import cached_latents, latent_space_for_training
from medaug.flow import is_flow
from medaug.model import EMA, build_scheduler, check_unet_input, network_from_spec
from medaug.registry import dataset_entity, preview_callback
from medaug.runtime import process_group, switch
from medaug.tracking import flatten, guarded, tracked
from medaug.training import (
    DiffusionStep,
    TrainSettings,
    checkpoint_meta,
    compile_mode_of,
    fit,
    prepare_for_speed,
    resume_training,
    seed_all,
)
from pipelines.common import amp_dtype_of, container, default_ckpt, device_of, log, make_tracker, path, stage_main


def run(cfg: DictConfig) -> dict:
    device = device_of(cfg)
    with process_group(device) as (rank, world):
        result = _train(cfg, device, rank, world)
        if cfg.training.get("mask_model"):  # the mask model of sample.masks=generate, in <train_dir>/mask
            mask = {"condition": "class", "generates": "mask"}
            paths = {"train_dir": str(mask_model_dir(path(cfg.paths.train_dir)))}
            mask_cfg = OmegaConf.merge(
                cfg,
                {"model": mask, "paths": paths, "ckpt_path": None, "name": f"{cfg.name}-mask"},
                {"latent": {"autoencoder_ckpt": None}},  # the mask model trains on pixels
            )
            result["mask_checkpoint"] = _train(mask_cfg, device, rank, world)["checkpoint"]
        return result


def _train(cfg: DictConfig, device: torch.device, rank: int, world: int) -> dict:
    tracker = make_tracker(cfg)  # first: a tracking server that does not answer stops the run in seconds
    seed_all(cfg.seed)
    info = load_info(path(cfg.paths.prepared_dir))
    images, labels = load_split(info.root, "train")
    t = cfg.training
    cuda = device.type == "cuda"
    config = container(cfg)
    clips = config["scheduler"].get("clip_sample", not is_flow(config["scheduler"]))  # a flow clips nothing
    space = latent_space_for_training(
        config.get("latent"),
        info.root,
        device,  # None: pixel space
        clip_sample=clips,
        autoencoder=config.get("autoencoder"),
        make_tracker=lambda: make_tracker(cfg),
        run_name=f"{cfg.name}-autoencoder",
        trust=cfg.trust_checkpoint,
        amp_dtype=amp_dtype_of(cfg, device),
    )
    if space is not None:  # latent diffusion: the UNet learns scaled autoencoder latents
        config["model"].update(in_channels=space.latent_channels, out_channels=space.latent_channels)
        latents, labels = cached_latents(space, info.root, config["latent"]["cache_dir"])
        images = latents * space.scale_factor
    config["model"].update(num_class_embeds=info.num_classes + 1, spatial_dims=info.spatial_dims)
    condition, images, masks = conditioned_training_data(config["model"], info, images, latent=space is not None)
    if cuda and switch(t.data_on_device, True) and images.nbytes < 2 * 2**30:
        images, labels = images.to(device), labels.to(device)
    check_unet_input(config["model"], images.shape[2:], "latent" if space is not None else "image")
    net = network_from_spec(config["model"]).to(device)
    ema = EMA(net, t.ema_decay)
    optimizer = instantiate(t.optimizer, **({"fused": True} if cuda else {}))(net.parameters())
    scheduler = build_scheduler(config["scheduler"])

    out_ckpt = path(cfg.paths.train_dir) / "checkpoints" / "last.pt"
    start_step, resumed = resume_training(
        default_ckpt(cfg),
        net,
        ema,
        optimizer,
        image_shape=info.image_shape,
        class_names=info.class_names,
        dataset=info.fingerprint,
        autoencoder_id=space.id if space is not None else None,
        prepared=info.root,
        trust=cfg.trust_checkpoint,
        conditioning=condition,
    )
    run_id = resumed.get("mlflow_run_id")
    dp = private_training(
        net,
        config["training"].get("dp"),
        train_patients(info.root),
        expected_batch=t.batch_size,
        max_steps=t.max_steps,
        start_step=start_step,
        world_size=world,
        latent=space is not None,
        activation_checkpointing=t.activation_checkpointing,
        prior=resumed.get("dp"),
    )
    channels_last = switch(t.channels_last, cuda) and info.spatial_dims == 2
    model = prepare_for_speed(
        net,
        channels_last=channels_last,
        compile_mode=compile_mode_of(t.compile, cuda, private=dp is not None),
        compile_cache=cfg.paths.compile_cache,
        activation_checkpointing=t.activation_checkpointing,
    )
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    settings = TrainSettings(
        max_steps=t.max_steps,
        batch_size=t.batch_size,
        grad_clip=t.grad_clip,
        seed=t.seed,
        ckpt_every=t.ckpt_every,
        log_every=t.log_every,
        ema_every=t.ema_every,
        rank=rank,
        world_size=world,
    )
    step = DiffusionStep(
        model,
        scheduler,
        images,
        labels,
        null_class=info.num_classes,
        p_uncond=t.p_uncond,
        amp_dtype=amp_dtype_of(cfg, device),
        channels_last=channels_last,
        masks=masks,
        conditioning=condition,
    )
    others = ("prepare", "sample", "evaluate", "export", "augment", "input", "output")  # other stages' settings
    # from here on a tracking error is a warning: the training and its checkpoint go on
    with tracked(guarded(tracker), run_name=cfg.name, run_id=run_id, tags={"medaug.job": cfg.name}) as tracker:
        if start_step == 0:
            tracker.log_params(flatten({k: v for k, v in config.items() if k not in others}))
            tracker.log_params({f"data.count.{s}": sum(c.values()) for s, c in info.counts.items()})
        meta = checkpoint_meta(info, tracker.run_id, space, condition)
        tracker.log_dataset(dataset_entity(info, cfg.data.source), "training")
        preview = preview_callback(tracker, ema, config["scheduler"], meta, t.get("preview_every"), space=space)
        result = fit(
            model,
            ema,
            optimizer,
            step,
            settings,
            start_step=start_step,
            ckpt_path=out_ckpt,
            checkpoint_payload=lambda: {"config": config, "meta": {**meta, **(dp.meta() if dp else {})}},
            tracker=tracker,
            privacy=dp,
            on_step=preview,
        )
        if rank == 0:
            tracker.log_artifact(out_ckpt, "checkpoints")
            if cfg.tracking.get("register"):
                tracker.register_model(cfg.tracking.register, out_ckpt)
    final = result.losses[-1][1] if result.losses else float("nan")
    if rank == 0:
        log.info("trained to step %d (loss %.4f); checkpoint %s", result.step, final, out_ckpt)
    return {"train/loss": final, "train/step": result.step, "checkpoint": str(out_ckpt)}


main = stage_main("train", run)

if __name__ == "__main__":
    main()
