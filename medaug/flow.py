"""Rectified flow (``scheduler=rflow``): MONAI 1.6's ``RFlowScheduler``, as MAISI trains and samples.

With ``s = t / T`` (T = ``num_train_timesteps``) the noised image is the straight line
``x_s = (1 - s) x0 + s noise`` (MONAI's ``add_noise``); the network learns the velocity
``v = x0 - noise`` (MONAI's convention: it points from the noise to the image), and sampling
integrates ``dx/ds = -v`` with Euler steps from ``s = 1`` (pure noise) to ``s = 0``:
``x_{s'} = x_s + (s - s') v`` (MONAI's ``step(..., next_timestep)``). The clean image the network
predicts at ``s`` is ``x0 = x_s + s v``.

Rectified flow: Liu, Gong, Liu 2022, "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow", arXiv:2209.03003 (eq. 1: the straight-line interpolation and its velocity); as used by MAISI
(Guo et al. 2024, arXiv:2409.11169).

Timesteps for training are drawn as MONAI's ``sample_timesteps`` draws them (uniform or
logit-normal, optionally resolution-shifted), but from the step's ``torch.Generator``, so a
resumed run continues the same loss curve (see :mod:`medaug.training`).

Example::

    sch = RFlow(num_train_timesteps=1000); sch.set_timesteps(30)
    x, _ = sch.step(v, sch.timesteps[0], x)          # to the next of its own timesteps
"""

from __future__ import annotations

import inspect
from typing import Mapping, Sequence

import torch
from monai.networks.schedulers import RFlowScheduler
from monai.networks.schedulers.rectified_flow import timestep_transform

FLOW_SAMPLER = "rflow"  # the sampler name of a flow-trained model (Euler steps of the learnt velocity)
_ACCEPTED = set(inspect.signature(RFlowScheduler.__init__).parameters) - {"self"}


def is_flow(scheduler_or_spec) -> bool:
    """Whether a scheduler, or a scheduler spec ``{_target_: ...}``, is a rectified flow."""
    if isinstance(scheduler_or_spec, Mapping):
        return str(scheduler_or_spec.get("_target_", "")).rsplit(".", 1)[-1] in ("RFlowScheduler", "RFlow")
    return isinstance(scheduler_or_spec, RFlowScheduler)


def flow_kwargs(spec: Mapping) -> dict:
    """The ``RFlowScheduler`` arguments of a flow ``spec``; keys that belong to DDPM-type schedulers are refused
    by name (an experiment written for ``scheduler=ddpm`` may set them), except the two that agree with a flow:
    ``prediction_type: v_prediction`` and ``clip_sample: false``."""
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    if kwargs.pop("prediction_type", "v_prediction") != "v_prediction":
        raise ValueError(
            f"scheduler.prediction_type={spec['prediction_type']!r}: a rectified flow (RFlowScheduler) "
            "always predicts the velocity; drop the key or set it to v_prediction"
        )
    if kwargs.pop("clip_sample", False):
        raise ValueError(
            "scheduler.clip_sample=true does not apply to a rectified flow (RFlowScheduler clips "
            "nothing); drop it or set scheduler.clip_sample=false, and use sample.clip_x0 to clip images"
        )
    unknown = sorted(set(kwargs) - _ACCEPTED)
    if unknown:
        raise ValueError(
            f"scheduler keys {unknown} do not apply to a rectified flow (RFlowScheduler); drop them "
            f"(accepted: {sorted(_ACCEPTED)})"
        )
    if not kwargs.get("use_discrete_timesteps", True):
        raise ValueError(
            "scheduler.use_discrete_timesteps=false: MONAI 1.6's RFlowScheduler.step rounds the next "
            "timestep to an integer (wrong step sizes); set scheduler.use_discrete_timesteps=true"
        )
    return kwargs


class RFlow(RFlowScheduler):
    """MONAI's ``RFlowScheduler`` whose ``step`` goes to the next of its own timesteps (0 after the last) when no
    ``next_timestep`` is given: MONAI's default step of ``1 / steps`` is wrong for shifted
    (``use_timestep_transform``) or rounded timesteps."""

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: str | torch.device | None = None,
        input_img_size_numel: int | None = None,
    ) -> None:
        super().set_timesteps(num_inference_steps, device, input_img_size_numel)
        self.next_timesteps = torch.cat([self.timesteps[1:], torch.zeros_like(self.timesteps[:1])])

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        next_timestep=None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x at next_timestep, predicted clean image)``; ``generator`` is accepted and unused (a flow's sampler
        is deterministic)."""
        if next_timestep is None:
            where = (self.timesteps == int(timestep)).nonzero()
            if len(where) == 0:
                raise ValueError(f"timestep {timestep} is not one of this scheduler's timesteps; call set_timesteps")
            next_timestep = self.next_timesteps[int(where[0, 0])]
        return super().step(model_output, int(timestep), sample, int(next_timestep))


def flow_scheduler(spec: Mapping) -> RFlow:
    """The :class:`RFlow` of a flow scheduler spec (checked by :func:`flow_kwargs`)."""
    return RFlow(**flow_kwargs(spec))


def flow_timesteps(scheduler: RFlowScheduler, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Training timesteps ``(N,)`` for a batch of ``shape`` (N, C, *spatial), drawn like MONAI's
    ``RFlowScheduler.sample_timesteps`` (uniform on [0, T), or ``T sigmoid(loc + scale z)`` for ``logit-normal``;
    truncated to int64 with ``use_discrete_timesteps``; shifted towards noise for large images with
    ``use_timestep_transform``) but from ``generator``: with the same seed in the global RNG, MONAI draws the same."""
    n, device = shape[0], generator.device
    T = scheduler.num_train_timesteps
    if scheduler.sample_method == "uniform":
        t = torch.rand((n,), generator=generator, device=device) * T
    else:
        dist = scheduler.distribution.base_dist.base_dist  # LogisticNormal -> Independent -> Normal(loc, scale)
        z = torch.normal(dist.loc.expand(n, 1).to(device), dist.scale.expand(n, 1).to(device), generator=generator)
        t = torch.sigmoid(z[:, 0]) * T
    if scheduler.use_discrete_timesteps:
        t = t.long()
    if scheduler.use_timestep_transform:
        numel = torch.prod(torch.tensor(shape[2:]))
        t = timestep_transform(
            t,
            input_img_size_numel=numel,
            base_img_size_numel=scheduler.base_img_size_numel,
            num_train_timesteps=T,
            spatial_dim=len(shape) - 2,
        )
    return t


def flow_clip_x0(scheduler: RFlowScheduler, v: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
    """The velocity ``v`` at timestep ``t`` changed so that the clean image it predicts, ``x0 = x + s v``, lies in
    [-1, 1]; the noise it predicts, ``(x - (1 - s) x0) / s``, follows. Shapes ``(N, C, *spatial)``."""
    s = float(t) / scheduler.num_train_timesteps
    if s <= 0:
        return v
    x0 = (x + s * v).clamp(-1, 1)
    return x0 - (x - (1 - s) * x0) / s
