"""Replace samples the copy filter dropped by new samples of the same class that pass it.

Sample's side of the copy filter: it loads the checkpoint the samples came from and the prepared
training split (to score new candidates against), and samples again with the settings recorded in
the samples' ``info.json``. Export hands it the filter's verdict and writes what comes back; export
itself never reads the training split.

Example::

    new = regenerate_copies(images, labels, rows, keep, scores, threshold, sample_info=info,
                            ckpt_path="job/train/checkpoints/last.pt", prepared_dir="job/prepared")
    new.images.shape  # (N - new.short, 1, *spatial), in [-1, 1]

Samples of a mask-conditioned model (:mod:`medaug.conditioning`) are regenerated for the mask of the sample
they replace: pass the samples' ``masks`` (:func:`medaug.sampling.load_sample_masks`); ``new.masks`` are the
masks of ``new.images``. A sample whose generated mask copies a training mask (``mask_copy``) gets a new mask
from the mask model (``mask_ckpt_path``) and a new image on it; the new mask must pass ``mask_threshold`` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch

from medaug.conditioning import Conditioning
from medaug.data import load_split, load_split_masks
from medaug.masks import mask_generator
from medaug.model import load_checkpoint
from medaug.privacy import pixel_copy_scores, replace_copies
from medaug.sampling import inference_scheduler, sample_images, sampling_network


class Regenerated(NamedTuple):
    """The kept samples followed by the accepted replacements: ``images`` (M, 1, *spatial) in [-1, 1],
    their manifest ``rows`` (a replacement's row says ``replaces_copy``), copy ``scores`` (M,), and
    ``short``: dropped samples that found no replacement in ``max_rounds`` rounds."""

    images: torch.Tensor
    rows: list[dict]
    scores: np.ndarray
    short: int
    max_rounds: int
    masks: torch.Tensor | None = None  # (M, 1, *spatial) int64: the mask of each image (mask-conditioned models)


def regenerate_copies(
    images: torch.Tensor,
    labels: torch.Tensor,
    rows: Sequence[dict],
    keep: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    *,
    sample_info: Mapping,
    ckpt_path: str | Path,
    prepared_dir: str | Path,
    trust: bool = False,
    max_rounds: int = 5,
    masks: torch.Tensor | None = None,
    mask_copy: np.ndarray | None = None,
    mask_threshold: float | None = None,
    mask_ckpt_path: str | Path | None = None,
) -> Regenerated:
    """Sample again for every sample with ``keep`` False (N,) until a candidate of its class scores at
    most ``threshold`` (pixel-space correlation to the nearest training image, as the audit that gave
    ``scores`` (N,)), at most ``max_rounds`` rounds. Candidates are sampled with the checkpoint at
    ``ckpt_path`` (it must be the one ``sample_info["checkpoint_id"]`` names) and the sampler, guidance,
    seed, EMA and clipping settings of ``sample_info["sample"]``; candidate k gets seed ``seed + N + k``.
    A replacement's manifest row is the row of the sample it replaces with its own index and seed, and
    ``replaces_copy``. A mask-conditioned checkpoint needs the samples' ``masks`` (N, 1, *spatial): a
    replacement is made for the mask of the sample it replaces, except where ``mask_copy`` (N,) bool says the
    (generated) mask copies a training mask: there a new mask is drawn by the mask model at ``mask_ckpt_path`` (the
    one ``sample_info["sample"]["mask_ckpt"]`` names; candidate k's mask seeded as :func:`medaug.masks.mask_generator`
    seeds sample ``N + k``) and the candidate passes only when its mask's pixel correlation to every training mask
    is at most ``mask_threshold`` too.

    Raises ValueError when the checkpoint is not the samples' one, or a mask-conditioned one gets no masks, or
    mask copies come without the samples' mask model."""
    ckpt = load_checkpoint(ckpt_path, trust)
    if ckpt.id != sample_info["checkpoint_id"]:
        raise ValueError(f"{ckpt.path} is not the checkpoint these samples came from; pass ckpt_path=")
    s, names = sample_info["sample"], ckpt.meta["class_names"]
    cond = Conditioning.from_meta(ckpt.meta)
    if cond.uses_mask and (masks is None or len(masks) != len(labels)):
        raise ValueError(
            f"{ckpt.path} is conditioned on masks: regenerating its samples needs their masks (load_sample_masks)"
        )
    net = sampling_network(ckpt, "cpu", use_ema=s.get("use_ema", True), conditioned=cond.uses_mask)
    train_x, _ = load_split(Path(prepared_dir), "train")
    new_mask = np.zeros(len(labels), dtype=bool) if mask_copy is None else np.asarray(mask_copy, dtype=bool)
    made: dict[int, torch.Tensor] = {}  # candidate index -> its mask
    last: dict = {}  # the latest round's candidate masks and which of them are new (redrawn) masks
    if new_mask.any():
        redraw = _mask_redraw(ckpt, s, mask_ckpt_path, trust)
        train_masks = load_split_masks(Path(prepared_dir), "train").float()

    def generate(want: torch.Tensor, first: int) -> torch.Tensor:  # want: indices of the samples to replace
        sch = inference_scheduler(ckpt.config["scheduler"], s["sampler"], s["steps"])
        given = {}
        if cond.uses_mask:
            m, again = masks[want].clone(), torch.from_numpy(new_mask[want.numpy()])
            for j in torch.nonzero(again).flatten().tolist():  # a new mask where the mask was a copy, seeded as
                m[j] = redraw(labels[want[j : j + 1]], s["seed"] + first + j)[0]  # the mask of sample first + j
            made.update({first + j: m[j] for j in range(len(want))})
            last.update(masks=m, again=again)
            given = dict(masks=m, conditioning=cond)
        return sample_images(
            net,
            sch,
            labels[want],
            ckpt.meta["image_shape"],
            guidance_scale=s["guidance_scale"],
            null_class=len(names),
            seed=s["seed"] + first,
            batch_size=s["batch_size"],
            eta=s["eta"],
            clip_x0=s.get("clip_x0", True),
            **given,
        )  # the settings the samples were made with

    def score(imgs: torch.Tensor) -> np.ndarray:  # a candidate whose new mask is a copy again does not pass
        s_img = pixel_copy_scores(imgs, train_x)
        again = last.get("again")
        if again is not None and again.any():
            s_mask = pixel_copy_scores(last["masks"][again].float(), train_masks)
            s_img[again.numpy()] = np.where(s_mask > mask_threshold, np.inf, s_img[again.numpy()])
        return s_img

    which = torch.arange(len(labels))  # candidates are drawn per replaced sample: its class and its mask
    new_x, new_which, source, new_scores = replace_copies(images, which, keep, threshold, generate, score, max_rounds)
    new_rows = []
    for src, orig in zip(source.tolist(), new_which.tolist()):
        y = int(labels[orig])
        row = (
            rows[src]
            if src < len(rows)
            else {
                **rows[orig],
                "index": src,
                "label": y,
                "class_name": names[y],
                "seed": s["seed"] + src,
                "replaces_copy": True,
            }
        )
        new_rows.append(row)
    final_scores = np.where(np.isnan(new_scores), scores[source.clip(max=len(rows) - 1)], new_scores)
    new_masks = None
    if masks is not None:
        new_masks = torch.stack([masks[i] if i < len(rows) else made[i] for i in source.tolist()])
    return Regenerated(new_x, new_rows, final_scores, len(rows) - len(new_rows), max_rounds, new_masks)


def _mask_redraw(ckpt, s: Mapping, mask_ckpt_path: str | Path | None, trust: bool):
    """The samples' mask model as :func:`medaug.masks.mask_generator` (``make(labels, seed of the sample)``), with
    the settings the samples were made with; refuses another mask model than the one their info names."""
    if mask_ckpt_path is None:
        raise ValueError(
            "some generated masks copy a training mask: regenerating them needs the mask model "
            "(sample.mask_ckpt, or training.mask_model=true's); or set export.regenerate=false to only drop them"
        )
    kwargs = {k: s[k] for k in ("guidance_scale", "batch_size", "eta") if k in s}
    make = mask_generator(
        mask_ckpt_path,
        ckpt.meta,
        "cpu",
        seed=s["seed"],
        trust=trust,
        sampler=s["sampler"],
        steps=s["steps"],
        use_ema=s.get("use_ema", True),
        clip_x0=s.get("clip_x0", True),
        **kwargs,
    )
    if s.get("mask_ckpt") and make.checkpoint_id != s["mask_ckpt"]:
        raise ValueError(
            f"{mask_ckpt_path} is not the mask model these samples' masks came from ({s['mask_ckpt']}); "
            "pass sample.mask_ckpt=<that checkpoint>"
        )
    return make
