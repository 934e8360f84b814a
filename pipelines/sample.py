"""sample: checkpoint → synthetic images per class (seeded), with a grid in MLflow.

python -m pipelines.sample experiment=demo_2d sample.num_per_class=32 sample.guidance_scale=3
medaug sample ckpt_path=model.pt 'sample.num_per_class={healthy: 10, multi_lesion: 50}'
medaug sample experiment=demo_2d_seg sample.masks=prepared:val      # a mask-conditioned model on the val masks
torchrun --nproc_per_node=4 -m pipelines.sample experiment=demo_2d     # batches shared out over 4 GPUs
"""

from __future__ import annotations

from omegaconf import DictConfig

from medaug.conditioning import Conditioning
from medaug.dp import describe
from medaug.masks import mask_generator, mask_model_dir, sampling_masks
from medaug.latent import latent_space_of
from medaug.model import load_checkpoint
from medaug.runtime import process_group
from medaug.sampling import (
    class_counts,
    generate_sharded,
    inference_scheduler,
    labels_for_counts,
    sample_images,
    sample_records,
    sampling_network,
    save_samples,
)
from medaug.tracking import tracked
from pipelines.common import amp_dtype_of, container, default_ckpt, device_of, log, make_tracker, path, stage_main


def run(cfg: DictConfig) -> dict:
    s, settings = cfg.sample, container(cfg.sample)
    tracker = make_tracker(cfg)  # first: a tracking server that does not answer stops the stage in seconds
    ckpt = load_checkpoint(default_ckpt(cfg), cfg.trust_checkpoint)
    device = device_of(cfg)
    net = sampling_network(
        ckpt, device, use_ema=s.use_ema, compile=s.compile, compile_cache=cfg.paths.compile_cache, conditioned=True
    )
    class_names = ckpt.meta["class_names"]
    cond = Conditioning.from_meta(ckpt.meta)  # class, mask or mask+class (README "Segmentation datasets")
    given = sampling_masks(
        s.get("masks"),
        cond,
        class_names,
        ckpt.meta["image_shape"],
        prepared_dir=path(cfg.paths.prepared_dir),
        per_mask=s.get("per_mask", 1),
    )
    counts = class_counts(settings["num_per_class"], class_names)
    labels = labels_for_counts(counts, class_names) if given is None else given.labels
    counts = {c: int((labels == i).sum()) for i, c in enumerate(class_names)}
    scheduler = inference_scheduler(ckpt.config["scheduler"], s.sampler, s.steps)
    kwargs = dict(
        guidance_scale=s.guidance_scale,
        null_class=len(class_names),
        batch_size=s.batch_size,
        eta=s.eta,
        clip_x0=s.clip_x0,
        amp_dtype=amp_dtype_of(cfg, device),
    )
    space = latent_space_of(ckpt.meta, device, cfg.trust_checkpoint)  # None: pixel space
    make_masks = None
    if cond.uses_mask and given is None:  # sample.masks=generate: the mask model draws each sample's mask
        make_masks = mask_generator(
            path(s.mask_ckpt) if s.mask_ckpt else mask_model_dir(path(cfg.paths.train_dir)) / "checkpoints" / "last.pt",
            ckpt.meta,
            device,
            seed=s.seed,
            trust=cfg.trust_checkpoint,
            sampler=s.sampler,
            steps=s.steps,
            use_ema=s.use_ema,
            **{k: v for k, v in kwargs.items() if k != "null_class"},
        )

    def generate(chunk, seed: int, masks=None):  # labels (n,) -> images (n, 1, *image_shape) in [-1, 1]
        if make_masks is not None:
            masks = make_masks(chunk, seed)
        given_masks = dict(masks=masks, conditioning=cond) if cond.uses_mask else {}
        if space is None:
            x = sample_images(
                net, scheduler, chunk, ckpt.meta["image_shape"], seed=seed, progress=rank == 0, **given_masks, **kwargs
            )
        else:  # latent diffusion: denoise latents, decode to image space (in tiles with sample.decode_tile)
            x = space.sample(
                net,
                scheduler,
                chunk,
                tile=s.get("decode_tile"),
                overlap=s.get("decode_overlap", 0.25),
                seed=seed,
                **given_masks,
                **kwargs,
            )
        return (x, masks) if cond.uses_mask else x  # with masks: the pairs

    with process_group(device) as (rank, world):  # batches shared out, the same images for any number of ranks
        images = generate_sharded(
            generate, labels, s.batch_size, s.seed, rank, world, None if given is None else given.masks
        )
    if rank != 0:
        return {"samples": 0, "rank": rank}
    images, masks = images if cond.uses_mask else (images, None)
    source = None if masks is None else (given.kind if given is not None else "generated")
    if source == "user":  # the user's folder or CSV: its name is not copied into the samples folder
        settings["masks"] = "user"
    if make_masks is not None:  # the mask model by its id, not its path
        settings["mask_ckpt"] = make_masks.checkpoint_id
    rows, info = sample_records(ckpt, labels, settings, space, source, cond.mask_labels)
    out = save_samples(path(cfg.paths.samples_dir), images, rows, info, class_names, masks=masks)

    with tracked(tracker, run_name=cfg.name, run_id=info["mlflow_run_id"], tags={"medaug.job": cfg.name}):
        tracker.set_tags({f"sample.{k}": v for k, v in container(s).items()})
        tracker.log_artifact(out / "grid.png", "samples")
    log.info("wrote %d samples (%s) to %s; differential privacy: %s", len(labels), counts, out, describe(info["dp"]))
    return {"samples": len(labels), "samples_dir": str(out)}


main = stage_main("sample", run)

if __name__ == "__main__":
    main()
