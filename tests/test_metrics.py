import math

import torch

from medaug.dataset import load_split
from medaug.metrics import (accuracy_per_class, histogram_w1, msssim_metric, pairwise_msssim, realism_metrics,
                            train_classifier)


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
    assert real["fidelity/label_acc"] > 0.8            # the classifier learned the training split
    assert noise["fidelity/hist_w1"] > 5 * real["fidelity/hist_w1"]
    assert noise["diversity/msssim/healthy"] < real["diversity/msssim/healthy"]
    assert {"fidelity/label_acc_real", "fidelity/hist_w1_real", "diversity/msssim_real/healthy"} <= set(real)
