"""Rectified flow (scheduler=rflow): training target and timesteps as MONAI defines them, the sampler against the
exact velocity of Gaussian data, guidance, and the options that do not apply to a flow refused by name."""

import pytest
import torch
from monai.networks.schedulers import RFlowScheduler
from torch import nn

from medaug.flow import RFlow, flow_timesteps
from medaug.model import build_scheduler
from medaug.sampling import inference_scheduler, labels_for_counts, sample_images
from medaug.training import DiffusionStep, StepDraw, diffusion_loss, draw_step_noise

from .test_configs import composed

FLOW = {
    "_target_": "monai.networks.schedulers.RFlowScheduler",
    "num_train_timesteps": 1000,
    "use_discrete_timesteps": True,
    "sample_method": "uniform",
    "_sampler": "rflow",
    "_steps": 30,
}


class GaussianVelocity(nn.Module):
    """The exact velocity E[x0 - noise | x_s] of data x0 ~ N(0, std_c^2) (class c; the null class: ``null_std``)
    under x_s = (1 - s) x0 + s noise: ``((1 - s) std^2 - s) / ((1 - s)^2 std^2 + s^2) x_s``."""

    def __init__(self, stds, T=1000):
        super().__init__()
        self.stds, self.T = torch.tensor(stds), T
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, class_labels):
        s = timesteps.float().view(-1, *[1] * (x.ndim - 1)) / self.T
        var = self.stds[class_labels].view_as(s) ** 2
        return ((1 - s) * var - s) / ((1 - s) ** 2 * var + s**2) * x


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_sampler_with_the_exact_velocity_returns_the_datas_std(spatial_dims):
    sch = inference_scheduler(FLOW, "rflow", 200)  # Euler: 0.487 at 50 steps, 0.498 at 200, 0.501 at 1000
    shape = (8, 8) if spatial_dims == 2 else (4, 4, 4)
    x = sample_images(
        GaussianVelocity([0.5, 1.0]),
        sch,
        labels_for_counts({0: 2000}),
        shape,
        guidance_scale=1.0,
        null_class=1,
        seed=0,
        batch_size=500,
        progress=False,
        clip=False,
        clip_x0=False,
    )
    assert x.shape == (2000, 1, *shape)
    assert abs(x.std().item() - 0.5) < 0.01, x.std()
    assert abs(x.mean().item()) < 0.01


def test_guidance_with_rflow():
    """w=0 samples the null class's data (std 1), w=1 the class's (std 0.5), w=2 is v_u + 2 (v_c - v_u) step by
    step (checked against a hand-written Euler loop of MONAI's step)."""
    kw = dict(null_class=1, seed=3, batch_size=1000, progress=False, clip=False, clip_x0=False)
    net, labels = GaussianVelocity([0.5, 1.0]), labels_for_counts({0: 1000})
    stds = {
        w: sample_images(net, inference_scheduler(FLOW, "rflow", 200), labels, (8, 8), guidance_scale=w, **kw)
        .std()
        .item()
        for w in (0.0, 1.0)
    }
    assert abs(stds[0.0] - 1.0) < 0.02 and abs(stds[1.0] - 0.5) < 0.02, stds
    sch = inference_scheduler(FLOW, "rflow", 10)
    got = sample_images(net, sch, labels[:4], (8, 8), guidance_scale=2.0, **kw)
    x = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(3 + j)) for j in range(4)])
    ref = RFlowScheduler(1000)
    ref.set_timesteps(10)
    ts = [*ref.timesteps.tolist(), 0]
    for t, t_next in zip(ts[:-1], ts[1:]):
        tt = torch.full((4,), t)
        v_c, v_u = net(x, tt, torch.zeros(4, dtype=torch.long)), net(x, tt, torch.ones(4, dtype=torch.long))
        x, _ = ref.step(v_u + 2.0 * (v_c - v_u), t, x, t_next)
    torch.testing.assert_close(got, x)


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, timesteps, class_labels):
        self.seen = (x.detach(), timesteps)
        return self.w * x


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_training_step_target_is_monais_velocity(spatial_dims):
    sch = build_scheduler(FLOW)
    x0 = torch.rand(6, 1, *[4] * spatial_dims) * 2 - 1
    net = Recorder()
    g = torch.Generator().manual_seed(1)
    draws = draw_step_noise(x0.shape, 1000, 0.0, torch.Generator().manual_seed(1), sch)
    loss = diffusion_loss(net, sch, x0, torch.zeros(6, dtype=torch.long), null_class=1, generator=g)
    x_t, t = net.seen
    assert loss.shape == (6,) and t.dtype == torch.int64 and t.min() >= 0 and t.max() < 1000
    torch.testing.assert_close(t, draws.timesteps)
    s = (t.float() / 1000).view(-1, *[1] * (x0.ndim - 1))
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * draws.noise)  # MONAI's add_noise
    target = x0 - draws.noise
    torch.testing.assert_close(loss, ((0.3 * x_t - target) ** 2).flatten(1).mean(1))
    # the same through DiffusionStep, as fit calls it
    step = DiffusionStep(net, sch, x0, torch.zeros(6, dtype=torch.long), null_class=1, p_uncond=0.0)
    out = step(StepDraw(0, torch.arange(6), 6, slice(0, 6), torch.Generator().manual_seed(1), None))
    assert out.loss.shape == () and torch.isfinite(out.loss)


