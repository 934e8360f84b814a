import math

import numpy as np
import pytest
import torch

from medaug.data import load_split
from medaug.metrics import (
    FeatureExtractor,
    PlaneFeatureExtractor,
    accuracy_per_class,
    cohen_kappa,
    density_coverage,
    feature_metrics,
    fidelity_metrics,
    fidelity_with_floor,
    frechet_distance,
    histogram_w1,
    in_batches,
    kernel_inception_distance,
    load_weights,
    macro_auc,
    make_classifier,
    msssim_metric,
    pairwise_msssim,
    plane_slice,
    precision_recall,
    realism_metrics,
    slices_for_training,
    train_classifier,
    utility_metrics,
)

from .test_privacy import phantoms


def test_msssim_scales_follow_image_size():
    assert len(msssim_metric((16, 16)).weights) == 2
    assert len(msssim_metric((32, 32, 32)).weights) == 3
    assert len(msssim_metric((256, 256)).weights) == 5


def test_collapsed_set_has_msssim_near_one():
    g = torch.Generator().manual_seed(0)
    varied = torch.rand(10, 1, 32, 32, generator=g) * 2 - 1
    collapsed = varied[:1].repeat(10, 1, 1, 1)
    assert pairwise_msssim(collapsed, 16, g) > 0.99
    assert pairwise_msssim(varied, 16, g) < 0.5
    assert math.isnan(pairwise_msssim(varied[:1], 16, g))


def test_histogram_distance_is_zero_for_same_and_grows_with_shift():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert histogram_w1(x, x) == 0.0
    assert abs(histogram_w1(x, x + 0.5) - 0.5) < 1e-3


def test_accuracy_per_class():
    overall, per = accuracy_per_class(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 4)
    assert overall == 0.75 and per[:3] == [1.0, 1.0, 0.5] and math.isnan(per[3])


def test_realism_metrics_rank_real_above_noise(prepared_2d):
    tx, ty = load_split(prepared_2d, "train")
    vx, vy = load_split(prepared_2d, "test")
    clf = train_classifier(tx, ty, 3, steps=120, seed=0)
    names = ["healthy", "multi_lesion", "single_lesion"]
    real = realism_metrics(clf, tx, ty, vx, vy, tx, ty, names, n_pairs=8)
    noise = realism_metrics(clf, tx, ty, vx, vy, torch.rand_like(tx) * 2 - 1, ty, names, n_pairs=8)
    assert real["fidelity/label_acc"] > 0.8  # the classifier learned the training split
    assert noise["fidelity/hist_w1"] > 5 * real["fidelity/hist_w1"]
    assert noise["diversity/msssim/healthy"] < real["diversity/msssim/healthy"]
    assert {"fidelity/label_acc_real", "fidelity/hist_w1_real", "diversity/msssim_real/healthy"} <= set(real)


def gaussian(n, d=4, shift=0.0, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_frechet_distance_is_squared_mean_shift_for_equal_covariances():
    a = gaussian(500)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-4)
    assert math.isnan(frechet_distance(a[:1], a))


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_when_shifted():
    kw = dict(n_subsets=20, subset_size=50)
    same, same_std = kernel_inception_distance(gaussian(200, seed=1), gaussian(200, seed=2), **kw)
    far, _ = kernel_inception_distance(gaussian(200, seed=1), gaussian(200, shift=1.0, seed=2), **kw)
    assert abs(same) < 3 * same_std + 0.02 and far > 10 * abs(same) and far > 0.1


def test_precision_recall_density_coverage_on_planted_sets():
    real = gaussian(200, seed=1)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    density, coverage = density_coverage(real, gaussian(200, seed=2))
    assert 0.7 < density < 1.3 and coverage > 0.9
    assert density_coverage(real, real + 100) == (0.0, 0.0)
    one_mode = real[:1].repeat(200, 1)  # every fake sample the same real point: high precision, no recall
    p, r = precision_recall(real, one_mode)
    assert p == 1.0 and r < 0.05 and density_coverage(real, one_mode)[1] < 0.05


def test_floor_uses_disjoint_equal_halves_and_matches_real():
    real = gaussian(400, seed=1)
    out = fidelity_with_floor(real, gaussian(300, seed=2), kid_subsets=10, kid_subset_size=100)
    assert {"fd", "fd_floor", "kid_std", "kid_std_floor", "coverage_floor"} <= set(out)
    assert out["fd"] < 3 * out["fd_floor"] + 0.05 and out["precision_floor"] > 0.8
    far = fidelity_with_floor(real, gaussian(300, shift=3.0, seed=2), kid_subsets=10)
    assert far["fd"] > 20 * far["fd_floor"] and far["fd"] == pytest.approx(36.0, rel=0.15)


