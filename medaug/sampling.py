"""The seeded denoising loop with classifier-free guidance, and sample grids.

MONAI's ``DiffusionInferer`` cannot pass class labels and its ``sample()`` takes no
generator, so the loop is written out here, step by step:

1. draw the starting noise ``x_T`` per sample from ``seed + index`` (a sample does not
   depend on which batch it lands in);
2. for each timestep ``t``: predict ``eps`` for the label and (if guided) for the null
   class, combine ``eps_u + w (eps_c - eps_u)``;
3. clip the prediction's clean image ``x0 = (x_t - sigma_t eps) / alpha_t`` to the data range [-1, 1]
   (static thresholding; images only, ``clip_x0``), so that no sampler steps towards values that no
   image has: guidance ``x0_u + w (x0_c - x0_u)`` leaves [-1, 1] wherever the two predictions differ,
   and a multistep sampler (PNDM) extrapolates the unclipped values further;
4. let the scheduler take the step ``x_t → x_{t-1}``; its stochastic noise (DDPM, DPM-Solver++
   2M SDE, or DDIM with ``eta > 0``) comes from a generator seeded from ``(seed, first index of
   the batch)``, a stream apart from every starting noise.

Generation in many processes (``sample`` and ``augment`` alike): the samples are cut into chunks,
chunk ``c`` is made by rank ``c % world`` with :func:`sample_images` seeded from ``seed + start`` (its
first sample's index), so any number of processes makes the same images (:func:`generate_sharded`).

References (the samplers' equations):

* DDPM: Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239, eq. 11 (the step).
* DDIM: Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502, eq. 12 (``eta`` = its sigma).
* PNDM: Liu, Ren, Lin, Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds", arXiv:2202.09778.
* DPM-Solver++: Lu et al. 2022, arXiv:2211.01095 (:mod:`medaug.dpm_solver`).
* Classifier-free guidance: Ho, Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598, eq. 6.
* v-prediction: Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models",
  arXiv:2202.00512, appendix D.

Example::

    sch = inference_scheduler(ckpt.config["scheduler"], sampler="ddim", steps=50)
    x = sample_images(net, sch, labels, image_shape=(32, 32), guidance_scale=2.0, null_class=3, seed=0)
"""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler
from torch import nn

from .dpm_solver import DPMSolverPP2M, DPMSolverPP2MSDE
from .flow import FLOW_SAMPLER, flow_clip_x0, flow_scheduler, is_flow
from .atomic import atomic_folder, is_complete
from .conditioning import Conditioning
from .model import Checkpoint, checkpoint_network, file_id
from .pictures import save_grid
from .progress import progress_bar
from .training import prepare_for_speed


