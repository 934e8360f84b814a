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

Images are ``(N, 1, *spatial)`` in [-1, 1]; ``labels`` are ``(N,)`` class indices.

Example::

    clf = train_classifier(train_x, train_y, num_classes=3)
    metrics = realism_metrics(clf, train_x, train_y, test_x, test_y, synth_x, synth_y, class_names)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import FIDMetric, MultiScaleSSIMMetric
from monai.metrics.fid import compute_frechet_distance
from monai.networks.nets import DenseNet
from scipy.linalg import LinAlgWarning
from scipy.stats import rankdata, wasserstein_distance

from .progress import progress_bar
from .training import to_device

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
                     batch_size: int = 32, lr: float = 1e-3, seed: int = 0, progress: bool = True,
                     device: torch.device | str = "cpu") -> torch.nn.Module:
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
def in_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device,
               batch_size: int = 64) -> torch.Tensor:
    """``fn`` on ``images`` (float) in batches of ``batch_size`` copied to ``device``; the outputs
    concatenated on the CPU."""
    return torch.cat([fn(to_device([images[i : i + batch_size].float()], device)[0]).cpu()
                      for i in range(0, len(images), batch_size)])


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
        raise FileNotFoundError(f"{weights_file}: encoder weights not found; "
                                "set evaluate.encoder.weights=<state dict file>")
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ValueError(f"{weights_file}: weights do not fit evaluate.encoder.network ({first}); "
                         "give the _target_ and arguments of the network they were saved from") from None
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


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor, n_subsets: int = 50, subset_size: int = 100,
                              seed: int = 0) -> tuple[float, float]:
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


def feature_metrics(real: torch.Tensor, fake: torch.Tensor, pr_k: int = 3, dc_k: int = 5, kid_subsets: int = 50,
                    kid_subset_size: int = 100, seed: int = 0) -> dict[str, float]:
    """FD, KID (mean, std), precision/recall and density/coverage of ``fake`` against ``real`` features;
    ``kid_too_small``: 1.0 when either set has fewer than ``KID_MIN_SAMPLES`` samples (KID is NaN then), else 0.0."""
    kid, kid_std = kernel_inception_distance(fake, real, kid_subsets, kid_subset_size, seed)
    p, r = precision_recall(real, fake, pr_k)
    dens, cov = density_coverage(real, fake, dc_k)
    return dict(fd=frechet_distance(fake, real), kid=kid, kid_std=kid_std,
                kid_too_small=float(min(len(real), len(fake)) < KID_MIN_SAMPLES), precision=p, recall=r,
                density=dens, coverage=cov)


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


def fidelity_metrics(real_feats: torch.Tensor, real_y: torch.Tensor, fake_feats: torch.Tensor, fake_y: torch.Tensor,
                     class_names: Sequence[str], suffix: str = "", seed: int = 0, **kwargs) -> dict[str, float]:
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
        out.update(named(fidelity_with_floor(real_feats[real_y == c], fake_feats[fake_y == c], seed=seed, **kwargs),
                         f"/{name}"))
    return out


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


def utility_metrics(train_x: torch.Tensor, train_y: torch.Tensor, synth_x: torch.Tensor, synth_y: torch.Tensor,
                    test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int, seeds: Sequence[int] = (0, 1),
                    steps: int = 400, batch_size: int = 32,
                    train_fn: Callable[..., torch.nn.Module] = train_classifier) -> UtilityResult:
    """Train the same classifier recipe with the same budget on real only (``real``), synthetic only
    (``tstr``) and real + synthetic (``augmented``), once per seed, and test each on held-out real data."""
    sets = {"real": (train_x, train_y), "tstr": (synth_x, synth_y),
            "augmented": (torch.cat([train_x, synth_x]), torch.cat([train_y, synth_y]))}
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
