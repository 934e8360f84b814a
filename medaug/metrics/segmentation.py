"""Segmentation metrics of synthetic image/mask pairs: mask fidelity and segmentation utility.

* mask fidelity: a small MONAI ``UNet`` trained on the real train split predicts the masks of the synthetic images;
  its Dice against the masks they were conditioned on (``segmentation/fidelity_dice``) beside its Dice on held-out
  real images (``segmentation/fidelity_dice_real``, the floor: what the segmenter manages on real data).
* segmentation utility: the same recipe trained on real only, synthetic only and real + synthetic, tested on
  held-out real: Dice and 95th-percentile Hausdorff distance (mm) per foreground label, mean ± std over seeds
  (``segmentation/dice/real``, ``segmentation/hd95/mixed/<label>``, ...).

Dice and HD95 come from ``monai.metrics`` (``DiceMetric``, ``HausdorffDistanceMetric(percentile=95)``). A label
absent from a case's reference mask is left out of that case (Dice and HD95 undefined); a label the prediction
misses where the reference has it scores Dice 0 and, for HD95, the image diagonal in mm (the worst distance there
is), so a segmenter that finds nothing is not rewarded with a NaN.

Example::

    model = train_segmenter(train_x, train_m, num_labels=2, steps=200)
    scores = segmentation_scores(predict_masks(model, test_x), test_m, 2, spacing=(0.8, 0.8))
    scores.dice  # (N, 1) per case and foreground label, NaN where the reference lacks the label
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot

from ..progress import progress_bar
from ..training import to_device
from .classifier import device_of_model, in_batches


def segmenter_depth(image_shape: Sequence[int]) -> int:
    """Down-sampling steps of the segmenter: as many as keep the smallest side at least 4 voxels, 1 to 3."""
    return int(np.clip(np.floor(np.log2(max(min(image_shape) // 4, 1))), 1, 3))


def make_segmenter(image_shape: Sequence[int], num_labels: int) -> torch.nn.Module:
    """A tiny MONAI ``UNet`` (channels 8, 16[, 32, 64], one residual unit per block): ``(N, 1, *spatial)`` images
    in [-1, 1] to ``(N, num_labels, *spatial)`` logits (background included); 2D or 3D by ``image_shape``. Inputs
    are padded to a multiple of ``2 ** depth`` by :func:`segment_logits`, so any size works."""
    depth = segmenter_depth(image_shape)
    return UNet(
        spatial_dims=len(image_shape),
        in_channels=1,
        out_channels=num_labels,
        channels=tuple(8 * 2**k for k in range(depth + 1)),
        strides=(2,) * depth,
        num_res_units=1,
    )


def segment_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` on ``x`` (N, 1, *spatial) padded with -1 (the darkest intensity) to what its strides
    divide, cropped back: ``(N, K, *spatial)``."""
    multiple = int(np.prod(model.strides))
    spatial = x.shape[2:]
    pad = [(-s) % multiple for s in spatial]
    if not any(pad):
        return model(x)
    padding = [p for extra in reversed(pad) for p in (0, extra)]
    out = model(F.pad(x, padding, value=-1.0))
    return out[(slice(None), slice(None), *(slice(0, s) for s in spatial))]