class DDIM(DDIMScheduler):
    """MONAI's DDIM with its timesteps on the grid its ``step`` follows.

    MONAI's ``step`` goes from t to ``t - T // steps``, while its ``set_timesteps`` spaces the
    timesteps by ``(T - 1) / (steps - 1)``: at 10 of 1000 steps the network would be told t = 888 for
    a sample at 899. Here the timesteps are ``round(k T / steps) - 1`` for k = steps, ..., 1
    (trailing: the first step starts from pure noise, the last ends at the clean image), so every
    step lands on the next timestep, within one when ``steps`` does not divide T.
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        k = torch.arange(num_inference_steps, 0, -1, dtype=torch.float64, device=device)
        self.timesteps = (k * self.num_train_timesteps / num_inference_steps).round().long() - 1


SAMPLERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIM,
    "pndm": PNDMScheduler,
    "dpmpp_2m": DPMSolverPP2M,
    "dpmpp_2m_sde": DPMSolverPP2MSDE,
}
SCHEDULE_ARGS = {"beta_start", "beta_end", "sig_range"}  # passed through to MONAI's noise schedule functions


def inference_scheduler(spec: Mapping, sampler: str = "ddim", steps: int = 50):
    """A scheduler for sampling with the noise schedule of the training ``spec``.

    ``sampler`` is ``ddpm`` (ancestral, every training timestep), ``ddim`` (deterministic with
    ``eta=0``), ``pndm`` (pseudo linear multistep, PLMS), or the few-step DPM-Solver++ 2M
    samplers ``dpmpp_2m`` (ODE) and ``dpmpp_2m_sde`` (stochastic; see
    :mod:`medaug.dpm_solver`), none needing retraining; ``steps`` ≤ the training timesteps
    (``pndm`` is for epsilon-predicting networks only). A rectified-flow ``spec`` (``scheduler=rflow``) takes
    ``sampler=rflow`` only (Euler steps of the velocity, :mod:`medaug.flow`), and a DDPM-type one refuses it.
    """
    if is_flow(spec) or sampler == FLOW_SAMPLER:
        return _flow_inference_scheduler(spec, sampler, steps)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} unknown; choose one of {sorted(SAMPLERS)}")
    cls = SAMPLERS[sampler]
    accepted = set(inspect.signature(cls.__init__).parameters) | SCHEDULE_ARGS
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_") and k in accepted}
    # PLMS steps only; the last step lands on the clean image (alpha = 1), not on timestep 0's noise
    if sampler == "pndm":
        kwargs.update(skip_prk_steps=True, set_alpha_to_one=True)
    scheduler = cls(**kwargs)
    total = scheduler.num_train_timesteps
    if not 1 <= steps <= total:
        raise ValueError(f"steps={steps} must be between 1 and {total}")
    if sampler == "ddpm" and steps != total:  # MONAI's DDPM step always goes from t to t - 1
        raise ValueError(
            f"sampler=ddpm takes every one of the {total} training timesteps, not steps={steps}; set "
            f"steps={total}, or for fewer steps use ddim with eta=1 (ancestral) or dpmpp_2m_sde"
        )
    if sampler == "pndm" and scheduler.prediction_type == "v_prediction":
        raise ValueError(
            "sampler=pndm extrapolates the network's outputs over timesteps, which is only right for "
            "noise (epsilon) predictions, not for this v_prediction model; use dpmpp_2m_sde, dpmpp_2m "
            "or ddim"
        )
    scheduler.set_timesteps(steps)
    return scheduler


def _flow_inference_scheduler(spec: Mapping, sampler: str, steps: int):
    if not is_flow(spec):
        raise ValueError(
            f"sample.sampler={FLOW_SAMPLER} is for models trained with scheduler=rflow, but this one was "
            f"trained with {spec.get('_target_')}; choose one of {sorted(SAMPLERS)}"
        )
    if sampler != FLOW_SAMPLER:
        raise ValueError(
            f"sample.sampler={sampler} is for DDPM-trained models; this model was trained with rectified "
            f"flow: set sample.sampler={FLOW_SAMPLER} (or add scheduler=rflow to the command, which sets "
            "it with its steps)"
        )
    scheduler = flow_scheduler(spec)
    if not 1 <= steps <= scheduler.num_train_timesteps:
        raise ValueError(f"steps={steps} must be between 1 and {scheduler.num_train_timesteps}")
    scheduler.set_timesteps(steps, input_img_size_numel=scheduler.base_img_size_numel)  # sample_images sets the size
    return scheduler


def class_counts(
    num_per_class: int | Mapping[str, int],
    class_names: Sequence[str],
    *,
    key: str = "sample.num_per_class",
    allow_empty: bool = False,
) -> dict[str, int]:
    """How many samples each class gets, from one count for every class or a count per class name.

    Args:
        num_per_class: an int (that many of every class) or ``{class_name: count}`` (classes not named get 0).
        class_names: every class, in label order.
        key: the config key that errors name.
        allow_empty: accept a total of 0 samples.

    Returns:
        ``{class_name: count}`` for every class of ``class_names``, in their order.

    Raises:
        ValueError: a class name not in ``class_names``, a negative count, or no samples at all (unless
        ``allow_empty``).

    Example::

        class_counts({"lesion": 2}, ["healthy", "lesion"]) == {"healthy": 0, "lesion": 2}
    """
    if isinstance(num_per_class, Mapping):
        unknown = set(num_per_class) - set(class_names)
        if unknown:
            raise ValueError(f"{key} names unknown classes {sorted(unknown)}; known: {list(class_names)}")
        counts = {c: int(num_per_class.get(c, 0)) for c in class_names}
    else:
        counts = {c: int(num_per_class) for c in class_names}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"{key}={num_per_class} asks for a negative count; give counts >= 0")
    if not allow_empty and sum(counts.values()) == 0:
        raise ValueError(f"{key}={num_per_class} asks for no samples; give at least one count > 0")
    return counts


def labels_for_counts(counts: Mapping, class_names: Sequence[str] | None = None) -> torch.Tensor:
    """The label of every sample ``(N,)`` long, class by class, from ``{class index: count}``, or from
    ``{class name: count}`` (as :func:`class_counts` returns) with ``class_names`` in label order."""
    if class_names is not None:
        counts = {list(class_names).index(c): k for c, k in counts.items()}
    return torch.tensor([c for c, k in sorted(counts.items()) for _ in range(int(k))], dtype=torch.long)


def sampling_network(
    ckpt: Checkpoint,
    device: str | torch.device,
    *,
    use_ema: bool = True,
    compile=False,
    compile_cache: str | Path | None = None,
    conditioned: bool = False,
) -> nn.Module:
    """The network of ``ckpt`` ready to sample on ``device``, in eval mode.

    Args:
        ckpt: a loaded diffusion checkpoint (:func:`medaug.model.load_checkpoint`).
        device: where it runs.
        use_ema: the EMA weights (else the training weights).
        compile: CUDA only: ``False`` eager, ``True`` ``torch.compile`` mode default, ``"auto"`` mode
            ``reduce-overhead`` (CUDA graphs for the fixed-shape denoising loop: 2.8x the fp32 eager loop
            on an H200), or a ``torch.compile`` mode name.
        compile_cache: folder of compiled kernels kept between runs (see :func:`medaug.training.prepare_for_speed`).
        conditioned: the caller feeds masks (:mod:`medaug.conditioning`); without it a checkpoint conditioned on
            masks, or one that generates masks, is refused (ValueError) for the class → image callers
            (augment, inpaint, the copy filter's regeneration, the registry's generator).

    Returns:
        The network on ``device`` (on CUDA channels-last for 2D, maybe a compiled wrapper sharing its parameters).
    """
    cond = Conditioning.from_meta(ckpt.meta)
    if not conditioned and cond != Conditioning():
        what = "generates masks" if cond.generates == "mask" else f"is conditioned on masks ({cond.kind})"
        raise ValueError(
            f"{ckpt.path} {what}; here only class-conditional image models work: make its pairs with "
            "`medaug sample` (sample.masks=generate|prepared:<split>|<folder>)"
        )
    device = torch.device(device)
    net = checkpoint_network(ckpt, "ema" if use_ema else "model").to(device)
    if device.type != "cuda":
        return net
    mode = {"auto": "reduce-overhead", False: None, True: "default"}.get(compile, compile)
    return prepare_for_speed(
        net, channels_last=ckpt.meta["spatial_dims"] == 2, compile_mode=mode, compile_cache=compile_cache
    )


class Chunk(NamedTuple):
    """Samples ``start`` up to ``stop`` (exclusive) of a generation: the ``index``-th block of its chunk size."""

    index: int
    start: int
    stop: int


def shard_chunks(n: int, chunk_size: int, rank: int = 0, world: int = 1) -> list[Chunk]:
    """The chunks of ``n`` samples that process ``rank`` of ``world`` makes: chunk ``c`` (samples
    ``c * chunk_size`` up to ``(c + 1) * chunk_size``) goes to rank ``c % world``; all of them for world 1.

    Example: ``shard_chunks(5, 2, rank=1, world=2) == [Chunk(1, 2, 4)]``.
    """
    if chunk_size < 1 or not 0 <= rank < world:
        raise ValueError(f"chunk size {chunk_size} must be >= 1 and rank {rank} in [0, world size {world})")
    starts = range(0, n, chunk_size)
    return [Chunk(c, start, min(start + chunk_size, n)) for c, start in enumerate(starts) if c % world == rank]


Generate = Callable[[torch.Tensor, int], torch.Tensor]  # (labels (n,), seed of the first) -> images (n, C, *spatial)


def generate_chunks(
    generate: Generate, labels: torch.Tensor, chunks: Iterable[Chunk], seed: int, masks: torch.Tensor | None = None
) -> Iterator[tuple[Chunk, torch.Tensor]]:
    """``(chunk, generate(labels[start:stop], seed + start))`` for each chunk, one at a time; with ``masks``
    ``generate(labels[start:stop], seed + start, masks[start:stop])``.

    ``generate`` seeds sample ``j`` of its call from ``seed + j`` (as :func:`sample_images` does), so
    sample ``i`` comes from ``seed + i`` whichever process makes its chunk."""
    for chunk in chunks:
        part = slice(chunk.start, chunk.stop)
        extra = () if masks is None else (masks[part],)
        yield chunk, generate(labels[part], seed + chunk.start, *extra)


def generate_sharded(
    generate: Generate,
    labels: torch.Tensor,
    chunk_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    masks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """All ``len(labels)`` images, made by ``world`` processes together: this one makes its
    :func:`shard_chunks` with :func:`generate_chunks`, and with ``world > 1`` (a started
    ``torch.distributed`` process group) every rank's chunks are gathered with ``all_gather_object``.

    Args:
        generate: ``(labels (n,), seed) -> images (n, C, *spatial)`` on the CPU.
        labels: ``(N,)`` class labels, N >= 1.
        chunk_size: samples per ``generate`` call (the batch size of ``sample``).
        seed: sample ``i`` is made from ``seed + i``.
        rank, world: this process and the number of processes.
        masks: ``(N, 1, *spatial)`` label maps handed to ``generate`` chunk by chunk (a mask-conditioned model).

    Returns:
        ``(N, C, *spatial)`` images in the order of ``labels``, the same on every rank and for every ``world``;
        when ``generate`` returns a tuple (images, generated masks), the tuple of them concatenated.
    """
    if len(labels) == 0:
        raise ValueError("no samples to generate (0 labels)")
    chunks = shard_chunks(len(labels), chunk_size, rank, world)
    mine = {c.index: x for c, x in generate_chunks(generate, labels, chunks, seed, masks)}
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        mine = {k: v for part in gathered for k, v in part.items()}
    parts = [mine[k] for k in sorted(mine)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def guided_eps(
    model: nn.Module,
    x: torch.Tensor,
    t: int,
    labels: torch.Tensor | None,
    scale: float,
    null_class: int,
    cond: torch.Tensor | None = None,
):
    """Classifier-free guided noise prediction; ``scale=1`` is the plain conditional model.

    ``labels=None``: a model without class input. ``cond`` ``(N, K, *spatial)``: the one-hot mask of a
    mask-conditioned model, concatenated to ``x``; the unconditional prediction drops class and mask together
    (null class, all-zero mask), as training did (:mod:`medaug.conditioning`)."""
    timesteps = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    x_c = x if cond is None else torch.cat([x, cond.to(x.dtype)], 1)
    if scale == 1.0:
        return model(x_c, timesteps=timesteps, class_labels=labels)
    x_u = x if cond is None else torch.cat([x, torch.zeros_like(cond, dtype=x.dtype)], 1)
    both = None if labels is None else torch.cat([labels, torch.full_like(labels, null_class)])
    eps_c, eps_u = model(torch.cat([x_c, x_u]), timesteps=torch.cat([timesteps, timesteps]), class_labels=both).chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def clip_x0_of(scheduler, output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
    """The network ``output`` at timestep ``t`` (of the scheduler's ``prediction_type``) changed so that the
    clean image it predicts, ``x0 = (x - sigma eps) / alpha`` (a flow's: ``x + s v``), lies in [-1, 1] (static
    thresholding).

    ``x`` and ``output``: ``(N, C, *spatial)``; the returned prediction has the same type and shape."""
    kind = scheduler.prediction_type
    if is_flow(scheduler):
        return flow_clip_x0(scheduler, output, t, x)
    abar = float(scheduler.alphas_cumprod[int(t)])
    alpha, sigma = abar**0.5, (1 - abar) ** 0.5
    if kind == "sample":
        return output.clamp(-1, 1)
    x0 = (x - sigma * output) / alpha if kind == "epsilon" else alpha * x - sigma * output
    x0 = x0.clamp(-1, 1)
    eps = (x - alpha * x0) / sigma
    return eps if kind == "epsilon" else alpha * eps - sigma * x0


def step_noise_seed(seed: int, start: int) -> int:
    """Seed of the step noise of the batch that starts at sample ``start``: derived from both, so
    that it is not the seed of any sample's starting noise (``seed + i``)."""
    return int(np.random.SeedSequence([seed, start, 1]).generate_state(1, np.uint64)[0] >> 1)


@torch.no_grad()
def sample_images(
    model: nn.Module,
    scheduler,
    labels: torch.Tensor,
    image_shape: Sequence[int],
    *,
    guidance_scale: float,
    null_class: int,
    seed: int,
    batch_size: int = 64,
    channels: int = 1,
    eta: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    clip: bool = True,
    clip_x0: bool = True,
    masks: torch.Tensor | None = None,
    conditioning: Conditioning | None = None,
) -> torch.Tensor:
    """Generate ``len(labels)`` images ``(N, C, *image_shape)`` in [-1, 1], on the CPU
    (``clip=False`` for latents, which are not bounded). ``clip_x0``: clip the predicted clean image
    to [-1, 1] at every step (images only; see the module docstring).

    ``conditioning`` (:mod:`medaug.conditioning`; default: the class only): a mask-conditioned model takes
    ``masks`` ``(N, 1, *spatial)``, the label map each image is made for (resized to ``image_shape`` when
    that is a latent grid); a model without class input
    ignores ``labels`` (they still count the samples). A mask model (``generates=mask``) needs ``channels``
    = its label count.

    The same ``seed``, labels and batch size give identical samples. A rectified flow (:mod:`medaug.flow`) is
    deterministic and takes no ``eta``.
    """
    device = next(model.parameters()).device
    steps = scheduler.num_inference_steps
    flow = is_flow(scheduler)
    if flow and eta != 0:
        raise ValueError(
            f"sample.eta={eta} is DDIM's stochasticity and does not apply to a rectified flow; set sample.eta=0"
        )
    conditioning = conditioning or Conditioning()
    if conditioning.uses_mask and (masks is None or len(masks) != len(labels)):
        raise ValueError(f"a {conditioning.kind}-conditioned model needs one mask per sample (sample.masks)")
    size = {"input_img_size_numel": int(np.prod(image_shape))} if flow else {}
    out = []
    n = len(labels)
    bar = progress_bar(total=n * len(scheduler.timesteps), desc="sample", unit="step", disable=not progress)
    for start in range(0, n, batch_size):
        y = labels[start : start + batch_size].to(device)
        cond = None
        if conditioning.uses_mask:  # on the grid of x (a latent model's: the latent grid)
            cond = conditioning.one_hot(masks[start : start + batch_size], grid=image_shape).to(device)
        y_in = y if conditioning.use_class else None
        x = torch.stack(
            [
                torch.randn(channels, *image_shape, generator=torch.Generator().manual_seed(seed + start + j))
                for j in range(len(y))
            ]
        ).to(device)
        # multistep samplers (PNDM) keep history: reset it; timesteps stay on the CPU so that
        # reading them never waits for the GPU
        scheduler.set_timesteps(steps, **size)
        step_kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
        if not isinstance(scheduler, PNDMScheduler) and not flow:  # PNDM and flows are deterministic
            step_kwargs["generator"] = torch.Generator(device=device).manual_seed(step_noise_seed(seed, start))
        for t in scheduler.timesteps:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                eps = guided_eps(model, x, t, y_in, guidance_scale, null_class, cond).float()
            if clip and clip_x0:
                eps = clip_x0_of(scheduler, eps, int(t), x)
            x, _ = scheduler.step(eps, int(t), x, **step_kwargs)
            bar.update(len(y))
        out.append((x.clamp(-1, 1) if clip else x).float().cpu())
    bar.close()
    return torch.cat(out) if out else torch.empty(0, channels, *image_shape)


def save_samples(
    out_dir: str | Path,
    images: torch.Tensor,
    rows: Sequence[Mapping],
    info: Mapping,
    class_names: Sequence[str],
    extra: Callable[[Path], None] | None = None,
    masks: torch.Tensor | None = None,
) -> Path:
    """Write a samples folder atomically: ``samples.pt`` (images in [-1, 1], labels, and with ``masks`` the
    ``(N, 1, *spatial)`` int64 label map each image was made for, under ``"masks"``), ``manifest.csv`` (one
    row per sample), ``info.json`` (provenance) and ``grid.png``; ``extra(folder)`` writes more files into it
    before it is complete."""
    labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
    data = {"images": images.float(), "labels": labels}
    if masks is not None:
        if masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[2:]:
            raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
        data["masks"] = masks.long()
    with atomic_folder(out_dir) as tmp:
        torch.save(data, tmp / "samples.pt")
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "info.json").write_text(json.dumps(dict(info), indent=2))
        save_grid(images, labels, class_names, tmp / "grid.png")
        if extra is not None:
            extra(tmp)
    return Path(out_dir)


