"""Memorisation audit with planted truth: copies must fail, unseen real patients must pass."""

import numpy as np
import pytest
import torch

from medaug.metrics import FeatureExtractor, train_classifier
from medaug.phantoms import make_phantom
from medaug.preprocessing import IntensityWindow
from medaug.privacy import PrivacyFlags, closer_to_train, copy_filter, copy_scores, privacy_audit, standardise

WINDOW = IntensityWindow(-160.0, 240.0)


def phantoms(n_per_class: int, seed: int, size: int = 16):
    """``(3 n, 1, size, size)`` demo phantoms in [-1, 1] and their labels; a new seed = new patients."""
    rng = np.random.default_rng(seed)
    x = [WINDOW.to_model(make_phantom(c, (size, size), rng)) for c in range(3) for _ in range(n_per_class)]
    return torch.from_numpy(np.stack(x)[:, None]), torch.arange(3).repeat_interleave(n_per_class)


@pytest.fixture(scope="module")
def data():
    train_x, train_y = phantoms(20, seed=0)
    val_x, val_y = phantoms(20, seed=1)
    held_x, _ = phantoms(20, seed=2)
    patients = [f"patient_{i // 2:04d}" for i in range(len(train_x))]  # two images per patient
    encoder = FeatureExtractor(train_classifier(train_x, train_y, 3, steps=40, progress=False), "test")
    return dict(train=train_x, train_y=train_y, val=val_x, val_y=val_y, held=held_x, patients=patients, encoder=encoder)


def test_standardise_makes_dot_products_correlations():
    x = torch.rand(1, 1, 8, 8)
    rows = standardise(torch.cat([x, 2 * x + 1, -x, torch.zeros_like(x)]))
    corr = rows @ rows[0]
    assert torch.allclose(corr[:3], torch.tensor([1.0, 1.0, -1.0]), atol=1e-5) and corr[3] == 0


def test_copy_filter_keeps_scores_at_or_below_threshold():
    keep = copy_filter(np.array([0.5, 0.9, 0.95, 1.0]), 0.9)
    assert keep.tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="not a finite number"):
        copy_filter(np.array([0.5]), float("nan"))


def test_training_set_as_synthetic_fails_with_copy_rate_one(data):
    audit = privacy_audit(
        data["train"],
        data["train"],
        data["held"],
        data["patients"],
        data["encoder"],
        synth_labels=data["train_y"],
        class_names=["a", "b", "c"],
    )
    m = audit.metrics
    assert audit.verdict == "fail" and m["privacy/verdict_code"] == 2
    assert m["privacy/copy_rate"] == 1.0 and m["privacy/copy_rate_embedding"] == 1.0
    assert m["privacy/copy_rate/b"] == 1.0 and m["privacy/memorised_patients"] == 1.0
    assert m["privacy/dcr_ratio"] < 0.01 and m["privacy/closer_to_train"] > 0.55
    assert np.array_equal(audit.scores.nn_index, np.arange(len(data["train"])))  # each finds itself
    assert any("copy rate 100.0%" in r for r in audit.reasons)


