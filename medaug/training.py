"""Class-conditional diffusion training: the epsilon loss and the fit loop.

Randomness is derived from ``(seed, step)``: the batch drawn at step ``s``, its noise,
timesteps and dropped labels depend only on the seed and ``s``. A run resumed from a
checkpoint at step ``k`` therefore continues exactly the loss curve of an uninterrupted
run, without replaying a data loader.

Example::

    losses = diffusion_loss(net, scheduler, x0, labels, null_class=3, p_uncond=0.1, generator=g)  # [N]
    result = fit(net, ema, opt, scheduler, images, labels, TrainSettings(max_steps=1000), ...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .model import EMA, save_checkpoint
from .tracking import NullTracker, Tracker


@dataclass
class TrainSettings:
    """What the fit loop needs beyond the objects; ``amp_dtype=None`` trains in fp32."""

    max_steps: int = 1000
    batch_size: int = 32
    p_uncond: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 25
    amp_dtype: torch.dtype | None = None


@dataclass
class FitResult:
    step: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss over the log window)
    checkpoint: Path | None = None


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one training step: a function of ``(seed, step)`` only."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def diffusion_loss(
    model: nn.Module,
    scheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    null_class: int,
    p_uncond: float,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-sample epsilon-prediction loss ``[N]`` for images ``x0`` (N, C, *spatial) in [-1, 1].

    Labels are replaced by ``null_class`` with probability ``p_uncond`` (classifier-free
    guidance training). Noise and the noised input are made in fp32 outside autocast;
    only the network runs under ``amp_dtype``.
    """
    n, device = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32)
    t = torch.randint(0, scheduler.num_train_timesteps, (n,), generator=generator, device=device)
    drop = torch.rand(n, generator=generator, device=device) < p_uncond
    labels = torch.where(drop, torch.full_like(labels, null_class), labels)
    x_t = scheduler.add_noise(original_samples=x0.float(), noise=noise, timesteps=t)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        pred = model(x_t, timesteps=t, class_labels=labels)
    return F.mse_loss(pred.float(), noise, reduction="none").flatten(1).mean(1)


def fit(
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: TrainSettings,
    *,
    null_class: int,
    start_step: int = 0,
    ckpt_path: Path | None = None,
    checkpoint_payload: Callable[[], dict] | None = None,
    tracker: Tracker | None = None,
) -> FitResult:
    """Train from ``start_step`` to ``settings.max_steps`` on ``images`` (N, C, *spatial), ``labels`` (N,).

    Saves ``ckpt_path`` every ``ckpt_every`` steps, at the end, and on interruption
    (Ctrl-C), so nothing trained is lost. ``checkpoint_payload()`` gives the config and
    meta stored with it. Losses are synced to the host every ``log_every`` steps only.
    """
    tracker = tracker or NullTracker()
    device = next(model.parameters()).device
    n = images.shape[0]
    if n == 0:
        raise ValueError("no training images: the train split is empty")
    batch_size = min(settings.batch_size, n)
    result = FitResult(step=start_step, checkpoint=ckpt_path)

    def checkpoint(step: int) -> None:
        if ckpt_path is not None:
            payload = checkpoint_payload() if checkpoint_payload else {"config": {}, "meta": {}}
            save_checkpoint(ckpt_path, model=model, ema=ema, optimizer=optimizer, step=step, **payload)

    model.train()
    window = torch.zeros((), device=device)
    window_steps = 0
    step = start_step
    bar = tqdm(range(start_step, settings.max_steps), desc="train", unit="step", initial=start_step,
               total=settings.max_steps)
    try:
        for step in bar:
            gen_cpu = step_generator(settings.seed, step)
            idx = torch.randperm(n, generator=gen_cpu)[:batch_size]
            x0 = images[idx].to(device, non_blocking=True)
            y = labels[idx].to(device, non_blocking=True)
            gen = gen_cpu if device.type == "cpu" else step_generator(settings.seed, step, device)
            loss = diffusion_loss(model, scheduler, x0, y, null_class=null_class, p_uncond=settings.p_uncond,
                                  generator=gen, amp_dtype=settings.amp_dtype).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            ema.update(model)
            window += loss.detach()
            window_steps += 1
            done = step + 1
            if done % settings.log_every == 0 or done == settings.max_steps:
                value = float(window) / window_steps
                if not math.isfinite(value):
                    raise FloatingPointError(f"training loss became {value} at step {done}; lower training.lr")
                result.losses.append((done, value))
                tracker.log_metrics({"train/loss": value}, step=done)
                bar.set_postfix(loss=f"{value:.4f}")
                window.zero_()
                window_steps = 0
            if settings.ckpt_every and done % settings.ckpt_every == 0 and done < settings.max_steps:
                checkpoint(done)
            result.step = done
    except KeyboardInterrupt:
        checkpoint(result.step)
        bar.close()
        raise
    bar.close()
    checkpoint(result.step)
    return result