def preview_samples(
    net: nn.Module,
    scheduler_spec: Mapping,
    labels: torch.Tensor,
    image_shape: Sequence[int],
    *,
    null_class: int,
    space=None,
    steps: int = 10,
    seed: int = 0,
    guidance_scale: float = 2.0,
    sampler: str | None = None,
    **options,
) -> torch.Tensor:
    """Samples of ``labels`` during training (previews, privacy probes): ``steps`` steps of ``sampler`` (default:
    DDIM, Euler steps for a flow), guided, seeded, no progress bar; decoded from ``space`` in latent diffusion.
    ``options``: more :func:`sample_images` settings (``batch_size``, ``eta``, ``clip_x0``).
    Returns ``(N, 1, *image_shape)`` in [-1, 1]."""
    sampler = sampler or (FLOW_SAMPLER if is_flow(scheduler_spec) else "ddim")
    sampler = inference_scheduler(scheduler_spec, sampler, steps)
    kwargs = dict(guidance_scale=guidance_scale, null_class=null_class, seed=seed, progress=False, **options)
    if space is None:
        return sample_images(net, sampler, labels, image_shape, **kwargs)
    return space.sample(net, sampler, labels, **kwargs)


def sample_records(
    ckpt: Checkpoint,
    labels: torch.Tensor,
    settings: Mapping,
    space=None,
    mask_source: str | None = None,
    mask_labels: Mapping[str, int] | None = None,
) -> tuple[list[dict], dict]:
    """The manifest rows and the provenance (``info.json``) of samples of ``ckpt``, for :func:`save_samples`.

    Args:
        ckpt: the checkpoint the samples came from.
        labels: ``(N,)`` their labels; sample ``i`` was made from ``settings["seed"] + i``.
        settings: the sampling settings (the ``sample`` section: ``seed``, ``guidance_scale``, ``sampler``,
            ``steps``, ...), kept whole in ``info["sample"]``.
        space: the :class:`medaug.latent.LatentSpace` the samples were decoded from; None in pixel space.
        mask_source: with masks, where they came from: ``user`` (sample.masks=<folder or CSV>), ``real`` (a
            prepared split) or ``generated`` (the mask model); each row's ``mask_source``.
        mask_labels: with masks, ``{name: value}`` of their labels (``info["mask_labels"]``).

    Returns:
        ``(rows, info)``: one row per sample (index, label, class name, seed, sampler settings, checkpoint id)
        and what a later stage needs (classes, geometry, window, model, dataset, no file paths).
    """
    meta, names = ckpt.meta, ckpt.meta["class_names"]
    rows = [
        dict(
            index=i,
            label=int(y),
            class_name=names[int(y)],
            seed=settings["seed"] + i,
            guidance_scale=settings["guidance_scale"],
            sampler=settings["sampler"],
            steps=settings["steps"],
            checkpoint_id=ckpt.id,
        )
        for i, y in enumerate(labels)
    ]
    info = dict(
        checkpoint_id=ckpt.id,
        checkpoint_step=ckpt.step,
        mlflow_run_id=meta.get("mlflow_run_id"),
        class_names=names,
        spatial_dims=meta["spatial_dims"],
        image_shape=meta["image_shape"],
        window=meta["window"],
        affine=meta["affine"],
        dataset=meta.get("dataset"),
        model=ckpt.config["model"]["_target_"],
        sample=dict(settings),
        modality=meta.get("modality"),
        dp=meta.get("dp"),  # the differential-privacy guarantee (medaug.dp), None without
        latent=None if space is None else {k: v for k, v in space.meta().items() if k != "autoencoder_path"},
    )
    if space is not None:  # the data card names the model: say it is a latent diffusion model
        info["model"] += f" on the latents of AutoencoderKL {space.id} (scale factor {space.scale_factor:.4g})"
    if mask_source is not None:
        for row in rows:
            row["mask_source"] = mask_source
        info.update(mask_labels=dict(mask_labels or {}), mask_source=mask_source, condition=meta.get("condition"))
    return rows, info