def train_segmenter(
    images: torch.Tensor,
    masks: torch.Tensor,
    num_labels: int,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-2,  # 1e-3 reached Dice 0.47 on 16x16 planted squares in 60 steps, 1e-2 0.99
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """:func:`make_segmenter` trained ``steps`` steps on ``images`` (N, 1, *spatial) in [-1, 1] and their label maps
    ``masks`` (N, 1, *spatial) int64 with Dice + cross-entropy (``monai.losses.DiceCELoss``) and random flips;
    returned in eval mode on ``device`` (each batch is copied there). Seeded: the same inputs give the same model."""
    if len(images) == 0:
        raise ValueError("no images to train the segmenter on (empty training set)")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    model = make_segmenter(images.shape[2:], num_labels).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    model.train()
    for _ in progress_bar(range(steps), desc="segmenter", unit="step", disable=not progress):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
        x, y = to_device([images[idx].float(), masks[idx].long()], device)
        for axis in range(2, x.ndim):
            if torch.rand((), generator=gen) < 0.5:
                x, y = x.flip(axis), y.flip(axis)
        loss = loss_fn(segment_logits(model, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def predict_masks(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Predicted label maps ``(N, 1, *spatial)`` int64 on the CPU; the images go in batches to the model's device."""
    return in_batches(
        lambda x: segment_logits(model, x).argmax(1, keepdim=True), images, device_of_model(model), batch_size
    )


class SegScores(NamedTuple):
    """Per case and foreground label ``(N, K - 1)``: ``dice`` in [0, 1] and ``hd95`` in mm, NaN where the
    reference mask lacks the label."""

    dice: np.ndarray
    hd95: np.ndarray


def segmentation_scores(
    pred: torch.Tensor, target: torch.Tensor, num_labels: int, spacing: Sequence[float] | None = None
) -> SegScores:
    """Dice and HD95 of predicted label maps ``pred`` against ``target`` (both (N, 1, *spatial) int), per case and
    foreground label; ``spacing`` (mm per voxel along each spatial axis, default 1) scales HD95. A label present in
    the reference but absent from the prediction gets Dice 0 and HD95 = the image diagonal (mm)."""
    if pred.shape != target.shape:
        raise ValueError(f"predicted masks {tuple(pred.shape)} and reference masks {tuple(target.shape)} differ")
    if len(pred) == 0:
        return SegScores(np.empty((0, num_labels - 1)), np.empty((0, num_labels - 1)))
    spatial = target.shape[2:]
    spacing = [1.0] * len(spatial) if spacing is None else [float(s) for s in spacing]
    p, t = one_hot(pred.long(), num_labels), one_hot(target.long(), num_labels)
    dice = DiceMetric(include_background=False, reduction="none")(p, t).double().numpy()
    with warnings.catch_warnings():  # MONAI warns on every empty prediction or reference; handled below
        warnings.simplefilter("ignore")
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(p, t, spacing=spacing)
    hd = hd.double().numpy()
    present = t[:, 1:].flatten(2).any(2).numpy()
    found = p[:, 1:].flatten(2).any(2).numpy()
    diagonal = float(np.linalg.norm(np.asarray(spatial) * np.asarray(spacing)))
    dice = np.where(present, np.nan_to_num(dice, nan=0.0), np.nan)
    hd = np.where(present & ~found, diagonal, np.where(present, hd, np.nan))
    return SegScores(dice, hd)


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def foreground_names(labels: Mapping[str, int]) -> list[str]:
    """The names of the foreground labels 1..K-1 in value order (``labels``: {name: value}, background 0)."""
    by_value = {int(v): str(k) for k, v in labels.items()}
    return [by_value.get(v, f"label_{v}") for v in range(1, max(by_value, default=0) + 1)]


def fidelity_dice(
    segmenter: torch.nn.Module,
    synth_x: torch.Tensor,
    synth_m: torch.Tensor,
    test_x: torch.Tensor,
    test_m: torch.Tensor,
    labels: Mapping[str, int],
) -> dict[str, float]:
    """Mask fidelity: the real-trained ``segmenter``'s Dice on the synthetic images against their conditioning
    masks and on held-out real images against theirs (the floor), overall (mean over cases and labels) and per
    label: ``segmentation/fidelity_dice[_real][/<label>]``."""
    names = foreground_names(labels)
    k = len(names) + 1
    out = {}
    for key, x, m in (("fidelity_dice", synth_x, synth_m), ("fidelity_dice_real", test_x, test_m)):
        dice = segmentation_scores(predict_masks(segmenter, x), m, k).dice
        out[f"segmentation/{key}"] = _nanmean(dice)
        for j, name in enumerate(names):
            out[f"segmentation/{key}/{name}"] = _nanmean(dice[:, j])
    return out


SETS = ("real", "synthetic", "mixed")


@dataclass
class SegUtilityResult:
    """Per training set (``real``, ``synthetic``, ``mixed``), one ``(K - 1,)`` array of mean Dice and of mean HD95
    (mm) over the held-out cases per seed."""

    labels: list[str]
    dice: dict[str, list[np.ndarray]] = field(default_factory=dict)
    hd95: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``segmentation/<dice|hd95>/<set>`` (mean over labels), ``..._std`` (over seeds), per label
        ``segmentation/<dice|hd95>/<set>/<label>``, and ``segmentation/dice_gain`` (mixed minus real, ± std)."""
        out: dict[str, float] = {}
        for kind in ("dice", "hd95"):
            for name, per_seed in getattr(self, kind).items():
                values = np.stack(per_seed)  # (seeds, K - 1)
                overall = [_nanmean(v) for v in values]
                out[f"segmentation/{kind}/{name}"] = _nanmean(overall)
                out[f"segmentation/{kind}/{name}_std"] = (
                    float(np.nanstd(overall)) if np.isfinite(overall).any() else float("nan")
                )
                for j, label in enumerate(self.labels):
                    column = values[:, j]
                    out[f"segmentation/{kind}/{name}/{label}"] = _nanmean(column)
                    out[f"segmentation/{kind}/{name}_std/{label}"] = (
                        float(np.nanstd(column)) if np.isfinite(column).any() else float("nan")
                    )
        if "mixed" in self.dice and "real" in self.dice:
            gains = [_nanmean(m) - _nanmean(r) for m, r in zip(self.dice["mixed"], self.dice["real"])]
            out["segmentation/dice_gain"] = float(np.mean(gains))
            out["segmentation/dice_gain_std"] = float(np.std(gains))
        return out


def segmentation_utility(
    train: tuple[torch.Tensor, torch.Tensor],
    synth: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    labels: Mapping[str, int],
    seeds: Sequence[int] = (0, 1),
    steps: int = 200,
    batch_size: int = 16,
    spacing: Sequence[float] | None = None,
    train_fn: Callable[..., torch.nn.Module] = train_segmenter,
) -> SegUtilityResult:
    """Train the same segmenter recipe with the same budget on real only (``train``: images, masks), synthetic
    only (``synth``) and both, once per seed, and score each on held-out real ``test``: Dice and HD95 (mm with
    ``spacing``) per foreground label of ``labels`` ({name: value}, background 0)."""
    names = foreground_names(labels)
    k = len(names) + 1
    sets = {
        "real": train,
        "synthetic": synth,
        "mixed": (torch.cat([train[0], synth[0]]), torch.cat([train[1], synth[1]])),
    }
    result = SegUtilityResult(names, {s: [] for s in sets}, {s: [] for s in sets})
    bar = progress_bar(total=len(sets) * len(seeds), desc="segmentation utility", unit="segmenter")
    for seed in seeds:
        for name, (x, m) in sets.items():
            model = train_fn(x, m, k, steps=steps, batch_size=batch_size, seed=int(seed), progress=False)
            scores = segmentation_scores(predict_masks(model, test[0]), test[1], k, spacing)
            result.dice[name].append(np.array([_nanmean(c) for c in scores.dice.T]))
            result.hd95[name].append(np.array([_nanmean(c) for c in scores.hd95.T]))
            bar.update()
    bar.close()
    return result