def test_near_copies_are_caught_and_filtered(data):
    noisy = data["train"][:30] + 0.02 * torch.randn(30, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    synth = torch.cat([noisy, data["val"][:30]])
    scores = copy_scores(synth, data["train"], data["held"], space="pixel")
    keep = copy_filter(scores.score, scores.threshold)
    assert not keep[:30].any()  # every near copy dropped
    assert keep[30:].mean() >= 0.85  # new patients mostly kept
    assert (scores.nn_index[:30] == np.arange(30)).all()


def test_heldout_real_passes_with_copy_rate_near_five_percent(data):
    held_self = copy_scores(data["held"], data["train"], data["held"])  # calibration set: 5 % by construction
    assert abs(held_self.is_copy.mean() - 0.05) <= 0.02
    audit = privacy_audit(data["val"], data["train"], data["held"], data["patients"], data["encoder"])
    m = audit.metrics
    assert audit.verdict == "pass", audit.reasons
    assert m["privacy/copy_rate"] <= 0.10 and m["privacy/memorised_patients"] <= 0.15
    assert 0.35 <= m["privacy/closer_to_train"] <= 0.6 and m["privacy/closer_to_train_p"] > 0.05
    assert m["privacy/dcr_ratio"] > 0.9
    assert 0.9 < m["privacy/threshold_pixel"] < 1.0


def test_flags_are_configurable_and_drive_the_verdict(data):
    half = torch.cat([data["train"][:15], data["val"][:45]])  # 25 % copies
    strict = privacy_audit(half, data["train"], data["held"], data["patients"])
    assert strict.verdict == "fail" and 0.24 <= strict.metrics["privacy/copy_rate"] <= 0.35
    lenient = privacy_audit(
        half,
        data["train"],
        data["held"],
        data["patients"],
        flags=PrivacyFlags(max_copy_rate=0.5, max_closer_share=1.0, min_dcr_ratio=0.0),
    )
    assert lenient.verdict == "pass" and lenient.reasons == []
    assert lenient.summary()["flags"]["max_copy_rate"] == 0.5


def test_bad_settings_raise_clear_errors(data):
    with pytest.raises(ValueError, match="embedding needs an encoder"):
        copy_scores(data["val"], data["train"], data["held"], space="embedding")
    with pytest.raises(ValueError, match="percentile"):
        copy_scores(data["val"], data["train"], data["held"], percentile=100)
    with pytest.raises(ValueError, match="held-out real images"):
        privacy_audit(data["val"], data["train"], data["held"][:1], data["patients"])


def test_blurred_memorisation_below_the_copy_threshold_fails_on_closer_to_train(data):
    noisy = data["train"] + 0.15 * torch.randn(data["train"].shape, generator=torch.Generator().manual_seed(0))
    audit = privacy_audit(noisy, data["train"], data["held"], data["patients"])
    assert audit.metrics["privacy/copy_rate"] == 0.0  # no single image is a copy...
    assert audit.metrics["privacy/closer_to_train"] > 0.95 and audit.metrics["privacy/closer_to_train_p"] < 1e-6
    assert audit.verdict == "fail" and audit.reasons[0].startswith("closer-to-train share 1.00")  # ...but it memorised


def test_closer_to_train_p_value_holds_its_level_and_finds_noisy_copies():
    gen = torch.Generator().manual_seed(1)

    def p_value(trial: int, noisy_copies: int) -> float:
        train, held, synth = (torch.randn(n, 16, generator=gen) for n in (80, 40, 60))
        pick = torch.randint(0, 80, (noisy_copies,), generator=gen)
        synth[:noisy_copies] = train[pick] + 0.7 * torch.randn(noisy_copies, 16, generator=gen)
        return closer_to_train(*(standardise(x) for x in (synth, train, held)), seed=trial)[1]

    null = np.array([p_value(i, 0) for i in range(300)])
    planted = np.array([p_value(i, 30) for i in range(80)])  # half the set: noisy copies
    assert 0.02 <= (null < 0.05).mean() <= 0.08  # about the nominal 5 % of null sets flagged (0.04)
    assert (planted < 0.05).mean() >= 0.7  # 0.78; a binomial test of the averaged share: 0.48


def test_a_non_significant_closer_share_is_reported_without_a_flag(data):
    few = data["val"][:8]
    audit = privacy_audit(few, data["train"], data["held"], data["patients"], flags=PrivacyFlags(max_closer_share=0.0))
    assert audit.metrics["privacy/closer_to_train_p"] >= 0.05 and audit.reasons == []
    assert "not significant" in audit.checks[1] and audit.verdict == "pass"


def test_pixel_view_bounds_memory_and_keeps_copies_copies():
    from medaug.privacy import pixel_view

    vols = torch.rand(3, 1, 64, 64, 40)
    small = pixel_view(vols, max_pixels=16**3)
    assert small.shape[2:].numel() <= 16**3 and small.shape[:2] == (3, 1) and small.shape[2] == small.shape[3]
    assert pixel_view(vols[:, :, :8, :8, :8]).shape == (3, 1, 8, 8, 8)  # small images untouched
    scores = copy_scores(vols[:1], vols, vols[1:])
    assert scores.score[0] == pytest.approx(1.0, abs=1e-5) and scores.nn_index[0] == 0


def test_replace_copies_keeps_class_counts_with_fresh_indices():
    from medaug.privacy import replace_copies

    images = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    keep = np.array([True, False, True, True, False, True])
    calls = []

    def generate(want, first):
        calls.append((want.tolist(), first))
        return torch.full((len(want), 1, 1, 1), 100.0 + first)

    scores = iter([np.array([0.99, 0.1]), np.array([0.2])])  # round 1: the class-0 candidate is a copy
    x, y, source, s = replace_copies(images, labels, keep, 0.5, generate, lambda imgs: next(scores))
    assert calls == [([0, 2], 6), ([0], 8)]
    assert sorted(y.tolist()) == sorted(labels.tolist())
    assert source.tolist() == [0, 2, 3, 5, 7, 8]
    assert x[:4, 0, 0, 0].tolist() == [0, 2, 3, 5] and x[4:, 0, 0, 0].tolist() == [106.0, 108.0]
    assert np.isnan(s[:4]).all() and s[4:].tolist() == [0.1, 0.2]


def test_pixel_copy_scores_find_copies():
    from medaug.privacy import pixel_copy_scores

    g = torch.Generator().manual_seed(0)
    train = torch.rand(5, 1, 8, 8, generator=g)
    scores = pixel_copy_scores(torch.cat([train[:2], torch.rand(2, 1, 8, 8, generator=g)]), train)
    assert scores[:2] == pytest.approx([1.0, 1.0]) and (scores[2:] < 0.7).all()
