"""The small classifier the metrics train and use: build, train, predict, kappa, per-class accuracy."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet

from ..progress import progress_bar
from ..training import to_device


def make_classifier(image_shape: Sequence[int], num_classes: int) -> torch.nn.Module:
    """A small MONAI DenseNet (about 11 k parameters) ending in global pooling, so it learns
    what is in the image rather than where, from few examples; 2D or 3D by ``image_shape``.

    The stem divides the size by 4 and each later block by 2: small images get fewer blocks."""
    blocks = int(np.clip(1 + np.floor(np.log2(max(min(image_shape) // 4, 1))), 1, 3))
    return DenseNet(
        spatial_dims=len(image_shape),
        in_channels=1,
        out_channels=num_classes,
        init_features=16,
        growth_rate=8,
        block_config=(2,) * blocks,
        bn_size=2,
    )


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """A small MONAI classifier trained on real images with random flips; returned in eval mode, on
    ``device`` (the images stay where they are; each batch is copied there)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make_classifier(images.shape[2:], num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in progress_bar(range(steps), desc="classifier", unit="step", disable=not progress):
        idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=gen)
        x, y = to_device([images[idx], labels[idx]], torch.device(device))
        for axis in range(2, x.ndim):
            if torch.rand((), generator=gen) < 0.5:
                x = x.flip(axis)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def in_batches(
    fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device, batch_size: int = 64
) -> torch.Tensor:
    """``fn`` on ``images`` (float) in batches of ``batch_size`` copied to ``device``; the outputs
    concatenated on the CPU."""
    return torch.cat(
        [
            fn(to_device([images[i : i + batch_size].float()], device)[0]).cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


def device_of_model(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Predicted class indices ``(N,)``, on the CPU; the images go in batches to the model's device."""
    return in_batches(lambda x: model(x).argmax(1), images, device_of_model(model), batch_size)


def cohen_kappa(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Agreement beyond chance, ``(acc - p_e) / (1 - p_e)`` with ``p_e = Σ_c P(pred=c) P(label=c)``:
    1 for perfect labels, about 0 for images the classifier cannot tell apart (noise), whatever K is."""
    if len(labels) == 0:
        return float("nan")
    p_pred = torch.bincount(pred, minlength=num_classes).double() / len(pred)
    p_true = torch.bincount(labels, minlength=num_classes).double() / len(labels)
    p_e = float((p_pred * p_true).sum())
    acc = float((pred == labels).double().mean())
    return (acc - p_e) / (1 - p_e) if p_e < 1 else float("nan")


def accuracy_per_class(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Overall accuracy and per-class accuracy (NaN for a class with no samples)."""
    overall = float((pred == labels).float().mean()) if len(labels) else float("nan")
    per_class = [
        float((pred[labels == c] == c).float().mean()) if (labels == c).any() else float("nan")
        for c in range(num_classes)
    ]
    return overall, per_class
