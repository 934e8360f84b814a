"""Class-conditional diffusion training: the epsilon loss and the fit loop (one loop for every loss).

Randomness is derived from ``(seed, step)``: the batch drawn at step ``s``, its noise,
timesteps and dropped labels depend only on the seed and ``s``. A run resumed from a
checkpoint at step ``k`` therefore continues exactly the loss curve of an uninterrupted
run, without replaying a data loader.

Example::

    losses = diffusion_loss(net, scheduler, x0, labels, null_class=3, p_uncond=0.1, generator=g)  # [N]
    step = DiffusionStep(net, scheduler, images, labels, null_class=3, p_uncond=0.1)
    result = fit(net, ema, opt, step, TrainSettings(max_steps=1000), ...)
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .conditioning import Conditioning
from .flow import flow_timesteps, is_flow
from .model import EMA, save_checkpoint, trained_space
from .progress import progress_bar
from .tracking import Tracker, guarded

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """What the fit loop needs beyond the objects and the loss.

    ``rank``/``world_size`` describe data-parallel training: every rank draws the same
    global batch of ``batch_size * world_size`` and trains on its own slice, so N ranks
    reproduce one process with an N-times larger batch. ``grad_clip=None`` clips nothing;
    ``val_every=0`` (or no ``validate``) validates nothing in the loop.
    """

    max_steps: int = 1000
    batch_size: int = 32
    grad_clip: float | None = 1.0
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 25
    ema_every: int = 1
    val_every: int = 0
    rank: int = 0
    world_size: int = 1


@dataclass
class FitResult:
    step: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss over the log window)
    terms: list[tuple[int, dict]] = field(default_factory=list)  # (step, mean of every logged term, loss first)
    val: list[tuple[int, dict]] = field(default_factory=list)  # (step, what ``validate`` returned)
    checkpoint: Path | None = None
    first_step_s: float | None = None  # wall time of the first step (torch.compile's warm-up when compiling)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one training step: a function of ``(seed, step)`` only (as fit seeds it)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


class StepNoise(NamedTuple):
    """The random draws of one training step, for a batch of N images."""

    noise: torch.Tensor  # (N, C, *spatial) fp32, standard normal
    timesteps: torch.Tensor  # (N,) int64 in [0, num_train_timesteps) (a flow's: as its sample_method draws them)
    drop: torch.Tensor  # (N,) bool: label replaced by the null class


def memory_format_of(ndim: int, channels_last: bool = True) -> torch.memory_format:
    """The channels-last layout of ``ndim``-dimensional tensors (N, C, *spatial): ``channels_last``
    in 2D, ``channels_last_3d`` in 3D; ``preserve_format`` otherwise or when switched off."""
    if not channels_last:
        return torch.preserve_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim, torch.preserve_format)


def draw_step_noise(
    shape: Sequence[int], num_train_timesteps: int, p_uncond: float, generator: torch.Generator, scheduler=None
) -> StepNoise:
    """Noise, timesteps and label drops for a batch of ``shape`` (N, C, *spatial); the timesteps of a rectified
    flow ``scheduler`` as it samples them (:func:`medaug.flow.flow_timesteps`), else uniform integers."""
    device = generator.device
    noise = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    if is_flow(scheduler):
        t = flow_timesteps(scheduler, shape, generator)
    else:
        t = torch.randint(0, num_train_timesteps, (shape[0],), generator=generator, device=device)
    drop = torch.rand(shape[0], generator=generator, device=device) < p_uncond
    return StepNoise(noise, t, drop)


def batch_rows(n: int, generator: torch.Generator, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of a random permutation of ``range(n)``, drawn where ``generator`` lives (where the
    training set is: on the GPU no index crosses to the host and nothing waits): ``(len(rows),)`` int64."""
    return torch.randperm(n, generator=generator, device=generator.device)[rows]


def draw_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    rows: slice,
    device: torch.device,
    memory_format: torch.memory_format = torch.preserve_format,
):
    """Rows ``rows`` of a random permutation of the training set (see :func:`batch_rows`), as ``(x0, y)``
    on ``device``. From host memory the batch is pinned first, so its copy to the GPU does not block the host."""
    return take_batch(images, labels, batch_rows(images.shape[0], generator, rows), device, memory_format)