def test_cohen_kappa_and_macro_auc():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert cohen_kappa(y, y, 3) == 1.0
    assert cohen_kappa(torch.ones_like(y), y, 3) == pytest.approx(0.0)  # everything in one class: chance
    probs = np.eye(3)[y.numpy()]
    assert macro_auc(probs, y.numpy()) == 1.0 and macro_auc(1 - probs, y.numpy()) == 0.0
    assert macro_auc(np.full((6, 3), 1 / 3), y.numpy()) == 0.5
    assert macro_auc(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 1])) == 1.0


def test_feature_extractor_takes_penultimate_pooled_features():
    net = make_classifier((16, 16), 3)
    feats = FeatureExtractor(net, "t")(torch.rand(5, 1, 16, 16) * 2 - 1)
    assert feats.shape == (5, net.class_layers.out.in_features) and feats.dtype == torch.float64
    conv = torch.nn.Conv3d(1, 4, 3)  # no Linear layer: output averaged over space
    assert FeatureExtractor(conv, "c", channels=1)(torch.rand(2, 1, 6, 6, 6)).shape == (2, 4)


def test_in_batches_keeps_order_and_returns_cpu_float_results():
    images = torch.arange(7 * 4, dtype=torch.int16).reshape(7, 1, 2, 2)
    out = in_batches(lambda x: x.flatten(1).sum(1), images, torch.device("cpu"), batch_size=3)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.tolist() == images.flatten(1).sum(1).float().tolist()


def test_plane_slices_and_25d_features():
    vol = torch.zeros(2, 1, 8, 6, 4)
    vol[:, :, 4] = 1.0  # the mid sagittal slice is bright
    s = plane_slice(vol, 0)
    assert s.shape == (2, 1, 8, 8) and s[0, 0, 1:7, 2:6].eq(1).all() and s[0, 0, 0].eq(-1).all()
    x, y = slices_for_training(vol, torch.tensor([0, 2]))
    assert x.shape == (18, 1, 8, 8) and y.tolist() == [0, 2] * 9
    planes = PlaneFeatureExtractor(FeatureExtractor(make_classifier((8, 8), 3), "2d"))
    assert planes(vol).shape[0] == 2 and "2.5D" in planes.description


