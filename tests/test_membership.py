"""Membership inference (medaug.membership): the ROC maths on planted scores, the loss attack on a deliberately
overfit tiny model, and the attack inside `medaug evaluate`."""

import json

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from medaug.membership import (
    MIASettings,
    auc_interval,
    denoising_errors,
    find_checkpoint,
    membership_audit,
    membership_metrics,
    roc_auc,
    subsample,
    tpr_at_fpr,
)
from medaug.model import EMA, network_from_spec, save_checkpoint
from medaug.privacy import PrivacyFlags, judge, verdict_of
from medaug.training import DiffusionStep, TrainSettings, fit

from .test_model import SPEC


def test_auc_of_separated_reversed_tied_and_identical_scores():
    assert roc_auc([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == 1.0 and roc_auc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert roc_auc([1.0, 1.0], [1.0, 1.0]) == 0.5  # ties count half
    assert roc_auc([2.0, 0.0], [1.0]) == 0.5 and np.isnan(roc_auc([], [1.0]))
    auc, lo, hi = auc_interval(np.arange(50.0) + 100, np.arange(50.0), n_boot=200)
    assert (auc, lo, hi) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    auc, lo, hi = auc_interval(rng.normal(size=2000), rng.normal(size=2000), n_boot=500)
    assert abs(auc - 0.5) < 0.03 and lo < 0.5 < hi and hi - lo < 0.08
    # a known shift: N(1, 1) against N(0, 1) has AUC Phi(1 / sqrt 2) = 0.760
    auc, lo, hi = auc_interval(rng.normal(1, 1, 3000), rng.normal(0, 1, 3000), n_boot=300, seed=1)
    assert abs(auc - 0.760) < 0.02 and lo < 0.760 < hi


def test_bootstrap_interval_is_seeded():
    rng = np.random.default_rng(5)
    m, n = rng.normal(0.3, 1, 40), rng.normal(0, 1, 40)
    assert auc_interval(m, n, 300, seed=2) == auc_interval(m, n, 300, seed=2)
    assert auc_interval(m, n, 300, seed=2)[1:] != auc_interval(m, n, 300, seed=3)[1:]


def test_tpr_at_low_fpr_counts_members_above_the_non_members_it_may_pass():
    nonmember = np.arange(200.0)  # 1 % of 200: the two highest non-members may be passed
    member = np.array([150.0, 197.5, 198.5, 199.5, 250.0])
    assert tpr_at_fpr(member, nonmember, 0.01) == 0.8  # above 197 (198 and 199 pass: FPR 1 %)
    assert tpr_at_fpr(member, nonmember, 0.0) == 0.4  # no non-member passed: above 199
    assert tpr_at_fpr(np.arange(5.0), np.arange(5.0) + 10, 0.01) == 0.0
    assert tpr_at_fpr([11.0, 3.0], np.arange(10.0), 0.01) == 0.5  # < 100 non-members: above the highest


def test_membership_metrics_per_class_and_sizes():
    ms, ns = np.array([5.0, 6.0, 0.0, 1.0]), np.array([1.0, 2.0, 0.5, 0.2])
    m = membership_metrics(ms, ns, [0, 0, 1, 1], [0, 0, 1, 1], ["a", "b"], n_boot=50)
    assert m["privacy/mia_auc/a"] == 1.0 and m["privacy/mia_auc/b"] == 0.5
    assert m["privacy/mia_members"] == 4 and m["privacy/mia_nonmembers"] == 4
    assert m["privacy/mia_auc"] == roc_auc(ms, ns) and m["privacy/mia_tpr_at_1pct_fpr"] == 0.5


def test_subsample_caps_each_class_reproducibly():
    labels = torch.tensor([0] * 10 + [1] * 3)
    idx = subsample(labels, 4, seed=1)
    assert torch.equal(idx, subsample(labels, 4, seed=1)) and torch.bincount(labels[idx]).tolist() == [4, 3]


def test_the_mia_flag_joins_the_verdict_only_when_significant():
    base = {
        "privacy/copy_rate": 0.0,
        "privacy/copies": 0,
        "privacy/threshold": 0.9,
        "privacy/memorised_patients": 0.0,
        "privacy/closer_to_train": 0.5,
        "privacy/closer_to_train_p": 0.5,
        "privacy/dcr_ratio": 1.2,
    }
    assert [c.name for c in judge(base, PrivacyFlags(), 10)] == ["copy_rate", "closer_to_train", "dcr_ratio"]
    mia = {"privacy/mia_auc": 0.72, "privacy/mia_auc_lo": 0.61, "privacy/mia_auc_hi": 0.8}
    checks = judge(base | mia | {"privacy/mia_tpr_at_1pct_fpr": 0.1}, PrivacyFlags(), 10)
    assert verdict_of(checks) == "fail" and checks[-1].short == "mia_auc 0.72 > 0.60 (95% CI 0.61-0.80)"
    wide = base | mia | {"privacy/mia_auc_lo": 0.45, "privacy/mia_tpr_at_1pct_fpr": 0.1}
    checks = judge(wide, PrivacyFlags(), 10)
    assert verdict_of(checks) == "pass" and "includes 0.5: no flag" in checks[-1].line
    assert verdict_of(judge(base | mia | {"privacy/mia_tpr_at_1pct_fpr": 0.1}, PrivacyFlags(max_mia_auc=0.8), 10)) == (
        "pass"
    )


@pytest.fixture(scope="module")
def overfit():
    """A tiny UNet trained hard on 16 random 8x8 images (members); 32 others never seen (two non-member sets)."""
    torch.manual_seed(0)
    net = network_from_spec({**SPEC, "spatial_dims": 2})
    sch = DDPMScheduler(num_train_timesteps=100)
    x = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.arange(48) % 2
    ema = EMA(net, 0.9)
    step = DiffusionStep(net, sch, x[:16], y[:16], null_class=2, p_uncond=0.0)
    fit(net, ema, torch.optim.AdamW(net.parameters(), lr=3e-3), step, TrainSettings(max_steps=30, batch_size=16))
    return ema.model, sch, x, y, ema


@pytest.mark.slow  # ~20 s on a loaded 2-core CPU: the overfit training
def test_loss_attack_finds_the_members_of_an_overfit_model_and_not_two_unseen_sets(overfit):
    net, sch, x, y, _ = overfit
    errors = denoising_errors(net, sch, x, y, null_class=2, timesteps=(0.05, 0.1, 0.2), seeds=(0, 1), batch_size=7)
    whole = denoising_errors(net, sch, x, y, null_class=2, timesteps=(0.05, 0.1, 0.2), seeds=(0, 1))
    torch.testing.assert_close(errors, whole, rtol=0, atol=1e-5)  # batches of 7 or one: the same (to float rounding)
    score = -errors.numpy()
    auc, lo, _ = auc_interval(score[:16], score[16:32], 500)
    assert auc > 0.8 and lo > 0.65  # measured: 0.91 (95 % CI 0.78-1.0) after 30 steps
    auc, lo, hi = auc_interval(score[32:], score[16:32], 500)
    assert lo < 0.5 < hi and abs(auc - 0.5) < 0.25  # two held-out sets: no signal (measured 0.56, 0.37-0.75)
    m = membership_audit(net, sch, (x[:16], y[:16]), (x[16:32], y[16:32]), ["a", "b"], MIASettings(max_per_class=5))
    assert m["privacy/mia_members"] == 10 and m["privacy/mia_nonmembers"] == 10
    assert m["privacy/mia_loss_member"] < m["privacy/mia_loss_nonmember"] and "privacy/mia_auc/b" in m


def test_settings_refuse_bad_values():
    assert MIASettings.from_dict({"timesteps": [0.1], "seeds": [3]}).timesteps == (0.1,)
    with pytest.raises(ValueError, match="fractions of the training schedule"):
        MIASettings.from_dict({"timesteps": [100]})
    with pytest.raises(ValueError, match="evaluate.mia.rounds: unknown setting"):
        MIASettings.from_dict({"rounds": 3})


def test_find_checkpoint_by_the_samples_checkpoint_id(tmp_path):
    from medaug.model import file_id

    net = torch.nn.Linear(2, 2)
    ema = EMA(net)
    a = save_checkpoint(tmp_path / "last.pt", model=net, ema=ema, optimizer=None, step=1, config={}, meta={})
    b = save_checkpoint(tmp_path / "step_2.pt", model=net, ema=ema, optimizer=None, step=2, config={}, meta={})
    assert find_checkpoint(a, file_id(b)) == b and find_checkpoint(a, file_id(a)) == a
    assert find_checkpoint(a, "0123") is None and find_checkpoint(None, file_id(a)) is None


@pytest.mark.slow
def test_evaluate_runs_the_attack_on_the_samples_checkpoint(tmp_path):
    from pipelines import evaluate, prepare, sample, train

    from .conftest import TINY, compose_cfg

    overrides = ["experiment=demo_2d", *TINY, "evaluate.utility.seeds=[]", "evaluate.mia.bootstrap=50"]
    for stage in (prepare, train, sample):
        stage.run(compose_cfg(stage.__name__.split(".")[-1], tmp_path, overrides))
    result = evaluate.run(compose_cfg("evaluate", tmp_path, overrides))
    assert 0.0 <= result["privacy/mia_auc"] <= 1.0 and result["privacy/mia_members"] > 0
    privacy = json.loads((tmp_path / "eval" / "privacy.json").read_text())
    assert privacy["mia"]["run"] is True and privacy["mia"]["checkpoint_step"] == 4
    assert privacy["checks"][-1].startswith("membership-inference AUC")
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "membership-inference AUC" in report and "- membership inference: loss attack on checkpoint" in report
    # samples of another checkpoint: auto skips the attack and says why; true refuses
    (tmp_path / "train" / "checkpoints" / "last.pt").rename(tmp_path / "elsewhere.pt")
    result = evaluate.run(compose_cfg("evaluate", tmp_path, overrides))
    assert "privacy/mia_auc" not in result
    assert "not" in json.loads((tmp_path / "eval" / "privacy.json").read_text())["mia"]["why"]
    with pytest.raises(FileNotFoundError, match="evaluate.mia.enabled=true"):
        evaluate.run(compose_cfg("evaluate", tmp_path, [*overrides, "evaluate.mia.enabled=true"]))


@pytest.fixture(scope="module")
def overfit_masked():
    """As ``overfit``, for a mask+class model (each image with its own random label map as the condition), trained
    hard on the first 16 of 80 images, and for a mask model (``generates=mask``: the label maps as ``2 onehot - 1``
    images) trained hard on the first 8 (random label maps are harder to memorise than random images)."""
    from medaug.conditioning import Conditioning, mask_to_image

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(80, 1, 8, 8, generator=gen) * 2 - 1
    masks = (torch.rand(80, 1, 8, 8, generator=gen) > 0.6).long()
    y = torch.arange(80) % 2
    sch = DDPMScheduler(num_train_timesteps=100)
    labels = {"background": 0, "lesion": 1}
    out = {}
    for kind, cond, images, n, steps in (
        ("image", Conditioning(True, labels), x, 16, 30),
        ("mask", Conditioning(True, {}, "mask", labels), mask_to_image(masks, 2), 8, 60),
    ):
        torch.manual_seed(0)
        channels = {"in_channels": 3, "out_channels": 1} if kind == "image" else {"in_channels": 2, "out_channels": 2}
        net = network_from_spec({**SPEC, **channels, "num_class_embeds": 3})
        ema = EMA(net, 0.9)
        step = DiffusionStep(
            net, sch, images[:n], y[:n], null_class=2, p_uncond=0.0, masks=masks[:n], conditioning=cond
        )
        fit(net, ema, torch.optim.AdamW(net.parameters(), lr=3e-3), step, TrainSettings(max_steps=steps, batch_size=n))
        out[kind] = (ema.model, cond, n)
    return out, sch, x, y, masks


@pytest.mark.slow  # ~60 s on a loaded 2-core CPU: two overfit trainings
@pytest.mark.parametrize("kind", ["image", "mask"])
def test_loss_attack_on_mask_conditioned_and_mask_models_finds_members_and_not_two_unseen_sets(overfit_masked, kind):
    models, sch, x, y, masks = overfit_masked
    net, cond, n = models[kind]
    settings = MIASettings(max_per_class=16, bootstrap=300)
    side = {"members": slice(0, n), "held": slice(16, 48), "other": slice(48, 80)}
    data = {k: (x[s], y[s], masks[s]) for k, s in side.items()}
    m = membership_audit(net, sch, data["members"], data["held"], ["a", "b"], settings, conditioning=cond)
    # measured: image model AUC 0.98 (95 % CI 0.94-1.0), mask model 0.84 (0.69-0.95)
    assert m["privacy/mia_auc"] > 0.75 and m["privacy/mia_auc_lo"] > 0.6
    assert m["privacy/mia_members"] == n and m["privacy/mia_loss_member"] < m["privacy/mia_loss_nonmember"]
    null = membership_audit(net, sch, data["other"], data["held"], ["a", "b"], settings, conditioning=cond)
    # two unseen sets: measured 0.58 (0.44-0.72) and 0.43 (0.28-0.57)
    assert null["privacy/mia_auc_lo"] < 0.5 < null["privacy/mia_auc_hi"] and abs(null["privacy/mia_auc"] - 0.5) < 0.2
    if kind == "image":  # the condition matters: the members' images with other members' masks look less seen
        swapped = (x[:16], y[:16], masks[:16].roll(1, 0))
        assert (
            membership_audit(net, sch, swapped, data["held"], ["a", "b"], settings, conditioning=cond)[
                "privacy/mia_loss_member"
            ]
            > m["privacy/mia_loss_member"]
        )
    with pytest.raises(ValueError, match="pass \\(images, labels, masks\\)"):
        membership_audit(net, sch, (x[:16], y[:16]), (x[16:32], y[16:32]), ["a", "b"], settings, conditioning=cond)
