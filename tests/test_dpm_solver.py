"""DPM-Solver++ 2M against data whose exact noise predictor is known in closed form.

For data x0 ~ N(mu, s^2) per pixel, x_t = alpha_t x0 + sigma_t eps is Gaussian and the
best noise prediction is eps = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2); s = 0 is a
single point (a delta). The probability-flow ODE keeps (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)
fixed, so the exact deterministic sample from x_T is known too.
"""

import math

import pytest
import torch

from medaug.dpm_solver import DPMSolverPP2M, DPMSolverPP2MSDE
from medaug.sampling import inference_scheduler, sample_images

SCHED = {
    "_target_": "monai.networks.schedulers.DDPMScheduler",
    "num_train_timesteps": 1000,
    "schedule": "linear_beta",
    "clip_sample": False,
}


class GaussianOracle(torch.nn.Module):
    """The exact eps (or v) predictor for N(mu, s^2) data under the schedule of ``SCHED``."""

    def __init__(self, mu: float, s: float, prediction_type: str = "epsilon"):
        super().__init__()
        self.mu, self.s, self.prediction_type = mu, s, prediction_type
        abar = DPMSolverPP2M(**{k: v for k, v in SCHED.items() if k[0] != "_"}).alphas_cumprod.double()
        self.register_buffer("alpha", abar.sqrt())
        self.register_buffer("sigma", (1 - abar).sqrt())
        self.p = torch.nn.Parameter(torch.zeros(()))  # sample_images finds the device from a parameter

    def forward(self, x, timesteps, class_labels):
        a = self.alpha[timesteps].view(-1, *[1] * (x.ndim - 1))
        sg = self.sigma[timesteps].view(-1, *[1] * (x.ndim - 1))
        eps = sg * (x.double() - a * self.mu) / (a**2 * self.s**2 + sg**2)
        if self.prediction_type == "v_prediction":  # v = alpha eps - sigma x0
            x0 = (x.double() - sg * eps) / a
            return (a * eps - sg * x0).float()
        return eps.float()


def exact_ode_sample(x_T: torch.Tensor, mu: float, s: float) -> torch.Tensor:
    abar = DPMSolverPP2M(**{k: v for k, v in SCHED.items() if k[0] != "_"}).alphas_cumprod.double()[-1]
    return mu + s * (x_T.double() - abar.sqrt() * mu) / (abar * s**2 + 1 - abar).sqrt()


def run(
    sampler: str, steps: int, mu: float, s: float, shape=(16, 16), n=2, seed=0, spec=SCHED, prediction_type="epsilon"
) -> torch.Tensor:
    return sample_images(
        GaussianOracle(mu, s, prediction_type),
        inference_scheduler(spec, sampler, steps),
        torch.zeros(n, dtype=torch.long),
        shape,
        guidance_scale=1.0,
        null_class=1,
        seed=seed,
        progress=False,
        clip=False,
    ).double()


def start_noise(n=2, shape=(16, 16), seed=0) -> torch.Tensor:
    return torch.stack([torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed + j)) for j in range(n)])


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde"])
@pytest.mark.parametrize("steps", [1, 3, 20])
def test_single_point_data_is_recovered_exactly(sampler, steps):
    out = run(sampler, steps, mu=0.3, s=0.0)
    torch.testing.assert_close(out, torch.full_like(out, 0.3), atol=1e-4, rtol=0)  # fp32 x0 at alpha≈0.006


def test_ode_trajectory_stays_on_the_starting_noise_for_single_point_data():
    mu, x = 0.3, start_noise(1).double()
    solver = inference_scheduler(SCHED, "dpmpp_2m", 10)
    oracle = GaussianOracle(mu, 0.0)
    eps0 = oracle(x.float(), torch.tensor([int(solver.timesteps[0])]), None).double()  # the noise in x_T
    for i, t in enumerate(solver.timesteps[:-1]):
        x, _ = solver.step(oracle(x.float(), torch.tensor([int(t)]), None), int(t), x.float())
        s = int(solver.timesteps[i + 1])
        expected = oracle.alpha[s] * mu + oracle.sigma[s] * eps0
        torch.testing.assert_close(x.double(), expected, atol=1e-5, rtol=0)


def test_second_order_beats_ddim_and_converges_at_second_order():
    mu, s = 0.2, 0.5
    exact = exact_ode_sample(start_noise(), mu, s)

    def err(sampler, steps):
        return (run(sampler, steps, mu, s) - exact).abs().max().item()

    e10, e20, e50, ddim10 = (err("dpmpp_2m", 10), err("dpmpp_2m", 20), err("dpmpp_2m", 50), err("ddim", 10))
    assert e10 < ddim10 / 3, (e10, ddim10)
    assert e20 < e10 / 1.5 and e50 < e20 / 4, (e10, e20, e50)  # DDIM (first order) gains ~2.3x from 20 to 50
    assert e50 < 1e-2


