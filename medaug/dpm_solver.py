"""DPM-Solver++ (2M, and its SDE variant): few-step samplers for models trained with DDPM.

A network trained to predict the noise of a DDPM schedule also defines the probability-flow ODE and the reverse SDE
of that schedule. DPM-Solver++ (Lu et al., 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv:2211.01095, algorithm 2 and the SDE variant of section 5) integrates them in the log
signal-to-noise time ``lambda = log(alpha / sigma)`` with the model's prediction of the clean image ``x0`` as the
integrand, which is what keeps it stable under classifier-free guidance. The multistep second-order form reuses the
previous step's ``x0`` prediction, so it costs one network evaluation per step, as DDIM does, and no retraining.

Notation at one step from timestep ``t`` to the next timestep ``s`` (less noise):
``alpha = sqrt(alphas_cumprod)``, ``sigma = sqrt(1 - alphas_cumprod)``, ``h = lambda_s - lambda_t``,
``D = x0_t + (x0_t - x0_prev) / (2 r)`` with ``r = h_prev / h`` (first order, ``D = x0_t``,
on the first step), then

- ODE (``dpmpp_2m``):      ``x_s = sigma_s / sigma_t x_t + alpha_s (1 - e^-h) D``
- SDE (``dpmpp_2m_sde``):  ``x_s = sigma_s / sigma_t e^-h x_t + alpha_s (1 - e^-2h) D + sigma_s sqrt(1 - e^-2h) z``

The timesteps start at ``T - 1`` and follow a grid even in ``lambda`` that ends at timestep 0
(few steps then spend their evaluations where the image forms, and each step sees the same
``h``); the last step goes from the last of them to the clean image (``sigma = 0``), which
makes it first order: the output is the last ``x0`` prediction.
``x0`` predictions are clipped to [-1, 1] when ``clip_sample`` is set (images), not for latents.

The classes follow MONAI's scheduler interface (``set_timesteps``, ``timesteps``,
``num_inference_steps``, ``step(model_output, timestep, sample, generator) -> (x_prev, x0)``),
so :func:`medaug.sampling.sample_images` drives them like DDIM.
"""

from __future__ import annotations

import math

import torch
from monai.networks.schedulers import Scheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DPMSolverPP2M(Scheduler):
    """Deterministic DPM-Solver++ 2M on the noise schedule of a DDPM training run."""

    stochastic = False

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        prediction_type: str = "epsilon",
        clip_sample: bool = True,
        **schedule_args,
    ) -> None:
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} unknown; choose one of {PREDICTION_TYPES}")
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        abar = self.alphas_cumprod.double()
        # python floats: reading them in the step never touches the accelerator
        self._alpha = abar.sqrt().tolist()
        self._sigma = (1 - abar).sqrt().tolist()
        self._lambda = [math.log(a / s) for a, s in zip(self._alpha, self._sigma)]
        self._index = 0
        self._prev_x0: torch.Tensor | None = None
        self._prev_h = 0.0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` network evaluations, from timestep ``T - 1``, at the timesteps
        nearest to log-SNR spaced evenly down to timestep 0; the last step goes from the last of
        them to the clean image. Resets the multistep history (call it before each batch)."""
        n, total = int(num_inference_steps), self.num_train_timesteps
        if not 1 <= n < total:
            raise ValueError(f"num_inference_steps={n} must be between 1 and {total - 1} for DPM-Solver++")
        self.num_inference_steps = n
        lam = torch.tensor(self._lambda, dtype=torch.float64)
        wanted = torch.linspace(lam[-1].item(), lam[0].item(), n + 1, dtype=torch.float64)
        # lambda falls with t: the nearest timestep to each wanted value, kept distinct (t_i > t_{i+1})
        path = [min(max(int((lam - w).abs().argmin()), n - i), total - 1 - i) for i, w in enumerate(wanted.tolist())]
        for i in range(n - 1, -1, -1):  # from timestep 0 (path[n] = 0) up
            path[i] = max(path[i], path[i + 1] + 1)
        self.timesteps = torch.tensor(path[:-1])
        self._index, self._prev_x0, self._prev_h = 0, None, 0.0

    def predict_x0(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha[t], self._sigma[t]
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma * model_output) / alpha
        elif self.prediction_type == "v_prediction":
            x0 = alpha * sample - sigma * model_output
        else:
            x0 = model_output
        return x0.clamp(-1, 1) if self.clip_sample else x0

    def step(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from ``timestep`` to the next of :attr:`timesteps`; returns ``(x_next, x0)``."""
        k, t = self._index, int(timestep)
        if self.num_inference_steps is None or k >= len(self.timesteps) or int(self.timesteps[k]) != t:
            raise ValueError(
                f"timestep {t} is not next in this solver's timesteps; call set_timesteps(steps) "
                "before each batch and step through scheduler.timesteps in order"
            )
        x0 = self.predict_x0(model_output, t, sample)
        self._index += 1
        if k == len(self.timesteps) - 1:  # last step: to the clean image (sigma = 0), first order
            return x0, x0
        s = int(self.timesteps[k + 1])
        h = self._lambda[s] - self._lambda[t]
        d = x0 if self._prev_x0 is None else x0 + (x0 - self._prev_x0) * (h / (2 * self._prev_h))
        self._prev_x0, self._prev_h = x0, h
        ratio = self._sigma[s] / self._sigma[t]
        if not self.stochastic:
            return ratio * sample + (self._alpha[s] * -math.expm1(-h)) * d, x0
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        keep = -math.expm1(-2 * h)  # 1 - e^-2h
        x = (ratio * math.exp(-h)) * sample + (self._alpha[s] * keep) * d + (self._sigma[s] * math.sqrt(keep)) * noise
        return x, x0


class DPMSolverPP2MSDE(DPMSolverPP2M):
    """Stochastic DPM-Solver++ 2M (reverse SDE): fresh noise each step, from ``generator``."""

    stochastic = True
