"""Per-patient differentially private training: sampler, Opacus per-sample gradients on MONAI's UNet,
clipping, the accountant, refusals, and one private run through `train`."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from medaug.dp import DPSettings, PrivateTraining, epsilon_of, patient_codes, poisson_patient_rows, private_training
from medaug.model import load_checkpoint
from medaug.training import StepNoise, diffusion_loss
from pipelines import export, prepare, sample, train

from .conftest import TINY, compose_cfg


def tiny_unet(attention: bool = True) -> DiffusionModelUNet:
    torch.manual_seed(0)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        attention_levels=(False, attention),
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=8,
        num_class_embeds=4,
        use_flash_attention=True,
    )


def test_poisson_sampler_takes_at_most_one_item_per_patient_at_rate_q():
    patients = [f"p{i}" for i in range(40) for _ in range(1 + i % 5)]  # 40 patients, 1..5 items each
    codes = patient_codes(patients)
    assert codes.max() == 39 and codes.numel() == len(patients)
    g = torch.Generator().manual_seed(0)
    sizes, picked_of_p4 = [], torch.zeros(5)
    for _ in range(2000):
        rows = poisson_patient_rows(codes, 0.25, g)
        drawn = codes[rows]
        assert drawn.unique().numel() == drawn.numel()  # never two items of one patient
        sizes.append(len(rows))
        for r in rows[drawn == 4]:  # patient 4 has items 10..14
            picked_of_p4[int(r) - 10] += 1
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 0.25 * 40) < 0.3  # E[B] = q P
    assert (picked_of_p4 / picked_of_p4.sum() - 0.2).abs().max() < 0.06  # its items uniformly


@pytest.mark.parametrize("attention", [False, True], ids=["conv", "attention"])
def test_opacus_per_sample_gradients_of_monai_unet_equal_one_at_a_time(attention):
    net = tiny_unet(attention)
    reference = copy.deepcopy(net)  # no hooks
    sch = DDPMScheduler(num_train_timesteps=100)
    dp = PrivateTraining(
        net,
        torch.arange(6),
        DPSettings(enabled=True, noise_multiplier=1.0, noise_multiplicity=1),
        expected_batch=3,
        max_steps=10,
    )
    g = torch.Generator().manual_seed(1)
    x0, y = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1, torch.tensor([0, 1, 3])
    draws = StepNoise(torch.randn(3, 1, 16, 16, generator=g), torch.tensor([5, 50, 99]), torch.zeros(3, dtype=bool))
    diffusion_loss(net, sch, x0, y, null_class=3, draws=draws).mean().backward()
    per_sample = dp.per_example_grads(3)
    for i in range(3):
        one = StepNoise(*(d[i : i + 1] for d in draws))
        grads = torch.autograd.grad(
            diffusion_loss(reference, sch, x0[i : i + 1], y[i : i + 1], null_class=3, draws=one).mean(),
            list(reference.parameters()),
        )
        for (name, _), ps, gi in zip(net.named_parameters(), per_sample, grads):
            torch.testing.assert_close(ps[i], gi, atol=1e-6, rtol=1e-4, msg=f"{name} of example {i}")


def test_privatize_clips_each_example_and_averages_its_noises_first():
    net = tiny_unet(False)
    clip = 1e-3
    dp = PrivateTraining(
        net,
        torch.arange(8),
        DPSettings(enabled=True, noise_multiplier=0.0, max_grad_norm=clip, noise_multiplicity=2),
        expected_batch=4,
        max_steps=10,
    )
    sch = DDPMScheduler(num_train_timesteps=100)
    rows = torch.tensor([0, 0, 1, 1])  # 2 examples x 2 noises
    x0 = torch.rand(8, 1, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    diffusion_loss(net, sch, x0[rows], torch.zeros(4, dtype=torch.long), null_class=3, generator=g).mean().backward()
    grads = [p.grad_sample.clone() for p in dp.params]
    terms = dp.privatize(0, 4, torch.Generator().manual_seed(0))
    assert terms["privacy/batch_patients"] == 2 and terms["privacy/clipped_share"] == 1.0
    # the examples' gradients: the mean over their two rows, each clipped to norm C, summed, / (q P = 4)
    per_example = [torch.cat([g[2 * i : 2 * i + 2].mean(0).flatten() for g in grads]) for i in range(2)]
    expect = sum(e * min(1.0, clip / float(e.norm())) for e in per_example) / 4
    got = torch.cat([p.grad.flatten() for p in dp.params])
    torch.testing.assert_close(got, expect, atol=1e-9, rtol=1e-4)
    assert float(got.norm()) <= 2 * clip / 4 + 1e-9
    assert dp.steps == 1


def test_noise_has_std_sigma_c_over_expected_batch_on_an_empty_step():
    net = tiny_unet(False)
    dp = PrivateTraining(
        net,
        torch.arange(10),
        DPSettings(enabled=True, noise_multiplier=2.0, max_grad_norm=0.5),
        expected_batch=5,
        max_steps=10,
    )
    dp.privatize(3, 0, torch.Generator().manual_seed(0))  # nobody drawn: noise only
    noise = torch.cat([p.grad.flatten() for p in dp.params])
    assert abs(float(noise.std()) - 2.0 * 0.5 / 5) < 0.01 and dp.steps == 4


def test_epsilon_matches_opacus_accountant_and_grows_with_steps():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(300):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    assert epsilon_of(1.1, 0.05, 300, 1e-4) == pytest.approx(acc.get_epsilon(delta=1e-4), rel=1e-9)
    eps = [epsilon_of(1.1, 0.05, s, 1e-4) for s in (0, 10, 100, 1000)]
    assert eps[0] == 0 and eps == sorted(eps) and len(set(eps)) == 4
    dp = PrivateTraining(
        tiny_unet(False),
        torch.arange(100),
        DPSettings(enabled=True, target_epsilon=8.0),
        expected_batch=10,
        max_steps=200,
    )
    assert dp.delta == pytest.approx(1e-3) and dp.sample_rate == pytest.approx(0.1)
    assert 7.8 < dp.epsilon(200) <= 8.0 + 1e-6 and dp.epsilon() == 0.0  # the target, reached at max_steps


@pytest.mark.parametrize(
    "section, match",
    [
        (dict(target_epsilon=5.0, noise_multiplier=1.0), "exactly one of target_epsilon and noise_multiplier"),
        (dict(), "exactly one of target_epsilon and noise_multiplier"),
        (dict(noise_multiplier=1.0, delta=0.2), r"delta=0.2 must be in \(0, 1/patients = 0.1\)"),
        (dict(noise_multiplier=1.0, max_grad_norm=0), "max_grad_norm=0 must be > 0"),
        (dict(noise_multiplier=1.0, sigma=3), r"unknown key\(s\) \['sigma'\]"),
    ],
)
def test_refuses_nonsense_settings(section, match):
    with pytest.raises(ValueError, match=match):
        private_training(
            tiny_unet(False), {"enabled": True, **section}, [str(i) for i in range(10)], expected_batch=4, max_steps=10
        )


def test_refuses_what_it_cannot_make_private():
    with pytest.raises(ValueError, match="does not support 2 processes"):
        private_training(
            tiny_unet(False),
            {"enabled": True, "noise_multiplier": 1.0},
            ["a", "b"],
            expected_batch=1,
            max_steps=1,
            world_size=2,
        )
    assert private_training(tiny_unet(False), {"enabled": False}, ["a"], expected_batch=1, max_steps=1) is None


def test_private_training_through_train_stores_epsilon_in_checkpoint_samples_and_card(tmp_path, caplog):
    overrides = [
        "experiment=demo_2d",
        *TINY,
        "training.dp.enabled=true",
        "training.dp.target_epsilon=20",
        "training.dp.noise_multiplicity=2",
    ]
    prepare.run(compose_cfg("prepare", tmp_path, overrides))
    result = train.run(compose_cfg("train", tmp_path, overrides))
    assert result["train/step"] == 4
    meta = load_checkpoint(tmp_path / "train" / "checkpoints" / "last.pt").meta["dp"]
    assert meta["unit"] == "patient" and meta["steps"] == 4 and meta["noise_multiplicity"] == 2
    assert 19.0 < meta["epsilon"] <= 20.0 + 1e-6 and meta["delta"] == pytest.approx(0.1 / meta["patients"])
    assert meta["epsilon"] == pytest.approx(epsilon_of(meta["noise_multiplier"], meta["sample_rate"], 4, meta["delta"]))
    assert meta["history"] == [[meta["noise_multiplier"], meta["sample_rate"], 4]]
    resumed = train.run(compose_cfg("train", tmp_path, [*overrides, "training.max_steps=6"]))  # new sigma for 6
    assert resumed["train/step"] == 6
    both = load_checkpoint(tmp_path / "train" / "checkpoints" / "last.pt").meta["dp"]
    assert [h[2] for h in both["history"]] == [4, 2] and both["history"][1][0] != meta["noise_multiplier"]
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for sigma, q, steps in both["history"]:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert both["epsilon"] == pytest.approx(acc.get_epsilon(delta=both["delta"]), rel=1e-6) and both["steps"] == 6
    meta = both
    caplog.set_level("INFO", logger="medaug")
    sample.run(compose_cfg("sample", tmp_path, overrides))
    said = f"(ε = {meta['epsilon']:.2f}, δ = {meta['delta']:.2g}) per patient"
    assert said in caplog.text  # sample prints the guarantee
    export.run(compose_cfg("export", tmp_path, overrides))
    card = (tmp_path / "export" / "DATA_CARD.md").read_text()
    assert f"| differential privacy | {said}, DP-SGD with Opacus" in card


def test_data_card_says_when_a_model_was_trained_without_privacy(tmp_path):
    overrides = ["experiment=demo_2d", *TINY]
    for stage in (prepare, train, sample, export):
        stage.run(compose_cfg(stage.__name__.split(".")[-1], tmp_path, overrides))
    card = (tmp_path / "export" / "DATA_CARD.md").read_text()
    assert "| differential privacy | none (trained without differential privacy) |" in card


def test_refuses_to_resume_a_run_trained_without_privacy_as_private(tmp_path):
    overrides = ["experiment=demo_2d", *TINY]
    prepare.run(compose_cfg("prepare", tmp_path, overrides))
    train.run(compose_cfg("train", tmp_path, overrides))
    with pytest.raises(ValueError, match="records 0 private steps"):
        train.run(
            compose_cfg(
                "train",
                tmp_path,
                [*overrides, "training.max_steps=6", "training.dp.enabled=true", "training.dp.noise_multiplier=1.0"],
            )
        )


def test_refuses_a_network_opacus_cannot_make_private():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="Sequential has layers Opacus cannot make private.*BatchNorm2d"):
        private_training(net, {"enabled": True, "noise_multiplier": 1.0}, ["a", "b"], expected_batch=1, max_steps=1)