def samples_id(samples_dir: str | Path) -> str:
    """The id of a complete samples folder (its images, manifest and provenance): what an evaluation
    records, so that an export can tell whether that evaluation is of these samples."""
    samples_dir = Path(samples_dir)
    return file_id(*(samples_dir / name for name in ("samples.pt", "manifest.csv", "info.json")))


def load_samples(samples_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[dict], dict]:
    """``(images, labels, manifest rows, info)`` of a complete samples folder."""
    samples_dir = Path(samples_dir)
    if not is_complete(samples_dir):
        raise FileNotFoundError(
            f"{samples_dir}: no complete samples folder (no DONE marker); run `medaug sample` first"
        )
    data = torch.load(samples_dir / "samples.pt", map_location="cpu")
    with open(samples_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return data["images"], data["labels"], rows, json.loads((samples_dir / "info.json").read_text())


def load_sample_masks(samples_dir: str | Path) -> torch.Tensor | None:
    """The label maps ``(N, 1, *spatial)`` int64 of a complete samples folder (the mask each image was
    conditioned on or generated with; names in ``info.json`` ``mask_labels``), None when it has none."""
    samples_dir = Path(samples_dir)
    if not is_complete(samples_dir):
        raise FileNotFoundError(
            f"{samples_dir}: no complete samples folder (no DONE marker); run `medaug sample` first"
        )
    data = torch.load(samples_dir / "samples.pt", map_location="cpu")
    masks, images = data.get("masks"), data["images"]
    if masks is None:
        return None
    if tuple(masks.shape) != (len(images), 1, *images.shape[2:]):
        raise ValueError(
            f"{samples_dir / 'samples.pt'}: masks have shape {tuple(masks.shape)} but the images "
            f"{tuple(images.shape)}; one (1, *spatial) label map per image is expected: sample again"
        )
    return masks.long()