def test_user_weights_load_with_prefixes_and_fail_clearly(tmp_path):
    net = make_classifier((16, 16), 3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "w.pt")
    other = load_weights(make_classifier((16, 16), 3), tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    with pytest.raises(ValueError, match="do not fit evaluate.encoder.network"):
        load_weights(make_classifier((16, 16), 5), tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError, match="encoder weights not found"):
        load_weights(net, tmp_path / "missing.pt")


class Centroids(torch.nn.Module):
    """A cheap classifier: logits = minus the distance to each class mean image."""

    def __init__(self, x, y, k):
        super().__init__()
        self.means = torch.stack([x[y == c].flatten(1).mean(0) for c in range(k)])

    def forward(self, x):
        return -torch.cdist(x.flatten(1), self.means)


def levels(n_per_class, seed):
    """Images whose class is their mean intensity (-0.5, 0, 0.5), with noise."""
    y = torch.arange(3).repeat_interleave(n_per_class)
    noise = 0.3 * torch.randn(len(y), 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return (y.float() - 1).view(-1, 1, 1, 1) * 0.5 + noise, y


def test_utility_tstr_and_augmentation_gain_with_planted_sets():
    tx, ty = levels(10, seed=0)
    vx, vy = levels(10, seed=1)
    fit = lambda x, y, k, **kw: Centroids(x, y, k)  # noqa: E731
    good = utility_metrics(tx, ty, vx, vy, vx, vy, 3, seeds=(0, 1), train_fn=fit).metrics()
    wrong = utility_metrics(tx, ty, vx, (vy + 1) % 3, vx, vy, 3, seeds=(0, 1), train_fn=fit).metrics()  # mislabelled
    assert good["utility/real_acc"] > 0.9 and good["utility/tstr_acc"] == 1.0 and good["utility/real_auc"] > 0.95
    assert wrong["utility/tstr_acc"] == 0.0 and wrong["utility/tstr_auc"] < 0.3 and wrong["utility/aug_gain_acc"] < -0.2
    assert good["utility/aug_gain_acc"] >= 0 and good["utility/real_acc_std"] == 0.0
    assert set(good) >= {"utility/augmented_auc", "utility/aug_gain_auc_std", "utility/tstr_ratio_acc"}


@pytest.mark.slow
def test_planted_noise_and_collapsed_class_against_real():
    tx, ty = phantoms(20, seed=0, size=32)
    vx, vy = phantoms(20, seed=1, size=32)
    hx, hy = phantoms(20, seed=2, size=32)
    clf = train_classifier(tx, ty, 3, steps=200, seed=0, progress=False)
    enc = FeatureExtractor(clf, "t")
    names = ["healthy", "single_lesion", "multi_lesion"]
    noise = torch.rand_like(vx) * 2 - 1
    collapsed = vx.clone()
    collapsed[vy == 1] = vx[vy == 1][0]
    kw = dict(kid_subsets=10)
    real = fidelity_metrics(enc(hx), hy, enc(vx), vy, names, **kw)
    fake = fidelity_metrics(enc(hx), hy, enc(noise), vy, names, **kw)
    assert real["fidelity/fd"] < 2 * real["fidelity/fd_floor"] and real["fidelity/precision"] > 0.6
    assert fake["fidelity/fd"] > 10 * fake["fidelity/fd_floor"]
    assert fake["fidelity/precision"] < 0.2 < 0.8 < real["fidelity/precision_floor"]
    assert fake["fidelity/density"] < 0.2 and fake["fidelity/coverage"] < 0.5 < real["fidelity/coverage"]
    assert fake["fidelity/kid"] > 10 * max(real["fidelity/kid"], real["fidelity/kid_floor"], 0.01)
    m = realism_metrics(clf, tx, ty, hx, hy, noise, vy, names, n_pairs=16)
    assert abs(m["fidelity/label_kappa"]) < 0.2 and m["fidelity/label_acc"] < 0.5  # noise: chance level
    assert m["fidelity/label_kappa_real"] > 0.7 and m["fidelity/label_acc_real"] > 0.8
    m = realism_metrics(clf, tx, ty, hx, hy, collapsed, vy, names, n_pairs=16)
    assert m["diversity/msssim/single_lesion"] > 0.99 > m["diversity/msssim_real/single_lesion"] + 0.1
    assert m["diversity/msssim/healthy"] < 0.95


def test_feature_extractor_leaves_the_network_usable_as_a_classifier():
    net = make_classifier((16, 16), 3)
    enc = FeatureExtractor(net, "t")
    x = torch.rand(4, 1, 16, 16)
    before = enc(x)
    held = len(enc._captured)
    logits = [net(x) for _ in range(3)]  # running the classifier does not feed the extractor
    assert logits[0].shape == (4, 3) and len(enc._captured) == held == 1 and torch.equal(enc(x), before)


def test_kid_spread_is_real_when_sets_are_smaller_than_the_subset_size():
    # 40 vs 40 with subset_size=100: subsets of the whole set would all be the same set (std exactly 0)
    a, b = gaussian(40, seed=1), gaussian(40, shift=0.3, seed=2)
    kid, std = kernel_inception_distance(a, b, n_subsets=50, subset_size=100)
    assert std > 0.05 and std > 0.1 * abs(kid)
    out = fidelity_with_floor(gaussian(80, seed=3), a, kid_subsets=50, kid_subset_size=100)  # the demo's shape
    assert out["kid_std"] > 0.05 and out["kid_std_floor"] > 0.05 and out["kid_too_small"] == 0.0


def test_kid_is_unbiased_on_average_for_small_draws_of_one_distribution():
    same = [kernel_inception_distance(gaussian(40, seed=s), gaussian(40, seed=100 + s), 20)[0] for s in range(30)]
    far = [
        kernel_inception_distance(gaussian(40, seed=s), gaussian(40, shift=0.5, seed=100 + s), 20)[0] for s in range(30)
    ]
    sem = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * sem and np.mean(far) > 10 * sem


def test_kid_on_too_small_sets_is_nan_with_a_flag():
    small = feature_metrics(gaussian(9, seed=1), gaussian(30, seed=2))
    assert math.isnan(small["kid"]) and math.isnan(small["kid_std"]) and small["kid_too_small"] == 1.0
    assert math.isfinite(small["fd"])  # the other metrics are still computed
    assert feature_metrics(gaussian(10, seed=1), gaussian(10, seed=2))["kid_too_small"] == 0.0
    y = torch.tensor([0] * 40 + [1] * 10)
    out = fidelity_metrics(gaussian(50, seed=1), y, gaussian(50, seed=2), y, ["big", "tiny"], kid_subsets=5)
    assert out["fidelity/kid_too_small"] == 0.0 and math.isfinite(out["fidelity/kid"])
    assert out["fidelity/kid_too_small/tiny"] == 1.0 and math.isnan(out["fidelity/kid/tiny"])
    assert not any("kid_too_small" in k and "floor" in k for k in out)  # the floor has the same size by design
