"""Realism metrics: MS-SSIM diversity, intensity histogram distance, label fidelity.

MS-SSIM: Wang, Simoncelli, Bovik 2003, "Multiscale structural similarity for image quality assessment", eq. 7 (the
weights below are its table); Wasserstein-1 distance of intensity histograms (scipy); Cohen's kappa, Cohen 1960.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric
from scipy.stats import wasserstein_distance
from .classifier import accuracy_per_class, cohen_kappa, predict


MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def msssim_metric(image_shape: Sequence[int], kernel_size: int = 7) -> MultiScaleSSIMMetric:
    """MS-SSIM with as many scales as the image allows (5 for ≥ 112 px with a 7-px kernel).

    Each scale halves the image; the coarsest must still hold one kernel.
    """
    scales = 1
    while scales < len(MSSSIM_WEIGHTS) and min(image_shape) // 2**scales >= kernel_size:
        scales += 1
    weights = np.asarray(MSSSIM_WEIGHTS[:scales])
    return MultiScaleSSIMMetric(
        spatial_dims=len(image_shape), data_range=1.0, kernel_size=kernel_size, weights=tuple(weights / weights.sum())
    )


def pairwise_msssim(images: torch.Tensor, n_pairs: int, generator: torch.Generator) -> float:
    """Mean MS-SSIM over ``n_pairs`` random distinct pairs of ``images``; NaN for < 2 images."""
    n = images.shape[0]
    if n < 2:
        return float("nan")
    i = torch.randint(0, n, (n_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (n_pairs,), generator=generator)) % n  # j != i
    metric = msssim_metric(images.shape[2:])
    a, b = (images[i] + 1) / 2, (images[j] + 1) / 2
    return float(metric(a, b).mean())


def histogram_w1(a: torch.Tensor, b: torch.Tensor, max_values: int = 200_000, seed: int = 0) -> float:
    """Wasserstein-1 distance between the intensity values of two image sets (model space)."""
    rng = np.random.default_rng(seed)
    va, vb = a.flatten().numpy(), b.flatten().numpy()
    va = rng.choice(va, min(max_values, va.size), replace=False)
    vb = rng.choice(vb, min(max_values, vb.size), replace=False)
    return float(wasserstein_distance(va, vb))


def realism_metrics(
    classifier: torch.nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    synth_x: torch.Tensor,
    synth_y: torch.Tensor,
    class_names: Sequence[str],
    n_pairs: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """All foundation metrics, per class and overall, named with slashes."""
    gen = torch.Generator().manual_seed(seed)
    k = len(class_names)
    out: dict[str, float] = {}
    pred_s, pred_r = predict(classifier, synth_x), predict(classifier, test_x)
    acc_s, per_s = accuracy_per_class(pred_s, synth_y, k)
    acc_r, per_r = accuracy_per_class(pred_r, test_y, k)
    out["fidelity/label_acc"], out["fidelity/label_acc_real"] = acc_s, acc_r
    out["fidelity/label_kappa"] = cohen_kappa(pred_s, synth_y, k)
    out["fidelity/label_kappa_real"] = cohen_kappa(pred_r, test_y, k)
    out["fidelity/hist_w1"] = histogram_w1(synth_x, test_x, seed=seed)
    out["fidelity/hist_w1_real"] = histogram_w1(train_x, test_x, seed=seed)
    for c, name in enumerate(class_names):
        out[f"fidelity/label_acc/{name}"], out[f"fidelity/label_acc_real/{name}"] = per_s[c], per_r[c]
        s, r = synth_x[synth_y == c], test_x[test_y == c]
        if len(s) and len(r):
            out[f"fidelity/hist_w1/{name}"] = histogram_w1(s, r, seed=seed)
        out[f"diversity/msssim/{name}"] = pairwise_msssim(s, n_pairs, gen)
        out[f"diversity/msssim_real/{name}"] = pairwise_msssim(train_x[train_y == c], n_pairs, gen)
    return out
