"""Membership inference against the trained model: does it know which images it was trained on?

The loss attack on diffusion models (Carlini et al. 2023, arXiv:2301.13188; Matsumoto et al. 2023,
arXiv:2302.03262; SecMI, Duan et al. 2023, arXiv:2302.01316, refines it): a model that memorised its training
images denoises them better than images of patients it never saw. For every real image of the training split
(members) and of the held-out split (non-members) the attack measures the model's denoising error, the per-sample
training loss of :func:`medaug.training.diffusion_loss` (whatever the model predicts: noise, velocity, a flow's
velocity), at a few fixed timesteps with fixed noises, conditioned on the image's class, averaged; its score is
minus that error (higher = more likely a member). A mask-conditioned model (``model.condition=mask|mask+class``)
is conditioned on each real image's own mask as well; a mask model (``model.generates=mask``) is attacked on the
real label maps it was trained on.

``privacy/mia_auc`` is the area under the ROC curve of that score, members against non-members:
0.5 = the model treats its training patients like strangers, 1.0 = it gives every one of them away.
Its 95 % interval is a bootstrap (members and non-members resampled apart); ``privacy/mia_tpr_at_1pct_fpr``
is the share of members caught when at most 1 % of non-members are accused (Carlini et al. 2022: the
low-FPR regime is what matters; with H non-members the smallest FPR step is 1 / H, so below 100 it means
no non-member accused at all). Per class too (``.../<class>``).

Example::

    errors = denoising_errors(net, scheduler, images, labels, null_class=3, timesteps=(0.05, 0.1), seeds=(0,))
    auc, lo, hi = auc_interval(-errors[members], -errors[nonmembers], n_boot=1000)
    metrics = membership_metrics(-err_train, -err_held, y_train, y_held, ["a", "b"])   # privacy/mia_auc ...
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from .conditioning import Conditioning, mask_to_image, num_labels
from .model import file_id
from .training import StepNoise, diffusion_loss


@dataclass(frozen=True)
class MIASettings:
    """The attack (``evaluate.mia``): ``enabled`` (``auto``: when the samples' checkpoint is found), images per
    class and split (``max_per_class``), ``timesteps`` as fractions of the training schedule, noise ``seeds``,
    bootstrap resamples and the batch size of the model's forward passes."""

    enabled: str | bool = "auto"
    max_per_class: int = 32
    timesteps: tuple[float, ...] = (0.05, 0.1, 0.2)
    seeds: tuple[int, ...] = (0, 1)
    bootstrap: int = 1000
    batch_size: int = 32

    @classmethod
    def from_dict(cls, section: dict | None) -> MIASettings:
        s = dict(section or {})
        unknown = sorted(set(s) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"evaluate.mia.{unknown[0]}: unknown setting; evaluate.mia has {[f.name for f in fields(cls)]}"
            )
        if "timesteps" in s:
            s["timesteps"] = tuple(float(t) for t in s["timesteps"])
            if not s["timesteps"] or not all(0 <= t < 1 for t in s["timesteps"]):
                raise ValueError(
                    f"evaluate.mia.timesteps={list(s['timesteps'])}: give fractions of the training schedule "
                    "in [0, 1), e.g. [0.05, 0.1, 0.2]"
                )
        if "seeds" in s:
            s["seeds"] = tuple(int(x) for x in s["seeds"])
        if s.get("enabled", "auto") not in ("auto", True, False):
            raise ValueError(f"evaluate.mia.enabled={s['enabled']!r}; choose auto, true or false")
        return cls(**s)


def subsample(labels: torch.Tensor, max_per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices ``(M,)`` of at most ``max_per_class`` items of every class of ``labels`` (N,), drawn at random
    (seeded), in ascending order."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:max_per_class]])
    return torch.sort(torch.cat(keep)).values if keep else torch.empty(0, dtype=torch.long)


def attack_timesteps(scheduler, fractions: Sequence[float]) -> list[int]:
    """The integer timesteps at ``fractions`` of the scheduler's training schedule (0.1 of 1000 -> 100)."""
    T = scheduler.num_train_timesteps
    return [min(T - 1, max(0, round(f * T))) for f in fractions]


@torch.no_grad()
def denoising_errors(
    model: nn.Module,
    scheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    null_class: int,
    timesteps: Sequence[float] = (0.05, 0.1, 0.2),
    seeds: Sequence[int] = (0, 1),
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
    mask_onehot: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's mean denoising error ``(N,)`` on ``images`` (N, C, *spatial) in model space with their class
    ``labels`` (N,) (None: a model without class input): the per-sample loss of
    :func:`medaug.training.diffusion_loss` at each timestep (``timesteps``: fractions of the training schedule) and
    noise (one fixed noise per timestep and seed, from a seeded ``torch.Generator``, shared by every image, so only
    the images differ), averaged. ``mask_onehot`` (N, K, *spatial): a mask-conditioned model's condition, each
    image's own one-hot mask (:meth:`medaug.conditioning.Conditioning.one_hot`). The same inputs give the same
    errors, in any batch size."""
    device = next(model.parameters()).device
    steps = attack_timesteps(scheduler, timesteps)
    total = torch.zeros(len(images), dtype=torch.float64)
    for k, t in enumerate(steps):
        for s in seeds:
            gen = torch.Generator().manual_seed(int(s) * 1_000_003 + k)
            noise = torch.randn((1, *images.shape[1:]), generator=gen).to(device)
            for start in range(0, len(images), batch_size):
                x0 = images[start : start + batch_size].to(device).float()
                y = None if labels is None else labels[start : start + batch_size].to(device)
                m = None if mask_onehot is None else mask_onehot[start : start + batch_size].to(device)
                n = len(x0)
                draws = StepNoise(
                    noise.expand(n, *noise.shape[1:]),
                    torch.full((n,), t, dtype=torch.long, device=device),
                    torch.zeros(n, dtype=torch.bool, device=device),
                )
                loss = diffusion_loss(
                    model, scheduler, x0, y, null_class=null_class, draws=draws, amp_dtype=amp_dtype, mask_onehot=m
                )
                total[start : start + n] += loss.double().cpu()
    return (total / (len(steps) * len(seeds))).float()


def _auc_rows(member: np.ndarray, nonmember: np.ndarray) -> np.ndarray:
    """AUC of each row pair: ``member`` (B, M), ``nonmember`` (B, H) -> (B,), by the Mann-Whitney rank sum
    (ties count half)."""
    m = member.shape[1]
    ranks = rankdata(np.concatenate([member, nonmember], axis=1), axis=1)
    return (ranks[:, :m].sum(1) - m * (m + 1) / 2) / (m * nonmember.shape[1])


def roc_auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """P(a member's score > a non-member's), ties counting half: the area under the ROC curve. NaN when a
    side is empty."""
    member, nonmember = np.asarray(member, float), np.asarray(nonmember, float)
    if len(member) == 0 or len(nonmember) == 0:
        return float("nan")
    return float(_auc_rows(member[None], nonmember[None])[0])


def auc_interval(
    member: np.ndarray, nonmember: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(AUC, lower, upper)``: the AUC and its percentile bootstrap interval at ``level`` (members and
    non-members resampled apart, ``n_boot`` times, seeded)."""
    member, nonmember = np.asarray(member, float), np.asarray(nonmember, float)
    auc = roc_auc(member, nonmember)
    if not np.isfinite(auc) or n_boot < 1:
        return auc, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = []
    for start in range(0, n_boot, 250):  # bounded memory: 250 resamples at a time
        b = min(250, n_boot - start)
        mi = member[rng.integers(0, len(member), (b, len(member)))]
        ni = nonmember[rng.integers(0, len(nonmember), (b, len(nonmember)))]
        boots.append(_auc_rows(mi, ni))
    lo, hi = np.percentile(np.concatenate(boots), [50 * (1 - level), 50 * (1 + level)])
    return auc, float(lo), float(hi)


def tpr_at_fpr(member: np.ndarray, nonmember: np.ndarray, fpr: float = 0.01) -> float:
    """The share of members whose score is above a threshold that at most ``fpr`` of the non-members exceed
    (a member tied with that threshold is not counted). With fewer than ``1 / fpr`` non-members the threshold
    is the highest non-member score."""
    member, nonmember = np.asarray(member, float), np.sort(np.asarray(nonmember, float))[::-1]
    if len(member) == 0 or len(nonmember) == 0:
        return float("nan")
    allowed = int(np.floor(fpr * len(nonmember) + 1e-9))  # non-members the threshold may let through
    threshold = nonmember[min(allowed, len(nonmember) - 1)]
    return float((member > threshold).mean())


def membership_metrics(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    member_labels: Sequence[int],
    nonmember_labels: Sequence[int],
    class_names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """``privacy/mia_auc`` (with ``_lo``/``_hi``, its 95 % bootstrap interval) and ``privacy/mia_tpr_at_1pct_fpr``,
    overall and per class (``privacy/mia_auc/<class>`` ...), and the attack's sizes, of attack scores (higher =
    more likely a training image) of members and non-members with their labels."""
    ms, ns = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    my, ny = np.asarray(member_labels), np.asarray(nonmember_labels)
    out: dict[str, float] = {}

    def add(suffix: str, m: np.ndarray, n: np.ndarray) -> None:
        auc, lo, hi = auc_interval(m, n, n_boot, seed)
        out.update(
            {
                f"privacy/mia_auc{suffix}": auc,
                f"privacy/mia_auc_lo{suffix}": lo,
                f"privacy/mia_auc_hi{suffix}": hi,
                f"privacy/mia_tpr_at_1pct_fpr{suffix}": tpr_at_fpr(m, n, 0.01),
            }
        )

    add("", ms, ns)
    out["privacy/mia_members"], out["privacy/mia_nonmembers"] = float(len(ms)), float(len(ns))
    for c, name in enumerate(class_names):
        if (my == c).any() and (ny == c).any():
            add(f"/{name}", ms[my == c], ns[ny == c])
    return out


def membership_audit(
    model: nn.Module,
    scheduler,
    members: tuple[torch.Tensor, torch.Tensor],
    nonmembers: tuple[torch.Tensor, torch.Tensor],
    class_names: Sequence[str],
    settings: MIASettings = MIASettings(),
    seed: int = 0,
    encode=None,
    amp_dtype: torch.dtype | None = None,
    conditioning: Conditioning | None = None,
) -> dict[str, float]:
    """The attack on ``model`` (eval mode, trained with ``scheduler``): ``members`` = (train images, labels),
    ``nonmembers`` = (held-out images, labels), ``(N, 1, *spatial)`` in [-1, 1], each subsampled to
    ``settings.max_per_class`` per class (seeded). ``encode`` maps images to the model's space (a latent
    model's :meth:`medaug.latent.LatentSpace.encode`). Returns :func:`membership_metrics` plus the mean
    denoising errors ``privacy/mia_loss_member`` and ``privacy/mia_loss_nonmember`` (the held-out loss).

    A model of another ``conditioning`` (:mod:`medaug.conditioning`) needs each side's real label maps as a
    third element, ``(images, labels, masks (N, 1, *spatial) int)``: a mask-conditioned model is attacked on the
    images with their own masks as its condition (on the latent grid for a latent model), a mask model
    (``generates="mask"``) on the masks themselves (``2 onehot - 1``, what it was trained on; ``images`` unused)."""
    conditioning = conditioning or Conditioning()
    if conditioning != Conditioning() and not (len(members) == len(nonmembers) == 3):
        raise ValueError(
            f"a {conditioning.kind} model generating {conditioning.generates}s is attacked with the real masks: "
            "pass (images, labels, masks) for members and non-members"
        )
    sides = []
    for i, side in enumerate((members, nonmembers)):
        x, y = side[0], side[1]
        idx = subsample(y, settings.max_per_class, seed + i)
        x, y = x[idx], y[idx]
        masks = side[2][idx] if len(side) == 3 else None
        if conditioning.generates == "mask":  # the mask model's training data: label maps as images
            x = mask_to_image(masks, num_labels(conditioning.label_names))
        z = encode(x) if encode is not None and conditioning.generates != "mask" else x
        hot = conditioning.one_hot(masks, grid=z.shape[2:]) if conditioning.uses_mask else None
        err = denoising_errors(
            model,
            scheduler,
            z,
            y if conditioning.use_class else None,
            null_class=len(class_names),
            timesteps=settings.timesteps,
            seeds=settings.seeds,
            batch_size=settings.batch_size,
            amp_dtype=amp_dtype,
            mask_onehot=hot,
        )
        sides.append((err.numpy(), y.numpy()))
    (em, ym), (en, yn) = sides
    out = membership_metrics(-em, -en, ym, yn, class_names, settings.bootstrap, seed)
    out["privacy/mia_loss_member"], out["privacy/mia_loss_nonmember"] = float(em.mean()), float(en.mean())
    return out


def find_checkpoint(candidate: str | Path | None, checkpoint_id: str | None) -> Path | None:
    """The checkpoint file whose id (:func:`medaug.model.file_id`) is ``checkpoint_id``: ``candidate`` itself, or
    a ``*.pt`` beside it (``last.pt``, a probe's ``step_<k>.pt``); None when there is none (trained on since?)."""
    if candidate is None or not checkpoint_id:
        return None
    candidate = Path(candidate)
    others = sorted(candidate.parent.glob("*.pt")) if candidate.parent.is_dir() else []
    for path in [candidate, *others]:
        if path.is_file() and file_id(path) == checkpoint_id:
            return path
    return None
