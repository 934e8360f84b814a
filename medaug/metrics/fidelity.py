"""Realism and utility metrics of a synthetic set against real data, each with its real reference.

* ``fidelity/fd``, ``fidelity/kid`` (± ``_std``; NaN with ``fidelity/kid_too_small`` = 1 on sets of fewer than
  ``KID_MIN_SAMPLES``), ``fidelity/precision``, ``fidelity/recall`` (k=3),
  ``fidelity/density``, ``fidelity/coverage`` (k=5): on encoder features (``FeatureExtractor``),
  synthetic vs a held-out real half, each beside its ``_floor``: the other real half vs the same half,
  at the same sample size (the value a perfect generator would get).
* ``utility/*``: a classifier trained on synthetic only (TSTR), on real + synthetic and on real
  only, each tested on held-out real data, over several seeds (mean and ``_std``), as accuracy
  and macro AUC.
* ``diversity/msssim_*``: mean MS-SSIM over random pairs within a class, synthetic and
  real side by side (higher = less diverse; a collapsed class scores near 1).
* ``fidelity/hist_w1_*``: Wasserstein-1 distance between intensity distributions in model
  space [-1, 1], synthetic vs real test, beside real train vs real test.
* ``fidelity/label_acc_*``: accuracy of a small classifier trained on the real training
  split, on synthetic samples (label fidelity), beside its accuracy on held-out real data;
  ``fidelity/label_kappa*`` the same corrected for chance (Cohen's kappa, ≈ 0 for noise).

References: Fréchet distance, Heusel et al. 2017, arXiv:1706.08500 (eq. 6); KID, Bińkowski et al. 2018,
arXiv:1801.01401 (eq. 5, unbiased MMD² with the cubic polynomial kernel); precision / recall, Kynkäänniemi et al.
2019, arXiv:1904.06991 (eq. 1-2); density / coverage, Naeem et al. 2020, arXiv:2002.09797 (eq. 3-4); TSTR,
Esteban et al. 2017, arXiv:1706.02633; MS-SSIM, Wang, Simoncelli, Bovik 2003 (IEEE ACSSC), eq. 7.

Images are ``(N, 1, *spatial)`` in [-1, 1]; ``labels`` are ``(N,)`` class indices.

Example::

    clf = train_classifier(train_x, train_y, num_classes=3)
    metrics = realism_metrics(clf, train_x, train_y, test_x, test_y, synth_x, synth_y, class_names)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import FIDMetric
from monai.metrics.fid import compute_frechet_distance
from scipy.linalg import LinAlgWarning
from .classifier import device_of_model, in_batches


# ----------------------------------------------------------------------------- features


def _last_linear(network: torch.nn.Module) -> torch.nn.Linear | None:
    linears = [m for m in network.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else None


class FeatureExtractor:
    """Penultimate features of a network: the input of its last ``nn.Linear`` layer (for
    ``make_classifier``: the globally pooled DenseNet features), or, for a network without
    one, its output averaged over any spatial axes.

    ``__call__(images (N, 1, *spatial) in [-1, 1]) -> (N, D) float64``. ``channels > 1`` repeats the
    grey image (for networks trained on RGB). ``description`` says in reports which extractor
    produced the numbers.
    """

    def __init__(self, network: torch.nn.Module, description: str, channels: int = 1):
        self.network = network.eval()
        self.description = description
        self.channels = channels
        self._layer = _last_linear(network)
        self._captured: list[torch.Tensor] = []
        self._active = False  # capture only in our own calls, not when others run the network
        if self._layer is not None:
            self._layer.register_forward_pre_hook(self._capture)

    def _capture(self, _module, inputs) -> None:
        if self._active:
            self._captured.append(inputs[0].detach())

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels > 1:
            x = x.repeat(1, self.channels, *([1] * (x.ndim - 2)))
        self._captured.clear()
        self._active = True
        try:
            out = self.network(x)
        finally:
            self._active = False
        f = self._captured[-1] if self._layer is not None else out
        return f.flatten(2).mean(2) if f.ndim > 2 else f

    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        if len(images) == 0:
            return torch.empty(0, 0, dtype=torch.float64)
        return in_batches(self._features, images, device_of_model(self.network), batch_size).double()


PLANES = ("sagittal", "coronal", "axial")  # slicing across array axis 0, 1, 2 of (X, Y, Z)


def plane_slice(volumes: torch.Tensor, axis: int, offset: float = 0.0, side: int | None = None) -> torch.Tensor:
    """One slice per volume across spatial ``axis`` (0, 1, 2) at ``offset`` (share of the size from the
    middle, e.g. 0.125), zero-padded in model space (-1) to ``side × side``: ``(N, 1, *V) -> (N, 1, side, side)``."""
    size = volumes.shape[2 + axis]
    index = int(np.clip(size // 2 + round(offset * size), 0, size - 1))
    s = volumes.select(2 + axis, index)
    side = side or max(volumes.shape[2:])
    pad = []
    for n in reversed(s.shape[2:]):
        pad += [(side - n) // 2, side - n - (side - n) // 2]
    return F.pad(s, pad, value=-1.0)


def slices_for_training(volumes: torch.Tensor, labels: torch.Tensor, offsets=(-0.125, 0.0, 0.125)):
    """2D training images for the 2.5D encoder: slices at ``offsets`` around the middle in the three
    planes of every volume, ``(N, 1, X, Y, Z) -> (9 N, 1, S, S)`` with labels repeated."""
    parts = [plane_slice(volumes, axis, off) for axis in range(3) for off in offsets]
    return torch.cat(parts), labels.repeat(len(parts))


class PlaneFeatureExtractor:
    """The 2.5D variant for 3D volumes: features of the three mid-slices (sagittal, coronal, axial)
    from a 2D ``FeatureExtractor``, averaged: ``(N, 1, X, Y, Z) -> (N, D)``."""

    def __init__(self, extractor2d: FeatureExtractor):
        self.extractor2d = extractor2d
        self.description = f"2.5D: mean over 3 mid-plane slices of [{extractor2d.description}]"

    def __call__(self, volumes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        return torch.stack([self.extractor2d(plane_slice(volumes, a), batch_size) for a in range(3)]).mean(0)


def load_weights(network: torch.nn.Module, weights_file) -> torch.nn.Module:
    """Load a state dict (a plain one, or under ``state_dict``/``model`` as many checkpoints keep it,
    with any ``module.`` prefix from DataParallel removed) into ``network``; strict, with a clear error."""
    weights_file = Path(weights_file)
    if not weights_file.is_file():
        raise FileNotFoundError(
            f"{weights_file}: encoder weights not found; set evaluate.encoder.weights=<state dict file>"
        )
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ValueError(
            f"{weights_file}: weights do not fit evaluate.encoder.network ({first}); "
            "give the _target_ and arguments of the network they were saved from"
        ) from None
    return network.eval()


# ----------------------------------------------------------------------------- fidelity


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)``, ``(M, D)``
    (MONAI ``FIDMetric``); a ridge of 1e-6 on the covariances when their product is ill-conditioned.
    NaN for fewer than 2 samples on either side."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    try:
        with warnings.catch_warnings():  # fewer samples than features: singular covariances, expected here
            warnings.simplefilter("ignore", LinAlgWarning)
            return float(FIDMetric()(a.double(), b.double()))
    except ValueError:  # large imaginary part of sqrtm: rank-deficient covariances
        ridge = torch.eye(a.shape[1], dtype=torch.float64) * 1e-6
        ca, cb = torch.cov(a.double().T) + ridge, torch.cov(b.double().T) + ridge
        return float(compute_frechet_distance(a.double().mean(0), ca, b.double().mean(0), cb))


KID_MIN_SAMPLES = 10  # per set; below it KID is NaN and ``kid_too_small`` is 1 (subsets of < 5 samples say nothing)


def kernel_inception_distance(
    a: torch.Tensor, b: torch.Tensor, n_subsets: int = 50, subset_size: int = 100, seed: int = 0
) -> tuple[float, float]:
    """Unbiased squared MMD with the polynomial kernel ``k(x, y) = (x·y / D + 1)^3`` between feature sets
    ``a`` (N, D) and ``b`` (M, D), averaged over ``n_subsets`` random subsets drawn without replacement, as in
    Bińkowski et al. 2018, "Demystifying MMD GANs" (ICLR): ``(mean, std)`` over the subsets.

    Subsets hold ``m = min(subset_size, min(N, M) // 2)`` samples from each set. The cap at half the smaller set
    is what makes ``std`` honest on small sets: subsets as large as the whole set are the same set in another
    order, so every subset gives the same value and the spread reads exactly 0 whatever the sample size.
    Bootstrap resampling with replacement is no cure: repeated samples put ``k(x, x)`` terms into the within-set
    sums that the unbiased estimator assumes come from distinct samples, which biases KID upwards. Half-samples
    (McCarthy's half-sampling) keep the estimator unbiased, their mean is close to the estimate on the full sets
    (every pair is equally likely to be drawn), and their spread approximates the standard deviation of that
    full-set estimate over fresh draws (measured on 24- and 40-sample 16-D Gaussian sets: 1.1-1.2x it when the sets
    differ by a shift, 1.6-1.8x, on the safe side, when they come from one distribution). On sets of at least
    ``2 * subset_size`` this is the paper's protocol (``std``: the spread of one ``subset_size`` estimate).
    NaN for fewer than ``KID_MIN_SAMPLES`` samples in either set.

    Example::

        kid, kid_std = kernel_inception_distance(fake_feats, real_feats)   # 40 vs 40: subsets of 20
    """
    if min(len(a), len(b)) < KID_MIN_SAMPLES:
        return float("nan"), float("nan")
    m = min(subset_size, len(a) // 2, len(b) // 2)
    gen = torch.Generator().manual_seed(seed)
    d = a.shape[1]
    off = 1 - torch.eye(m, dtype=torch.float64)
    values = []
    for _ in range(n_subsets):
        x = a[torch.randperm(len(a), generator=gen)[:m]].double()
        y = b[torch.randperm(len(b), generator=gen)[:m]].double()
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        values.append(float((kxx * off).sum() / (m * (m - 1)) + (kyy * off).sum() / (m * (m - 1)) - 2 * kxy.mean()))
    return float(np.mean(values)), float(np.std(values))


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of ``x`` (N, D) to its k-th nearest other row: ``(N,)``."""
    d = torch.cdist(x.double(), x.double())
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi 2019): precision = share of fake samples inside
    the real manifold (union of balls reaching each real sample's k-th neighbour), recall = share of
    real samples inside the fake manifold. NaN when a set has ≤ k samples."""
    if len(real) <= k or len(fake) <= k:
        return float("nan"), float("nan")
    d = torch.cdist(fake.double(), real.double())  # (M fake, N real)
    precision = (d <= knn_radii(real, k)[None, :]).any(1).double().mean()
    recall = (d.T <= knn_radii(fake, k)[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem 2020) with k-NN balls around real samples: density = mean number
    of real balls holding a fake sample, divided by k (≈ 1 for matching distributions); coverage =
    share of real balls holding at least one fake sample. NaN when ``real`` has ≤ k samples."""
    if len(real) <= k or len(fake) == 0:
        return float("nan"), float("nan")
    inside = torch.cdist(fake.double(), real.double()) <= knn_radii(real, k)[None, :]  # (M, N)
    return float(inside.double().sum() / (k * len(fake))), float(inside.any(0).double().mean())


def feature_metrics(
    real: torch.Tensor,
    fake: torch.Tensor,
    pr_k: int = 3,
    dc_k: int = 5,
    kid_subsets: int = 50,
    kid_subset_size: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """FD, KID (mean, std), precision/recall and density/coverage of ``fake`` against ``real`` features;
    ``kid_too_small``: 1.0 when either set has fewer than ``KID_MIN_SAMPLES`` samples (KID is NaN then), else 0.0."""
    kid, kid_std = kernel_inception_distance(fake, real, kid_subsets, kid_subset_size, seed)
    p, r = precision_recall(real, fake, pr_k)
    dens, cov = density_coverage(real, fake, dc_k)
    return dict(
        fd=frechet_distance(fake, real),
        kid=kid,
        kid_std=kid_std,
        kid_too_small=float(min(len(real), len(fake)) < KID_MIN_SAMPLES),
        precision=p,
        recall=r,
        density=dens,
        coverage=cov,
    )


def fidelity_with_floor(real: torch.Tensor, fake: torch.Tensor, seed: int = 0, **kwargs) -> dict[str, float]:
    """``feature_metrics`` of ``fake`` against one random half ``B`` of ``real``, and the floor: the other
    half ``A`` against ``B``. Both comparisons use the same sample size ``n = min(len(fake), len(real) // 2)``
    (FD depends on it), so ``fd`` vs ``fd_floor`` reads as "how far from real-vs-real".
    Returns ``{name: value, name_floor: value}``."""
    gen = torch.Generator().manual_seed(seed)
    half = len(real) // 2
    n = min(len(fake), half)
    perm = torch.randperm(len(real), generator=gen)
    a, b = real[perm[:n]], real[perm[half : 2 * half]]
    f = fake[torch.randperm(len(fake), generator=gen)[:n]]
    out = feature_metrics(b, f, seed=seed, **kwargs)
    floor = feature_metrics(b, a, seed=seed, **kwargs)
    floor.pop("kid_too_small")  # the same sample size as above by construction
    out.update({f"{k}_floor": v for k, v in floor.items()})
    return out


def fidelity_metrics(
    real_feats: torch.Tensor,
    real_y: torch.Tensor,
    fake_feats: torch.Tensor,
    fake_y: torch.Tensor,
    class_names: Sequence[str],
    suffix: str = "",
    seed: int = 0,
    **kwargs,
) -> dict[str, float]:
    """``fidelity_with_floor`` overall and per class, named ``fidelity/<metric><suffix>[_floor][/<class>]``
    (``suffix="_25d"`` for the 2.5D features)."""

    def named(values: dict, cls: str = "") -> dict:
        out = {}
        for key, v in values.items():
            base, floor = (key[:-6], "_floor") if key.endswith("_floor") else (key, "")
            out[f"fidelity/{base}{suffix}{floor}{cls}"] = v
        return out

    out = named(fidelity_with_floor(real_feats, fake_feats, seed=seed, **kwargs))
    for c, name in enumerate(class_names):
        out.update(
            named(
                fidelity_with_floor(real_feats[real_y == c], fake_feats[fake_y == c], seed=seed, **kwargs), f"/{name}"
            )
        )
    return out
