"""Realism metrics of a synthetic set against real data, each with its real reference.

* ``diversity/msssim_*``: mean MS-SSIM over random pairs within a class, synthetic and
  real side by side (higher = less diverse; a collapsed class scores near 1).
* ``fidelity/hist_w1_*``: Wasserstein-1 distance between intensity distributions in model
  space [-1, 1], synthetic vs real test, beside real train vs real test.
* ``fidelity/label_acc_*``: accuracy of a small classifier trained on the real training
  split, on synthetic samples (label fidelity), beside its accuracy on held-out real data.

Images are ``(N, 1, *spatial)`` in [-1, 1]; ``labels`` are ``(N,)`` class indices.

Example::

    clf = train_classifier(train_x, train_y, num_classes=3)
    metrics = realism_metrics(clf, train_x, train_y, test_x, test_y, synth_x, synth_y, class_names)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import MultiScaleSSIMMetric
from monai.networks.nets import DenseNet
from scipy.stats import wasserstein_distance
from tqdm.auto import tqdm

MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def msssim_metric(image_shape: Sequence[int], kernel_size: int = 7) -> MultiScaleSSIMMetric:
    """MS-SSIM with as many scales as the image allows (5 for ≥ 112 px with a 7-px kernel).

    Each scale halves the image; the coarsest must still hold one kernel.
    """
    scales = 1
    while scales < len(MSSSIM_WEIGHTS) and min(image_shape) // 2**scales >= kernel_size:
        scales += 1
    weights = np.asarray(MSSSIM_WEIGHTS[:scales])
    return MultiScaleSSIMMetric(spatial_dims=len(image_shape), data_range=1.0, kernel_size=kernel_size,
                                weights=tuple(weights / weights.sum()))


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


def make_classifier(image_shape: Sequence[int], num_classes: int) -> torch.nn.Module:
    """A small MONAI DenseNet (about 11 k parameters) ending in global pooling, so it learns
    what is in the image rather than where, from few examples; 2D or 3D by ``image_shape``.

    The stem divides the size by 4 and each later block by 2: small images get fewer blocks."""
    blocks = int(np.clip(1 + np.floor(np.log2(max(min(image_shape) // 4, 1))), 1, 3))
    return DenseNet(spatial_dims=len(image_shape), in_channels=1, out_channels=num_classes, init_features=16,
                    growth_rate=8, block_config=(2,) * blocks, bn_size=2)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 400,
                     batch_size: int = 32, lr: float = 1e-3, seed: int = 0) -> torch.nn.Module:
    """A small MONAI classifier trained on real images with random flips; returned in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make_classifier(images.shape[2:], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(steps), desc="classifier", unit="step"):
        idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=gen)
        x = images[idx]
        for axis in range(2, x.ndim):
            if torch.rand((), generator=gen) < 0.5:
                x = x.flip(axis)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def accuracy_per_class(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Overall accuracy and per-class accuracy (NaN for a class with no samples)."""
    overall = float((pred == labels).float().mean()) if len(labels) else float("nan")
    per_class = [float((pred[labels == c] == c).float().mean()) if (labels == c).any() else float("nan")
                 for c in range(num_classes)]
    return overall, per_class


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
    acc_s, per_s = accuracy_per_class(predict(classifier, synth_x), synth_y, k)
    acc_r, per_r = accuracy_per_class(predict(classifier, test_x), test_y, k)
    out["fidelity/label_acc"], out["fidelity/label_acc_real"] = acc_s, acc_r
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
