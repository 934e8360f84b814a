"""Utility metrics: train on synthetic (TSTR), real + synthetic, real only; test on held-out real."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from ..progress import progress_bar
from .classifier import device_of_model, in_batches, train_classifier

# ----------------------------------------------------------------------------- utility


def predict_proba(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Class probabilities ``(N, K)``, on the CPU; the images go in batches to the model's device."""
    return in_batches(lambda x: model(x).softmax(1), images, device_of_model(model), batch_size)


def macro_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """One-vs-rest ROC AUC averaged over the classes that have both positives and negatives in
    ``labels`` (Mann-Whitney U from ranks, ties averaged); NaN when there is none."""
    aucs = []
    for c in range(probs.shape[1]):
        pos = labels == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = rankdata(probs[:, c])
        aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else float("nan")


@dataclass
class UtilityResult:
    """Accuracy and macro AUC on held-out real data per training set, one value per seed."""

    acc: dict[str, list[float]]
    auc: dict[str, list[float]]

    def metrics(self) -> dict[str, float]:
        """``utility/<set>_acc``, ``..._acc_std``, ``..._auc``, ``..._auc_std`` and the gains
        ``utility/aug_gain_acc|auc`` (real + synthetic minus real) and ``utility/tstr_ratio_acc``."""
        out = {}
        for name in self.acc:
            for kind, values in (("acc", self.acc[name]), ("auc", self.auc[name])):
                out[f"utility/{name}_{kind}"] = float(np.mean(values))
                out[f"utility/{name}_{kind}_std"] = float(np.std(values))
        for kind in ("acc", "auc"):
            gains = np.subtract(getattr(self, kind)["augmented"], getattr(self, kind)["real"])
            out[f"utility/aug_gain_{kind}"] = float(np.mean(gains))
            out[f"utility/aug_gain_{kind}_std"] = float(np.std(gains))
        real = out["utility/real_acc"]
        out["utility/tstr_ratio_acc"] = out["utility/tstr_acc"] / real if real else float("nan")
        return out


def utility_metrics(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    synth_x: torch.Tensor,
    synth_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    seeds: Sequence[int] = (0, 1),
    steps: int = 400,
    batch_size: int = 32,
    train_fn: Callable[..., torch.nn.Module] = train_classifier,
) -> UtilityResult:
    """Train the same classifier recipe with the same budget on real only (``real``), synthetic only
    (``tstr``) and real + synthetic (``augmented``), once per seed, and test each on held-out real data."""
    sets = {
        "real": (train_x, train_y),
        "tstr": (synth_x, synth_y),
        "augmented": (torch.cat([train_x, synth_x]), torch.cat([train_y, synth_y])),
    }
    acc: dict[str, list[float]] = {k: [] for k in sets}
    auc: dict[str, list[float]] = {k: [] for k in sets}
    labels = test_y.numpy()
    bar = progress_bar(total=len(sets) * len(seeds), desc="utility", unit="classifier")
    for seed in seeds:
        for name, (x, y) in sets.items():
            model = train_fn(x, y, num_classes, steps=steps, batch_size=batch_size, seed=int(seed), progress=False)
            probs = predict_proba(model, test_x).numpy()
            acc[name].append(float((probs.argmax(1) == labels).mean()))
            auc[name].append(macro_auc(probs, labels))
            bar.update()
    bar.close()
    return UtilityResult(acc, auc)
