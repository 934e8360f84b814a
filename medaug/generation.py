"""The sample stage's generation: a checkpoint and the ``sample`` settings in, seeded samples (and their masks) out.

Which images: ``sample.num_per_class`` per class, or one (``sample.per_mask``) per given mask for a
mask-conditioned model (:func:`medaug.masks.sampling_masks`: a prepared split, the user's files), or per mask
the mask model draws (``sample.masks=generate``). How: in pixel space or decoded from the checkpoint's latent
space, shared out over the ranks of a torch.distributed group so that any number of processes makes the same
images (:func:`medaug.sampling.generate_sharded`).

Example::

    ckpt = load_checkpoint("train/checkpoints/last.pt")
    out = generate_samples(ckpt, sample_section, torch.device("cpu"), prepared_dir="prepared", train_dir="train")
    save_samples("samples", out.images, out.rows, out.info, ckpt.meta["class_names"], masks=out.masks)
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple

import torch

from .conditioning import Conditioning
from .latent import latent_space_of
from .masks import mask_checkpoint, mask_generator, sampling_masks
from .model import Checkpoint
from .runtime import process_group
from .sampling import (
    class_counts,
    generate_sharded,
    inference_scheduler,
    labels_for_counts,
    sample_images,
    sample_records,
    sampling_network,
)

__all__ = ["Generated", "generate_samples"]


class Generated(NamedTuple):
    """What :func:`generate_samples` made: ``images`` ``(N, 1, *image_shape)`` in [-1, 1], their ``labels``
    ``(N,)``, ``masks`` ``(N, 1, *image_shape)`` label maps (None for a class-only model), ``counts`` per class
    name, and the manifest ``rows`` and provenance ``info`` of :func:`medaug.sampling.sample_records`. On ranks
    other than 0 ``images`` is None (rank 0 gathers them)."""

    images: torch.Tensor | None
    labels: torch.Tensor
    masks: torch.Tensor | None
    counts: dict
    rows: list
    info: dict
    rank: int = 0


def generate_samples(
    ckpt: Checkpoint,
    settings: Mapping,
    device: torch.device,
    *,
    prepared_dir: str | Path,
    train_dir: str | Path,
    amp_dtype: torch.dtype | None = None,
    compile_cache: str | None = None,
    trust: bool = False,
) -> Generated:
    """Samples of ``ckpt`` as the ``sample`` section ``settings`` ask (``num_per_class``, ``masks``, ``sampler``,
    ``steps``, ``guidance_scale``, ``seed``, ...): sample ``i`` starts from the noise of ``seed + i``.
    ``prepared_dir`` is where ``masks=prepared:<split>`` reads, ``train_dir`` where the mask model is by default.
    The user's mask files and the mask model's path are recorded only as ``"user"`` and the model's id."""
    s = dict(settings)
    net = sampling_network(
        ckpt, device, use_ema=s["use_ema"], compile=s["compile"], compile_cache=compile_cache, conditioned=True
    )
    class_names = ckpt.meta["class_names"]
    cond = Conditioning.from_meta(ckpt.meta)  # class, mask or mask+class (README "Segmentation datasets")
    given = sampling_masks(
        s.get("masks"),
        cond,
        class_names,
        ckpt.meta["image_shape"],
        prepared_dir=Path(prepared_dir),
        per_mask=s.get("per_mask", 1),
    )
    labels = labels_for_counts(class_counts(s["num_per_class"], class_names), class_names)
    labels = labels if given is None else given.labels
    counts = {c: int((labels == i).sum()) for i, c in enumerate(class_names)}
    scheduler = inference_scheduler(ckpt.config["scheduler"], s["sampler"], s["steps"])
    kwargs = {k: s[k] for k in ("guidance_scale", "batch_size", "eta", "clip_x0")}
    kwargs.update(null_class=len(class_names), amp_dtype=amp_dtype)
    space = latent_space_of(ckpt.meta, device, trust)  # None: pixel space
    make_masks = None
    if cond.uses_mask and given is None:  # masks=generate: the mask model draws each sample's mask
        mask_ckpt = Path(s["mask_ckpt"]) if s.get("mask_ckpt") else mask_checkpoint(train_dir)
        make_masks = mask_generator(
            mask_ckpt,
            ckpt.meta,
            device,
            seed=s["seed"],
            trust=trust,
            sampler=s["sampler"],
            steps=s["steps"],
            use_ema=s["use_ema"],
            prepared_dir=prepared_dir,  # the plausibility check of generated masks (sample.mask_redraws)
            max_redraws=s.get("mask_redraws", 0),
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
            tile, overlap = s.get("decode_tile"), s.get("decode_overlap", 0.25)
            x = space.sample(net, scheduler, chunk, tile=tile, overlap=overlap, seed=seed, **given_masks, **kwargs)
        return (x, masks) if cond.uses_mask else x  # with masks: the pairs

    with process_group(device) as (rank, world):  # batches shared out, the same images for any number of ranks
        out = generate_sharded(
            generate, labels, s["batch_size"], s["seed"], rank, world, None if given is None else given.masks
        )
    if rank != 0:
        return Generated(None, labels, None, counts, [], {}, rank)
    images, masks = out if cond.uses_mask else (out, None)
    source = None if masks is None else (given.kind if given is not None else "generated")
    if source == "user":  # the user's folder or CSV: its name is not copied into the samples folder
        s["masks"] = "user"
    if make_masks is not None:  # the mask model by its id, not its path
        s["mask_ckpt"] = make_masks.checkpoint_id
    rows, info = sample_records(ckpt, labels, s, space, source, cond.mask_labels)
    for row in rows if make_masks is not None and s.get("mask_redraws", 0) > 0 else []:  # implausible masks redrawn
        row["mask_redraws"] = make_masks.redraws.get(row["index"], 0)
    return Generated(images, labels, masks, counts, rows, info)