def take_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    idx: torch.Tensor,
    device: torch.device,
    memory_format: torch.memory_format = torch.preserve_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images[idx], labels[idx])`` on ``device``, the images in ``memory_format``."""
    x0, y = to_device([images[idx], labels[idx]], device)
    return x0.to(memory_format=memory_format), y


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``tensors`` on ``device``; from host memory to a GPU they are pinned first, so the copies do
    not block the host (a step's batch is queued while the previous step still runs)."""
    if device.type == "cuda":
        tensors = [t.pin_memory() if t.device.type == "cpu" else t for t in tensors]
    return [t.to(device, non_blocking=True) for t in tensors]


def diffusion_loss(
    model: nn.Module,
    scheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    null_class: int,
    p_uncond: float = 0.0,
    generator: torch.Generator | None = None,
    draws: StepNoise | None = None,
    amp_dtype: torch.dtype | None = None,
    mask_onehot: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample diffusion loss ``[N]`` for images ``x0`` (N, C, *spatial) in [-1, 1]: the MSE
    against what the scheduler's ``prediction_type`` names, the noise (``epsilon``), the velocity
    ``alpha_t noise - sigma_t x0`` (``v_prediction``) or the clean image (``sample``); for a rectified flow
    (``RFlowScheduler``) the velocity ``x0 - noise`` as MONAI defines it.

    Labels are replaced by ``null_class`` with probability ``p_uncond`` (classifier-free
    guidance training); ``labels=None`` for a model without class input. ``mask_onehot``
    ``(N, K, *spatial)``, a mask-conditioned model's one-hot label maps, is concatenated to the noisy
    image, all zeros where the labels are dropped (:mod:`medaug.conditioning`: class and mask are dropped
    jointly). The random draws come from ``draws`` or else from ``generator``.
    Noise and the noised input are made in fp32 outside autocast (``add_noise`` on bf16
    input would turn the scheduler's ``alphas_cumprod`` into bf16 for good); only the
    network runs under ``amp_dtype``.
    """
    if draws is None:
        draws = draw_step_noise(x0.shape, scheduler.num_train_timesteps, p_uncond, generator, scheduler)
    if labels is not None:
        labels = torch.where(draws.drop, torch.full_like(labels, null_class), labels)
    x_t = scheduler.add_noise(original_samples=x0.float(), noise=draws.noise, timesteps=draws.timesteps)
    if mask_onehot is not None:
        keep = (~draws.drop).to(mask_onehot.dtype).view(-1, *[1] * (x0.ndim - 1))
        x_t = torch.cat([x_t, mask_onehot.to(x_t.device) * keep], 1)
    layout = memory_format_of(x0.ndim)
    if layout != torch.preserve_format and x0.is_contiguous(memory_format=layout):  # the network's layout
        x_t = x_t.contiguous(memory_format=layout)
    with torch.autocast(x0.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        pred = model(x_t, timesteps=draws.timesteps, class_labels=labels)
    return F.mse_loss(pred.float(), loss_target(scheduler, x0.float(), draws), reduction="none").flatten(1).mean(1)


def loss_target(scheduler, x0: torch.Tensor, draws: StepNoise) -> torch.Tensor:
    """What the network learns to predict under ``scheduler.prediction_type`` (see :func:`diffusion_loss`)."""
    kind = getattr(scheduler, "prediction_type", "epsilon")
    if is_flow(scheduler):  # MONAI's RFlowScheduler: x_t = (1 - t/T) x0 + t/T noise, velocity x0 - noise
        return x0 - draws.noise
    if kind == "epsilon":
        return draws.noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, draws.noise, draws.timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"scheduler.prediction_type={kind!r} unknown; choose epsilon, v_prediction or sample")


class StepDraw(NamedTuple):
    """What :func:`fit` hands the loss at step ``step``: this rank's rows of the step's permutation of the
    training set, and the step's generators, seeded from ``(seed, step)`` and already past that permutation.
    Per-image draws are made for the whole global batch, then sliced by ``mine``, so N ranks reproduce one
    process with an N-times larger batch."""

    step: int
    rows: torch.Tensor  # (B,) int64 indices into the training set, on the data's device
    global_batch: int  # B * world size
    mine: slice  # this rank's share of the global batch
    generator: torch.Generator  # on the model's device
    data_generator: torch.Generator  # on the training set's device (``generator`` itself when they agree)


class StepLoss(NamedTuple):
    """One step's loss: ``loss`` (a scalar, the mean of the per-sample losses) is what :func:`fit`
    backpropagates; ``terms`` (scalars, loss first) are averaged over the log window and logged.
    ``after`` runs after the optimizer's step, e.g. a discriminator's update; it returns more terms."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    after: Callable[[], dict[str, torch.Tensor]] | None = None


class TrainStep(Protocol):
    """A loss :func:`fit` trains with: ``images`` (the training set, N first: fit permutes its rows),
    ``name`` (progress label, as in ``train/loss``), ``lr_key`` (the setting a NaN loss's advice names)."""

    images: torch.Tensor
    name: str
    lr_key: str

    def __call__(self, draw: StepDraw) -> StepLoss: ...


@dataclass
class DiffusionStep:
    """The class-conditional diffusion loss (:func:`diffusion_loss`) as a :class:`TrainStep` of ``model``
    (DDP- or compile-wrapped as it runs) on ``images`` (N, C, *spatial) in [-1, 1] and ``labels`` (N,).
    ``amp_dtype=None`` trains in fp32; ``channels_last`` hands the network channels-last batches.
    ``conditioning`` (default: the class only) with a mask takes the label maps ``masks`` (N, 1, *spatial)
    of the images, given to the network as one-hot channels (:mod:`medaug.conditioning`)."""

    model: nn.Module
    scheduler: object
    images: torch.Tensor
    labels: torch.Tensor
    null_class: int
    p_uncond: float = 0.1
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    name: str = "train"
    lr_key: str = "training.lr"
    masks: torch.Tensor | None = None
    conditioning: Conditioning = field(default_factory=Conditioning)

    def __post_init__(self):
        if self.conditioning.uses_mask and (self.masks is None or self.masks.shape[0] != self.images.shape[0]):
            raise ValueError(f"a {self.conditioning.kind}-conditioned model needs one mask per training image")

    def __call__(self, draw: StepDraw) -> StepLoss:
        device = draw.generator.device
        x0, y = take_batch(
            self.images, self.labels, draw.rows, device, memory_format_of(self.images.ndim, self.channels_last)
        )
        cond = None
        if self.conditioning.uses_mask:
            masks = self.masks[draw.rows.to(self.masks.device)].to(device)
            cond = self.conditioning.one_hot(masks, grid=self.images.shape[2:])  # latents: on the latent grid
        shape = (draw.global_batch, *self.images.shape[1:])
        draws = StepNoise(
            *(
                d[draw.mine]
                for d in draw_step_noise(
                    shape, self.scheduler.num_train_timesteps, self.p_uncond, draw.generator, self.scheduler
                )
            )
        )
        loss = diffusion_loss(
            self.model,
            self.scheduler,
            x0,
            y if self.conditioning.use_class else None,
            null_class=self.null_class,
            draws=draws,
            amp_dtype=self.amp_dtype,
            mask_onehot=cond,
        ).mean()
        return StepLoss(loss, {f"{self.name}/loss": loss.detach()})


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute the activations of every down, middle and up block of a MONAI
    ``DiffusionModelUNet`` (or of the networks inside ``model``: a ControlNet and its UNet) in the backward
    pass instead of storing them (less memory, about a third more compute). The weights and their names are
    unchanged."""
    blocks = []
    for net in (m for m in model.modules() if hasattr(m, "down_blocks")):
        middle = [net.middle_block] if getattr(net, "middle_block", None) is not None else []
        blocks += [*net.down_blocks, *middle, *getattr(net, "up_blocks", [])]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no down/middle/up blocks to checkpoint")
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def prepare_for_speed(
    model: nn.Module,
    *,
    channels_last: bool = False,
    compile_mode: str | None = None,
    activation_checkpointing: bool = False,
    compile_cache: str | Path | None = None,
) -> nn.Module:
    """Apply the speed and memory switches to a network already on its device.

    ``channels_last`` stores the weights channels-last (``channels_last_3d`` for a 3D network).
    ``compile_mode`` is a ``torch.compile`` mode (``default``, ``reduce-overhead`` (CUDA graphs),
    ``max-autotune-no-cudagraphs``, ...) or None for eager. The returned module may be a compiled
    wrapper; it shares its parameters with ``model`` (use :func:`medaug.model.unwrap` to reach the network).
    ``compile_cache`` is the folder of compiled kernels kept between runs (unless
    ``TORCHINDUCTOR_CACHE_DIR`` is already set): the first run on a machine compiles, later ones load.
    """
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if channels_last:
        model = model.to(memory_format=memory_format_of(max(p.ndim for p in model.parameters())))
    if compile_mode:  # shapes are fixed in training: static shapes avoid symbolic-shape recompiles
        if compile_cache is not None:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(compile_cache).expanduser()))
        log.info(
            "torch.compile mode %s; kernel cache %s",
            compile_mode,
            os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default"),
        )
        model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode, dynamic=False)
    return model


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (preemption, ``docker stop``, a SLURM time limit): handled like Ctrl-C."""


class StopSignal:
    """What :func:`checkpoint_at_exit` yields: ``check()``, called by the loop after each finished step,
    raises :class:`Terminated` once SIGTERM has arrived. The signal only sets a flag, so the step under
    way ends whole and the checkpoint holds the weights of exactly the step it names."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signum = signum

    def check(self, step: int) -> None:
        if self.signum is not None:
            raise Terminated(f"stopped by signal {signal.Signals(self.signum).name} after step {step}")


@contextmanager
def checkpoint_at_exit(save: Callable[[int], None], result) -> Iterator[StopSignal]:
    """Around a training loop: ``save(result.step)`` when it ends, and on Ctrl-C or SIGTERM before
    re-raising (SIGTERM as :class:`Terminated`, a ``KeyboardInterrupt``), so nothing trained is lost;
    other errors (e.g. a NaN loss) save nothing. The loop calls ``stop.check(step)`` after each step."""
    stop = StopSignal()
    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        try:
            yield stop
        except KeyboardInterrupt:
            save(result.step)
            raise
        save(result.step)
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def fit(
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    loss: TrainStep,
    settings: TrainSettings,
    *,
    start_step: int = 0,
    ckpt_path: Path | None = None,
    checkpoint_payload: Callable[[], dict] | None = None,
    tracker: Tracker | None = None,
    validate: Callable[[], dict] | None = None,
    on_step: Callable[[int], None] | None = None,
    privacy=None,
) -> FitResult:
    """Train ``model`` from ``start_step`` to ``settings.max_steps`` on ``loss`` (e.g. :class:`DiffusionStep`,
    :class:`medaug.latent.AutoencoderStep`): at every step its loss backpropagates, gradients are clipped
    to ``grad_clip``, ``optimizer`` steps and ``ema`` follows ``model`` every ``ema_every`` steps.

    Saves ``ckpt_path`` every ``ckpt_every`` steps, at the end, and on interruption (Ctrl-C, or
    SIGTERM: the step under way finishes, then :class:`Terminated` is raised), so nothing trained
    is lost; it holds ``model`` (unwrapped), ``ema``, ``optimizer.state_dict()`` and what
    ``checkpoint_payload()`` gives (config and meta). Loss terms are synced to the host every
    ``log_every`` steps only, averaged over all ranks, and logged as ``loss.terms`` names them;
    ``validate()`` (rank 0, every ``val_every`` steps) returns metrics logged beside them. A
    tracker that fails (a tracking server gone away) is switched off with one warning; training goes on.
    ``on_step(done)`` (rank 0) runs after every step, e.g. :func:`medaug.registry.preview_callback`.

    ``privacy`` (a :class:`medaug.dp.PrivateTraining`) makes the steps differentially private: it draws each
    step's rows (Poisson-sampled patients), replaces ``grad_clip`` by per-example clipping and noise, and its
    ``privacy/epsilon`` is logged at every log step (one process only).
    """
    tracker = guarded(tracker)
    device = next(model.parameters()).device
    images = loss.images
    n = images.shape[0]
    if n == 0:
        raise ValueError("no training images: the train split is empty")
    world, rank = settings.world_size, settings.rank
    batch_size = min(settings.batch_size, n // world)
    if batch_size == 0:
        raise ValueError(f"{n} training images cannot feed {world} ranks")
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    cuda = device.type == "cuda"
    result = FitResult(step=start_step, checkpoint=ckpt_path)

    def checkpoint(step: int) -> None:
        if ckpt_path is not None and rank == 0:
            payload = checkpoint_payload() if checkpoint_payload else {"config": {}, "meta": {}}
            save_checkpoint(ckpt_path, model=model, ema=ema, optimizer=optimizer, step=step, **payload)

    gen = torch.Generator(device=device)  # reseeded from (seed, step) at every step
    data_gen = gen if images.device == device else torch.Generator(device=images.device)
    model.train()
    window: dict[str, torch.Tensor] = {}  # sums on the device, read on the host at log steps only
    counts: dict[str, int] = {}  # steps that gave each term in the window
    bar = progress_bar(
        range(start_step, settings.max_steps),
        desc=loss.name,
        unit="step",
        initial=start_step,
        total=settings.max_steps,
        disable=rank != 0,
    )
    started = time.perf_counter()
    with checkpoint_at_exit(checkpoint, result) as stop, bar:
        for step in bar:
            if cuda:  # a new iteration for CUDA graphs (compile mode reduce-overhead): last step's outputs are dead
                torch.compiler.cudagraph_mark_step_begin()
            gen.manual_seed(settings.seed * 1_000_003 + step)
            if data_gen is not gen:
                data_gen.manual_seed(settings.seed * 1_000_003 + step)
            if privacy is None:
                rows = batch_rows(n, data_gen, mine)
                draw = StepDraw(step, rows, batch_size * world, mine, gen, data_gen)
            else:  # a Poisson draw of patients: the batch may be of any size, empty included
                rows = privacy.rows(data_gen)
                draw = StepDraw(step, rows, len(rows), slice(None), gen, data_gen)
            optimizer.zero_grad(set_to_none=True)
            out = loss(draw) if len(rows) else StepLoss(torch.zeros((), device=device), {})
            if len(rows):
                out.loss.backward()
            if privacy is not None:
                out = out._replace(terms={**out.terms, **privacy.privatize(step, len(rows), gen)})
            elif settings.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            if (step + 1) % settings.ema_every == 0:
                ema.update(model)
            terms = {**out.terms, **(out.after() if out.after is not None else {})}
            if step == start_step:  # one sync per run: the first step's time, torch.compile's warm-up included
                if cuda:
                    torch.cuda.synchronize(device)
                result.first_step_s = time.perf_counter() - started
                log.info(
                    "first training step took %.1f s (includes the torch.compile warm-up when compiling)",
                    result.first_step_s,
                )
                tracker.log_metrics({f"{loss.name}/first_step_s": result.first_step_s}, step=step + 1)
            for key, value in terms.items():
                window[key] = window.get(key, 0.0) + value.double()
                counts[key] = counts.get(key, 0) + 1  # a term may be missing from a step (a private empty batch)
            done = step + 1
            if done % settings.log_every == 0 or done == settings.max_steps:
                sums = torch.stack(list(window.values()))
                if world > 1:  # the mean over all ranks, as one process with the global batch would see
                    torch.distributed.all_reduce(sums)
                    sums /= world
                means = {k: float(v) / counts[k] for k, v in zip(window, sums)}
                means = {k: means[k] for k in sorted(means, key=lambda k: k.startswith("privacy/"))}  # loss first
                key, value = next(iter(means.items()))
                if not math.isfinite(value):
                    raise FloatingPointError(f"{key} became {value} at step {done}; lower {loss.lr_key}")
                if privacy is not None:
                    means.update(privacy.metrics())
                result.losses.append((done, value))
                result.terms.append((done, means))
                tracker.log_metrics(means, step=done)
                bar.set_postfix(loss=f"{value:.4f}")
                window, counts = {}, {}
            if (
                rank == 0
                and validate is not None
                and settings.val_every
                and done % settings.val_every == 0
                and done < settings.max_steps
            ):
                metrics = validate()
                result.val.append((done, metrics))
                tracker.log_metrics(metrics, step=done)
            if rank == 0 and on_step is not None:
                on_step(done)
            if settings.ckpt_every and done % settings.ckpt_every == 0 and done < settings.max_steps:
                checkpoint(done)
            result.step = done
            stop.check(done)
    return result


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (a run's model init and data order)."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def compile_mode_of(value, cuda: bool, private: bool = False) -> str | None:
    """``torch.compile`` mode for ``training.compile``: ``auto`` compiles (mode ``default``) on CUDA only and
    not under DP training (``private``: Opacus's hooks do not compile), ``true`` always, ``false`` never
    (None); any other string is a mode (``max-autotune``, ...)."""
    return {"auto": "default" if cuda and not private else None, False: None, True: "default"}.get(value, value)


def resume_training(
    path: Path,
    net: nn.Module,
    ema: EMA,
    optimizer,
    *,
    image_shape: Sequence[int],
    class_names: Sequence[str],
    dataset: str,
    autoencoder_id: str | None,
    prepared: str | Path,
    trust: bool = False,
    conditioning: Conditioning | None = None,
) -> tuple[int, dict]:
    """Restore weights, EMA, optimizer and RNG states from the checkpoint at ``path`` when there is one,
    after checking it was trained on data of the same ``image_shape`` and ``class_names``, in the same
    space (``autoencoder_id``: the latents of that autoencoder; None: pixels) and with the same
    ``conditioning`` (None: not checked). Warns when the prepared
    dataset's fingerprint differs. Returns ``(start step, the checkpoint's meta)`` (its MLflow run id, its DP
    history, ...); ``(0, {})`` without a checkpoint.

    Raises ValueError naming the checkpoint, the prepared folder and the fix when it does not fit."""
    from .model import load_checkpoint, restore_training_state

    if not path.exists():
        return 0, {}
    ckpt = load_checkpoint(path, trust)
    for key, now in (("image_shape", list(image_shape)), ("class_names", list(class_names))):
        if list(ckpt.meta.get(key, [])) != now:
            raise ValueError(
                f"{path} was trained with {key} {list(ckpt.meta.get(key, []))}, but "
                f"{prepared} has {now}; train afresh in another paths.train_dir (or name=), "
                "or prepare the data as before"
            )
    trained_on = ckpt.meta.get("latent", {}).get("autoencoder_id")  # None: pixel space
    if trained_on != autoencoder_id:
        raise ValueError(
            f"{path}: trained on {trained_space(trained_on)}, but this run trains on {trained_space(autoencoder_id)}; "
            "restore the autoencoder it was trained with, or train afresh in another paths.train_dir"
        )
    trained_as = Conditioning.from_meta(ckpt.meta)
    if conditioning is not None and trained_as != conditioning:
        raise ValueError(
            f"{path}: trained conditioned on {trained_as.kind} generating {trained_as.generates}, but this run asks "
            f"for {conditioning.kind} generating {conditioning.generates} (model.condition, model.generates, the "
            "masks' labels); train afresh in another paths.train_dir, or set them as before"
        )
    restore_training_state(ckpt, net, ema, optimizer)
    if ckpt.meta.get("dataset") != dataset:
        log.warning("resuming on a prepared dataset that differs from the checkpoint's")
    log.info("resuming from %s at step %d", path, ckpt.step)
    return ckpt.step, ckpt.meta


def checkpoint_meta(info, mlflow_run_id: str | None, space=None, conditioning: Conditioning | None = None) -> dict:
    """What a checkpoint records of its prepared dataset ``info`` (classes, geometry, intensity window,
    fingerprint, modality), its MLflow run, for latent diffusion its latent ``space`` and, unless the model is
    class-conditional only, its ``conditioning``: all that ``sample`` needs besides the weights and config."""
    meta = dict(
        class_names=info.class_names,
        spatial_dims=info.spatial_dims,
        image_shape=info.image_shape,
        window=info.window.as_dict(),
        affine=info.affine.tolist(),
        dataset=info.fingerprint,
        mlflow_run_id=mlflow_run_id,
        modality=info.modality,
    )
    if space is not None:
        meta["latent"] = space.meta()
    if conditioning is not None and conditioning != Conditioning():
        meta.update(conditioning.meta())
    return meta
