"""The train stage assembled: its data (pixels or autoencoder latents), the UNet it needs, and the tracked fit
(resume, differential privacy, speed settings, data parallelism, checkpoint, registry).

``pipelines/train.py`` builds the objects (network, optimizer, scheduler) from the config and hands them here
with plain values; :mod:`medaug.training` holds the loss and the one fit loop these functions drive.

Example::

    data = training_data("prepared", torch.device("cpu"), model=model_section, scheduler=scheduler_section)
    net = training_network(data)                   # in/out channels, class embeddings, checked shape
    result = train_diffusion(net, optimizer, scheduler, data, training_section, ckpt_path=Path("last.pt"), ...)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .conditioning import Conditioning, conditioned_training_data
from .controlnet import controlnet_spec, init_from_base, load_base
from .data import PreparedInfo, load_info, load_split
from .dp import private_training, train_patients
from .flow import is_flow
from .latent import LatentSpace, cached_latents, latent_space_for_training
from .model import EMA, Checkpoint, check_unet_input, network_from_spec, save_checkpoint
from .privacy import PrivacyFlags
from .probe import chained, probe_callback
from .registry import dataset_entity, preview_callback
from .runtime import switch
from .tracking import NullTracker, Tracker, guarded, tracked
from .training import (
    DiffusionStep,
    FitResult,
    TrainSettings,
    checkpoint_meta,
    compile_mode_of,
    fit,
    prepare_for_speed,
    resume_training,
)

__all__ = ["TrainingData", "training_data", "training_network", "train_diffusion"]

log = logging.getLogger("medaug")

ON_DEVICE_LIMIT = 2 * 2**30  # bytes: a training set up to this size is moved to the GPU once, not batch by batch


class TrainingData(NamedTuple):
    """What the UNet learns from: ``images`` ``(N, C, *spatial)``, pixels in [-1, 1], autoencoder latents times
    the space's scale factor, or a mask model's one-hot label maps in [-1, 1]; ``labels`` ``(N,)``; ``masks``
    ``(N, 1, *spatial)`` label maps a mask-conditioned model is given (None otherwise); the model's
    ``conditioning``; ``spec``, the model section completed for this data; the prepared dataset's ``info``, the
    latent ``space`` (None: pixel space) and, for ``model.condition=controlnet``, the ``base`` class-conditional
    checkpoint the ControlNet is added to (:mod:`medaug.controlnet`)."""

    info: PreparedInfo
    images: torch.Tensor
    labels: torch.Tensor
    space: LatentSpace | None
    masks: torch.Tensor | None
    conditioning: Conditioning
    spec: dict
    base: Checkpoint | None = None


def training_data(
    prepared_dir: str | Path,
    device: torch.device,
    *,
    model: Mapping,
    scheduler: Mapping,
    latent: Mapping | None = None,
    autoencoder: Mapping | None = None,
    on_device: bool | str = "auto",
    make_tracker: Callable[[], Tracker] = NullTracker,
    run_name: str = "job-autoencoder",
    trust: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> TrainingData:
    """The training split of a prepared dataset for the UNet of the ``model`` section, in pixel space or, with
    ``latent.autoencoder_ckpt``, as cached latents of that autoencoder (trained first when
    ``latent.train_if_missing``; see :func:`medaug.latent.latent_space_for_training`), with the label maps when
    the model is conditioned on masks, or the label maps as images when it generates masks
    (:func:`medaug.conditioning.conditioned_training_data`). ``scheduler`` is the training scheduler's section
    (a latent model refuses one that clips samples). The completed model section (``TrainingData.spec``) has
    the channels in and out, one class embedding per class plus the null class of classifier-free guidance and
    the data's spatial dims; a spatial shape the UNet cannot take is refused (ValueError naming the fix). On
    CUDA the set moves to the GPU once when it is under 2 GiB and ``on_device`` (``training.data_on_device``) is
    not false.

    ``model.condition=controlnet``: the spec is the base checkpoint's UNet under a ControlNet
    (``model.controlnet``: ``base_ckpt``, ``embedding_channels``, ``conditioning_scale``), the base refused in
    one line when it is missing, not class-conditional or not of this data, space and scheduler
    (:func:`medaug.controlnet.load_base`)."""
    info = load_info(prepared_dir)
    images, labels = load_split(info.root, "train")
    space = latent_space_for_training(
        latent,
        info.root,
        device,
        clip_sample=scheduler.get("clip_sample", not is_flow(scheduler)),  # a flow clips nothing
        autoencoder=autoencoder,
        make_tracker=make_tracker,
        run_name=run_name,
        trust=trust,
        amp_dtype=amp_dtype,
    )
    spec = dict(model)
    if space is not None:  # latent diffusion: the UNet learns scaled autoencoder latents
        latents, labels = cached_latents(space, info.root, latent["cache_dir"])
        images = latents * space.scale_factor
        spec.update(in_channels=space.latent_channels, out_channels=space.latent_channels)
    spec.update(num_class_embeds=info.num_classes + 1, spatial_dims=info.spatial_dims)
    condition, images, masks = conditioned_training_data(spec, info, images, latent=space is not None)
    base = None
    if condition.controlnet:
        settings = dict(model.get("controlnet") or {})
        base = load_base(settings.get("base_ckpt"), info, space=space, scheduler=scheduler, trust=trust)
        spec = controlnet_spec(
            base,
            mask_channels=condition.mask_channels,
            embedding_channels=settings.get("embedding_channels", 16),
            conditioning_scale=settings.get("conditioning_scale", 1.0),
        )
    if device.type == "cuda" and switch(on_device, True) and images.nbytes < ON_DEVICE_LIMIT:
        images, labels = images.to(device), labels.to(device)
    check_unet_input(spec.get("unet", spec), images.shape[2:], "latent" if space is not None else "image")
    return TrainingData(info, images, labels, space, masks, condition, spec, base)


def training_network(data: TrainingData) -> nn.Module:
    """The network ``data.spec`` describes, freshly initialised; for a ControlNet run the base model's UNet
    (frozen, its EMA weights) with a ControlNet initialised from it (:func:`medaug.controlnet.init_from_base`).
    Optimise only its parameters that require gradients."""
    net = network_from_spec(data.spec)
    return net if data.base is None else init_from_base(net, data.base)


def train_diffusion(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    data: TrainingData,
    training: Mapping,
    *,
    scheduler_spec: Mapping,
    stored_config: dict,
    ckpt_path: Path,
    resume_from: Path,
    tracker: Tracker,
    params: Mapping,
    run_name: str,
    source: str,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    amp_dtype: torch.dtype | None = None,
    compile_cache: str | None = None,
    register: str | None = None,
    probe_flags: PrivacyFlags | None = None,
    probe_sampling: Mapping | None = None,
    probe_heldout: Sequence[str] = ("val",),
    trust: bool = False,
) -> FitResult:
    """Train ``net`` on ``data`` with the diffusion loss of ``scheduler`` (built from the section
    ``scheduler_spec``) to ``training["max_steps"]`` and write the checkpoint ``ckpt_path`` (weights, EMA,
    optimizer, RNG states, the dataset's meta and ``stored_config``, the job's resolved config, which is stored
    as text and never read here).

    Resumes from ``resume_from`` when it exists (refused when it was trained on other data), trains with
    differential privacy when ``training["dp"]["enabled"]``, compiles / uses channels-last / activation
    checkpointing as ``training`` says, wraps the model in DDP when ``world_size > 1``. ``tracker`` receives
    ``params`` (on a fresh run), the dataset input (``source``: where the data came from), the loss curve, the
    previews (``training["preview_every"]``) and the checkpoint, and registers the model as ``register``.
    ``training["privacy_probe_every"]`` keeps a checkpoint with a memorisation probe (judged by ``probe_flags``)
    every that many steps (:mod:`medaug.probe`), drawing its samples as ``probe_sampling`` (the ``sample``
    section) says and judging them against the ``probe_heldout`` splits (``evaluate.real_split``).

    Returns the fit loop's result (last step, loss curve)."""
    t, info, space = training, data.info, data.space
    if data.base is not None and data.base.path.resolve() in (Path(ckpt_path).resolve(), Path(resume_from).resolve()):
        raise ValueError(
            f"model.controlnet.base_ckpt={data.base.path} is this run's own checkpoint, which the ControlNet run "
            "would overwrite; train the ControlNet in another job (name=...) or paths.train_dir"
        )
    if data.base is not None and (t.get("dp") or {}).get("enabled"):  # Opacus's hooks vs the ControlNet's `h +=`
        raise ValueError(
            "training.dp.enabled=true does not work with model.condition=controlnet (MONAI's ControlNet adds in "
            "place to an output Opacus hooks); train the ControlNet with training.dp.enabled=false"
        )
    cuda = device.type == "cuda"
    ema = EMA(net, t["ema_decay"])
    start_step, resumed = resume_training(
        resume_from,
        net,
        ema,
        optimizer,
        image_shape=info.image_shape,
        class_names=info.class_names,
        dataset=info.fingerprint,
        autoencoder_id=space.id if space is not None else None,
        prepared=info.root,
        trust=trust,
        conditioning=data.conditioning,
    )
    dp = private_training(
        net,
        t.get("dp"),
        train_patients(info.root),
        expected_batch=t["batch_size"],
        max_steps=t["max_steps"],
        start_step=start_step,
        world_size=world_size,
        latent=space is not None,
        activation_checkpointing=t["activation_checkpointing"],
        prior=resumed.get("dp"),
    )
    channels_last = switch(t["channels_last"], cuda) and info.spatial_dims == 2
    model = prepare_for_speed(
        net,
        channels_last=channels_last,
        compile_mode=compile_mode_of(t["compile"], cuda, private=dp is not None),
        compile_cache=compile_cache,
        activation_checkpointing=t["activation_checkpointing"],
    )
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    settings = TrainSettings(
        **{k: t[k] for k in ("max_steps", "batch_size", "grad_clip", "seed", "ckpt_every", "log_every", "ema_every")},
        rank=rank,
        world_size=world_size,
    )
    step = DiffusionStep(
        model,
        scheduler,
        data.images,
        data.labels,
        null_class=info.num_classes,
        p_uncond=t["p_uncond"],
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        masks=data.masks,
        conditioning=data.conditioning,
    )
    run_id = resumed.get("mlflow_run_id")
    # from here on a tracking error is a warning: the training and its checkpoint go on
    with tracked(guarded(tracker), run_name=run_name, run_id=run_id, tags={"medaug.job": run_name}) as tracker:
        if start_step == 0:
            tracker.log_params(dict(params))
            tracker.log_params({f"data.count.{s}": sum(c.values()) for s, c in info.counts.items()})
        meta = checkpoint_meta(info, tracker.run_id, space, data.conditioning)
        tracker.log_dataset(dataset_entity(info, source), "training")
        preview = preview_callback(tracker, ema, scheduler_spec, meta, t.get("preview_every"), space=space)
        payload = lambda: {"config": stored_config, "meta": {**meta, **(dp.meta() if dp else {})}}
        probe = probe_callback(  # training.privacy_probe_every: memorisation-aware checkpoints
            t.get("privacy_probe_every"),
            tracker=tracker,
            ema=ema,
            meta=meta,
            ckpt_dir=ckpt_path.parent,
            save=lambda p, s: save_checkpoint(p, model=model, ema=ema, optimizer=optimizer, step=s, **payload()),
            prepared_dir=info.root,
            scheduler_spec=scheduler_spec,
            space=space,
            flags=probe_flags,
            sampling=probe_sampling,
            heldout=probe_heldout,
            per_class=t.get("privacy_probe_per_class"),
        )
        result = fit(
            model,
            ema,
            optimizer,
            step,
            settings,
            start_step=start_step,
            ckpt_path=ckpt_path,
            checkpoint_payload=payload,
            tracker=tracker,
            privacy=dp,
            on_step=chained(preview, probe),
        )
        if rank == 0:
            tracker.log_artifact(ckpt_path, "checkpoints")
            if register:
                tracker.register_model(register, ckpt_path)
    return result