def test_sde_samples_have_the_data_distribution():
    mu, s = -0.1, 0.4
    out = run("dpmpp_2m_sde", 20, mu, s, shape=(64, 64), n=4)
    assert abs(out.mean().item() - mu) < 0.02
    assert abs(out.std().item() / s - 1) < 0.05
    again = run("dpmpp_2m_sde", 20, mu, s, shape=(64, 64), n=4)
    other = run("dpmpp_2m_sde", 20, mu, s, shape=(64, 64), n=4, seed=9)
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_v_prediction_gives_the_same_samples_as_epsilon():
    spec = {**SCHED, "prediction_type": "v_prediction"}
    eps = run("dpmpp_2m", 10, 0.2, 0.5)
    v = run("dpmpp_2m", 10, 0.2, 0.5, spec=spec, prediction_type="v_prediction")
    torch.testing.assert_close(v, eps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_clip_sample_bounds_the_x0_prediction(spatial_dims):
    shape = [8] * spatial_dims
    clipped = run("dpmpp_2m", 5, mu=3.0, s=0.0, shape=shape, spec={**SCHED, "clip_sample": True})
    free = run("dpmpp_2m", 5, mu=3.0, s=0.0, shape=shape)
    assert clipped.shape == free.shape == (2, 1, *shape)
    assert clipped.max() <= 1 + 1e-6
    torch.testing.assert_close(free, torch.full_like(free, 3.0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("steps", [1, 10, 50, 999])
def test_timesteps_are_distinct_and_even_in_log_snr(steps):
    solver = DPMSolverPP2M(num_train_timesteps=1000)
    solver.set_timesteps(steps)
    path = solver.timesteps.tolist() + [0]  # the grid ends at timestep 0 (the last step goes on to clean)
    assert len(solver.timesteps) == steps and path[0] == 999
    assert all(a > b for a, b in zip(path, path[1:]))
    if steps == 10:
        gaps = [solver._lambda[b] - solver._lambda[a] for a, b in zip(path, path[1:])]
        assert max(gaps) < 1.2 * min(gaps)


def test_misuse_is_reported():
    with pytest.raises(ValueError, match="prediction_type"):
        DPMSolverPP2M(prediction_type="score")
    solver = DPMSolverPP2MSDE(num_train_timesteps=1000)
    for bad in (0, 1000):
        with pytest.raises(ValueError, match="between 1 and 999"):
            solver.set_timesteps(bad)
    solver.set_timesteps(5)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        solver.step(x, int(solver.timesteps[1]), x)  # skipped the first timestep
    assert math.isfinite(solver.step(x, int(solver.timesteps[0]), x)[0].sum().item())


@pytest.mark.parametrize(
    "sampler,steps", [("ddpm", 1000), ("ddim", 20), ("pndm", 20), ("dpmpp_2m", 20), ("dpmpp_2m_sde", 20)]
)
def test_every_sampler_ends_on_the_clean_image(sampler, steps):
    """Background data (every pixel exactly -1): the last step must land on the denoised image, not on
    the noise of timestep 0 (PNDM used to stop at sigma = 0.01: |x + 1| ~ 0.008)."""
    out = run(sampler, steps, mu=-1.0, s=0.0, shape=(8, 8))
    bound = 5e-3 if sampler == "pndm" else 1e-3  # PNDM's last eps is extrapolated from earlier steps: 0.0035
    assert (out + 1).abs().max() < bound, (out + 1).abs().max()


class GuidedOracle(GaussianOracle):
    """Single-point data at -0.5 for class 0 and +0.5 for the null class: with guidance w = 2 the
    guided clean image is 0.5 + 2 (-0.5 - 0.5) = -1.5, outside [-1, 1]."""

    def forward(self, x, timesteps, class_labels):
        mu = torch.where(class_labels == 0, -0.5, 0.5).double().view(-1, *[1] * (x.ndim - 1))
        a = self.alpha[timesteps].view(-1, *[1] * (x.ndim - 1))
        sg = self.sigma[timesteps].view(-1, *[1] * (x.ndim - 1))
        return ((x.double() - a * mu) / sg).float()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "dpmpp_2m_sde"])  # not PNDM: it extrapolates clipped outputs
def test_guided_clean_image_is_clipped_at_every_step(sampler):
    seen = []
    sch = inference_scheduler(SCHED, sampler, 10)  # the training spec does not clip (clip_sample: false)
    step = sch.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        abar = float(sch.alphas_cumprod[timestep])
        seen.append(((sample - (1 - abar) ** 0.5 * model_output) / abar**0.5).min().item())
        return step(model_output, timestep, sample, *args, **kwargs)

    sch.step = recording_step
    kw = dict(guidance_scale=2.0, null_class=1, seed=0, progress=False)
    guided = GuidedOracle(0.0, 0.0)
    out = sample_images(guided, sch, torch.zeros(2, dtype=torch.long), (8, 8), **kw)
    assert len(seen) == 10 and min(seen) > -1 - 1e-3, seen  # x0 = -1.5 before it was clipped
    torch.testing.assert_close(out, torch.full_like(out, -1.0), atol=1e-3, rtol=0)
    free = sample_images(
        guided, inference_scheduler(SCHED, sampler, 10), torch.zeros(2, dtype=torch.long), (8, 8), clip=False, **kw
    )  # latents: not clipped
    torch.testing.assert_close(free, torch.full_like(free, -1.5), atol=1e-3, rtol=0)