@pytest.mark.parametrize("method", ["uniform", "logit-normal"])
def test_training_timesteps_are_drawn_as_monai_draws_them(method):
    sch = RFlowScheduler(1000, sample_method=method, loc=0.5, scale=0.7)
    x = torch.zeros(64, 1, 4, 4)
    torch.manual_seed(7)
    theirs = sch.sample_timesteps(x)
    ours = flow_timesteps(sch, x.shape, torch.Generator().manual_seed(7))
    assert torch.equal(ours, theirs)


def test_step_goes_to_the_next_own_timestep_with_the_transform():
    sch = RFlow(1000, use_timestep_transform=True, base_img_size_numel=16, spatial_dim=2)
    sch.set_timesteps(5, input_img_size_numel=64)
    x, v = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    nxt, _ = sch.step(v, sch.timesteps[1], x)
    assert torch.allclose(nxt, x + (sch.timesteps[1] - sch.timesteps[2]).item() / 1000 * v)
    last, _ = sch.step(v, sch.timesteps[-1], x)
    assert torch.allclose(last, x + sch.timesteps[-1].item() / 1000 * v)


def test_options_that_do_not_apply_to_a_flow_are_refused_by_name():
    with pytest.raises(ValueError, match="sample.sampler=ddim is for DDPM-trained models.*sample.sampler=rflow"):
        inference_scheduler(FLOW, "ddim", 20)
    with pytest.raises(ValueError, match="sample.sampler=rflow is for models trained with scheduler=rflow"):
        inference_scheduler({"_target_": "monai.networks.schedulers.DDPMScheduler"}, "rflow", 20)
    with pytest.raises(ValueError, match="sample.eta=0.5 .* set sample.eta=0"):
        sample_images(
            Recorder(),
            inference_scheduler(FLOW, "rflow", 2),
            torch.zeros(1, dtype=torch.long),
            (4, 4),
            guidance_scale=1.0,
            null_class=1,
            seed=0,
            eta=0.5,
            progress=False,
        )
    with pytest.raises(ValueError, match=r"scheduler keys \['beta_start'\] do not apply to a rectified flow"):
        build_scheduler({**FLOW, "beta_start": 0.1})
    with pytest.raises(ValueError, match="scheduler.clip_sample=true does not apply"):
        build_scheduler({**FLOW, "clip_sample": True})
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        build_scheduler({**FLOW, "prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="use_discrete_timesteps=false"):
        build_scheduler({**FLOW, "use_discrete_timesteps": False})
    # what an experiment written for ddpm sets and that agrees with a flow is accepted
    assert isinstance(
        build_scheduler({**FLOW, "prediction_type": "v_prediction", "clip_sample": False}), RFlowScheduler
    )


def test_scheduler_rflow_sets_the_sampler_and_its_steps(tmp_path):
    cfg = composed("sample", ["experiment=demo_3d", "scheduler=rflow", f"paths.output_dir={tmp_path}"])
    assert cfg["sample"]["sampler"] == "rflow" and cfg["scheduler"]["spatial_dim"] == 3
    assert isinstance(build_scheduler(cfg["scheduler"]), RFlowScheduler)  # demo_3d's prediction_type is accepted
    ddpm = composed("sample", [f"paths.output_dir={tmp_path}"])
    assert (ddpm["sample"]["sampler"], ddpm["sample"]["steps"]) == ("dpmpp_2m_sde", 20)
    assert composed("sample", ["scheduler=rflow", f"paths.output_dir={tmp_path}"])["sample"]["steps"] == 30


def test_train_and_sample_stages_with_rflow(tmp_path):
    from medaug.model import load_checkpoint
    from medaug.sampling import load_samples
    from pipelines import prepare, sample, train

    from .conftest import TINY, compose_cfg

    overrides = ["experiment=demo_2d", *TINY, "scheduler=rflow"]
    for stage in (prepare, train, sample):
        stage.run(compose_cfg(stage.__name__.split(".")[-1], tmp_path, overrides))
    ckpt = load_checkpoint(tmp_path / "train" / "checkpoints" / "last.pt")
    assert ckpt.config["scheduler"]["_target_"].endswith("RFlowScheduler")
    images, _, rows, info = load_samples(tmp_path / "samples")
    assert images.shape[0] == 6 and rows[0]["sampler"] == "rflow" and info["sample"]["steps"] == 3
    with pytest.raises(ValueError, match="sample.sampler=dpmpp_2m_sde is for DDPM-trained models"):
        sample.run(compose_cfg("sample", tmp_path, ["experiment=demo_2d", *TINY]))
