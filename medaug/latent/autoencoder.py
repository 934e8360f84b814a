"""Latent diffusion: an AutoencoderKL, its latent scale factor, cached latents, tiled encoding and decoding.

Pixel-space 3D diffusion stops near 64³ on one card; a latent diffusion model (LDM) trains the
same class-conditional ``DiffusionModelUNet`` on the latents of an autoencoder instead:

1. ``train_autoencoder``: a MONAI ``AutoencoderKL`` learns ``x ≈ D(E(x))`` with an L1
   reconstruction loss, a weighted KL term and (after ``adv_start`` steps) an optional patch
   adversarial loss (MONAI ``PatchDiscriminator``, least squares). Its EMA weights are the ones
   used. At the end the **scale factor** ``1 / std`` of the posterior means over the training
   split is stored in the checkpoint, and those means are **cached** to disk, keyed by the
   autoencoder id and the dataset fingerprint (the mean, not a sample: no noise is baked in).
   For volumes too large to train on whole, ``patch_size`` trains on random crops and
   ``encode_tile`` encodes in overlapping tiles; the tile is stored in the checkpoint, so every
   later encoding (a rebuilt cache, ``LatentSpace.encode``) tiles alike.
2. ``train`` with ``latent.autoencoder_ckpt`` set trains the UNet on ``scale_factor * mean``
   (unit variance, like the noise) read from the cache; the checkpoint's meta records the
   autoencoder (path, id, scale factor, latent shape) so ``sample`` needs nothing else.
3. ``sample`` runs the usual seeded, guided loop in latent space and decodes
   ``D(z / scale_factor)``, whole or in overlapping latent tiles (MONAI sliding window).

Images are ``(N, 1, *spatial)`` in [-1, 1]; latents ``(N, C_lat, *spatial / f)`` where
``f = 2 ** (len(channels) - 1)`` is the compression per axis.

Example::

    result = train_autoencoder(cfg["autoencoder"], "prepared", "ae/last.pt", "latents", device="cpu")
    space = load_latent_space("ae/last.pt")
    z = space.encode(images)                      # (N, C_lat, *spatial / f), std ≈ 1
    x = space.decode(z, tile=[8, 8, 8])           # (N, 1, *spatial) in [-1, 1]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import load_info, load_split
from ..model import EMA, file_id, load_checkpoint, network_from_spec, restore_training_state, save_checkpoint
from ..pictures import save_grid
from ..runtime import barrier, rank_and_world
from ..tracking import NullTracker, Tracker, flatten, guarded, tracked
from ..training import StepDraw, StepLoss, TrainSettings, fit, to_device
from .space import (
    ENCODE_OVERLAP,
    LatentSpace,
    cache_file,
    check_shape,
    check_tile,
    compression,
    encode_shared,
    load_latent_space,
    reconstruction_metrics,
    scale_factor_of,
    write_latent_cache,
)

log = logging.getLogger("medaug")

# --------------------------------------------------------------------------- losses


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) ‖ N(0, 1)) summed over the latent ``(N, C, *spatial)``: per sample ``[N]``."""
    var = z_sigma.float().pow(2)
    kl = 0.5 * (z_mu.float().pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1)
    return kl.flatten(1).sum(1)


class AutoencoderLosses(NamedTuple):
    """One training step's terms (scalars); ``adv`` is 0 before the warm-up ends."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    adv: torch.Tensor
    reconstruction: torch.Tensor  # (N, 1, *spatial), the decoded posterior sample


class PosteriorSample(nn.Module):
    """``AutoencoderKL.forward`` with the posterior noise passed in: ``(D(mu + noise * sigma), mu, sigma)``.

    Training draws the noise itself (from the step's generator, for the whole global batch), so
    a run does not depend on the global RNG and N data-parallel ranks reproduce one process. The
    module is what DDP wraps; its parameters are the autoencoder's.
    """

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_mu, z_sigma = self.autoencoder.encode(x)
        return self.autoencoder.decode(z_mu + noise * z_sigma), z_mu, z_sigma


def autoencoder_loss(
    model: nn.Module,
    x: torch.Tensor,
    noise: torch.Tensor,
    *,
    kl_weight: float,
    adv_weight: float = 0.0,
    discriminator: nn.Module | None = None,
) -> AutoencoderLosses:
    """``L1(D(z), x) + kl_weight · KL + adv_weight · LSGAN(disc(D(z)) → real)`` for images ``x`` in [-1, 1],
    with ``z = mu + noise · sigma`` (``model`` a :class:`PosteriorSample`, ``noise`` the latent's shape).
    The adversarial term is left out when ``discriminator`` is None."""
    reconstruction, z_mu, z_sigma = model(x, noise)
    recon = F.l1_loss(reconstruction.float(), x.float())
    kl = kl_loss(z_mu, z_sigma).mean()
    adv = torch.zeros((), device=x.device)
    if discriminator is not None:
        logits = discriminator(reconstruction.contiguous().float())[-1]
        adv = PatchAdversarialLoss(criterion="least_squares")(logits, target_is_real=True, for_discriminator=False)
    return AutoencoderLosses(recon + kl_weight * kl + adv_weight * adv, recon, kl, adv, reconstruction)


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Least-squares patch GAN loss of the discriminator: real patches → 1, reconstructions → 0."""
    criterion = PatchAdversarialLoss(criterion="least_squares")
    fake_term = criterion(
        discriminator(fake.detach().contiguous().float())[-1], target_is_real=False, for_discriminator=True
    )
    real_term = criterion(discriminator(real.contiguous().float())[-1], target_is_real=True, for_discriminator=True)
    return 0.5 * (fake_term + real_term)


# --------------------------------------------------------------------------- training


@dataclass
class AutoencoderSettings:
    """The ``autoencoder`` config section's training numbers (see conf/autoencoder/kl_tiny.yaml)."""

    max_steps: int = 1000
    batch_size: int = 8
    kl_weight: float = 1e-6
    adv_weight: float = 0.01
    adv_start: int = 0
    ema_decay: float = 0.999
    ckpt_every: int = 500
    log_every: int = 25
    val_every: int = 500
    seed: int = 0
    patch_size: list[int] | None = None  # train on random crops of this size (image voxels); None: whole images
    encode_tile: list[int] | None = None  # validate (and encode) in overlapping tiles of this size; None: whole
    amp_dtype: torch.dtype | None = None  # autocast dtype of the networks (bf16 on a GPU); None: fp32
    rank: int = 0  # data-parallel training: each of world_size ranks trains on its slice of the
    world_size: int = 1  # global batch of batch_size * world_size (see medaug.training.TrainSettings)

    @classmethod
    def from_section(cls, section: Mapping) -> "AutoencoderSettings":
        return cls(**{k: section[k] for k in cls.__dataclass_fields__ if k in section})

    def train_settings(self) -> TrainSettings:
        """The loop's numbers for :func:`medaug.training.fit` (no gradient clipping, EMA at every step)."""
        return TrainSettings(
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            grad_clip=None,
            seed=self.seed,
            ckpt_every=self.ckpt_every,
            log_every=self.log_every,
            ema_every=1,
            val_every=self.val_every,
            rank=self.rank,
            world_size=self.world_size,
        )


class Optimizers:
    """The autoencoder's optimizer, and the discriminator with its optimizer when adversarial
    training is on, saved together as a checkpoint's ``optimizer`` entry."""

    def __init__(
        self,
        autoencoder: torch.optim.Optimizer,
        discriminator: nn.Module | None = None,
        disc_optimizer: torch.optim.Optimizer | None = None,
    ):
        self.autoencoder, self.discriminator, self.disc_optimizer = autoencoder, discriminator, disc_optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        """What :func:`medaug.training.fit` steps is the autoencoder's optimizer (the discriminator's is
        :class:`AutoencoderStep`'s)."""
        self.autoencoder.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.autoencoder.step()

    def state_dict(self) -> dict:
        disc = self.discriminator is not None
        return {
            "autoencoder": self.autoencoder.state_dict(),
            "discriminator": self.discriminator.state_dict() if disc else None,
            "disc_optimizer": self.disc_optimizer.state_dict() if disc else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.autoencoder.load_state_dict(state["autoencoder"])
        if self.discriminator is not None and state.get("discriminator") is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])


def crop(images: torch.Tensor, corners: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crops ``(N, C, *size)`` of images ``(N, C, *spatial)``, image i from its corner ``corners[i]``."""
    return torch.stack(
        [
            x[(slice(None), *(slice(a, a + p) for a, p in zip(corner.tolist(), size)))]
            for x, corner in zip(images, corners)
        ]
    )


class AutoencoderStep:
    """The autoencoder's loss (:func:`autoencoder_loss`) as a :class:`medaug.training.TrainStep`: train
    with ``fit(ae, ema, optimizers, AutoencoderStep(ae, images, settings, optimizers), settings.train_settings())``.

    ``images`` (N, 1, *spatial) in [-1, 1] stay where they are (host memory); the batch of a step and its
    posterior noise come from the step's generator there, so a resumed run continues an uninterrupted one.
    With ``settings.patch_size`` every image of the batch is a random crop of that size (its corner drawn
    from the same generator). The adversarial term (``optimizers.discriminator``) switches on at
    ``adv_start``; the discriminator is this step's second player: :func:`medaug.training.fit` steps the
    autoencoder's optimizer, then :attr:`StepLoss.after` updates the discriminator with its own optimizer
    (both saved in the checkpoint through ``optimizers``).

    With ``settings.world_size > 1`` (a process group running, e.g. under torchrun) the autoencoder and
    the discriminator run under DDP: every rank draws the same global batch and noise and trains on its
    slice, so N ranks reproduce one process with an N-times larger batch.
    """

    name = "autoencoder"
    lr_key = "autoencoder.optimizer.lr"

    def __init__(self, ae: nn.Module, images: torch.Tensor, settings: AutoencoderSettings, optimizers: Optimizers):
        self.images, self.settings, self.optimizers = images, settings, optimizers
        device = next(ae.parameters()).device
        self.patch = check_tile(settings.patch_size, images.shape[2:], 1, "autoencoder.patch_size")
        with torch.no_grad():  # the posterior's shape, for drawing the global batch's noise
            probe = (
                images[:1]
                if self.patch is None
                else crop(images[:1], torch.zeros(1, len(self.patch), dtype=torch.long), self.patch)
            )
            self.latent_shape = ae.encode(probe.to(device))[0].shape[1:]
        self.disc = optimizers.discriminator
        self.model, self.critic = PosteriorSample(ae), self.disc
        if settings.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
            if self.disc is not None:  # batch-norm statistics over the global batch (SyncBatchNorm is CUDA-only)
                if device.type == "cuda":
                    self.disc = nn.SyncBatchNorm.convert_sync_batchnorm(self.disc)
                self.critic = DistributedDataParallel(self.disc, device_ids=ids)
        self.autocast = torch.autocast(
            device.type, dtype=settings.amp_dtype or torch.float32, enabled=settings.amp_dtype is not None
        )
        self.device = device

    def __call__(self, draw: StepDraw) -> StepLoss:
        s, gen = self.settings, draw.data_generator
        x = self.images[draw.rows]
        if self.patch is not None:
            corners = torch.stack(
                [
                    torch.randint(0, size - p + 1, (draw.global_batch,), generator=gen)
                    for p, size in zip(self.patch, self.images.shape[2:])
                ],
                1,
            )
            x = crop(x, corners[draw.mine], self.patch)
        noise = torch.randn((draw.global_batch, *self.latent_shape), generator=gen)[draw.mine]
        x, noise = to_device([x, noise], self.device)
        adv_on = self.disc is not None and draw.step >= s.adv_start
        if adv_on:  # the generator's adversarial term: gradients reach the reconstruction, not the critic
            self.disc.requires_grad_(False)
        with self.autocast:
            terms = autoencoder_loss(
                self.model,
                x,
                noise,
                kl_weight=s.kl_weight,
                adv_weight=s.adv_weight,
                discriminator=self.disc if adv_on else None,
            )
        logged = {
            "autoencoder/loss": terms.total.detach(),
            "autoencoder/recon_l1": terms.recon.detach(),
            "autoencoder/kl": terms.kl.detach(),
        }
        return StepLoss(terms.total, logged, (lambda: self.discriminator_step(x, terms)) if adv_on else None)

    def discriminator_step(self, real: torch.Tensor, terms: AutoencoderLosses) -> dict[str, torch.Tensor]:
        """The discriminator's update on this step's images and their reconstructions (after the autoencoder's)."""
        self.disc.requires_grad_(True)
        self.optimizers.disc_optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            d_loss = discriminator_loss(self.critic, real, terms.reconstruction)
        d_loss.backward()
        self.optimizers.disc_optimizer.step()
        return {"autoencoder/adv": terms.adv.detach(), "autoencoder/disc": d_loss.detach()}


class AutoencoderResult(NamedTuple):
    path: Path
    id: str
    step: int
    scale_factor: float | None
    metrics: dict


def train_autoencoder(
    section: Mapping | None,
    prepared_dir: str | Path,
    ckpt_path: str | Path,
    cache_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    tracker: Tracker | None = None,
    run_name: str = "autoencoder",
    trust: bool = False,
) -> AutoencoderResult:
    """The autoencoder recipe of ``train_autoencoder`` (and of ``train`` with ``latent.train_if_missing``).

    ``section`` is the ``autoencoder`` config section (read, not changed): ``network`` (an
    AutoencoderKL spec), ``discriminator`` (a PatchDiscriminator spec or None), the optimizers and
    the numbers of :class:`AutoencoderSettings`. Resumes ``ckpt_path`` when it exists (``trust``: see
    :func:`medaug.model.load_checkpoint`); a finished run is left as it is. At the end: validation
    metrics, a reconstruction grid, the scale factor (stored in the checkpoint) and the cached training latents.

    Under a running process group (torchrun) every rank calls this: training is data-parallel
    (see :class:`AutoencoderStep`), the ranks share the final encoding, and only rank 0 logs and
    writes; every rank returns once the checkpoint is complete.
    """
    if not section:
        raise ValueError(
            "no autoencoder chosen; pass autoencoder=kl_small (conf/autoencoder/) or an experiment "
            "that sets one, e.g. experiment=ldm_3d_demo"
        )
    rank, world = rank_and_world()
    tracker = guarded(tracker if tracker is not None and rank == 0 else NullTracker())
    ckpt_path, device = Path(ckpt_path), torch.device(device)
    info = load_info(prepared_dir)
    spec = dict(section["network"])
    if spec.get("spatial_dims") != info.spatial_dims:
        raise ValueError(
            f"autoencoder.network.spatial_dims={spec.get('spatial_dims')} but {info.root} is "
            f"{info.spatial_dims}D; set it to ${{data.spatial_dims}}"
        )
    latent_shape = check_shape(info.image_shape, spec)
    settings = AutoencoderSettings.from_section(section)
    settings.amp_dtype, settings.rank, settings.world_size = amp_dtype, rank, world
    factor = compression(spec)
    settings.patch_size = check_tile(settings.patch_size, info.image_shape, factor, "autoencoder.patch_size")
    settings.encode_tile = check_tile(
        settings.encode_tile, info.image_shape, factor, "autoencoder.encode_tile", ENCODE_OVERLAP
    )

    ae = network_from_spec(spec).to(device)
    ema = EMA(ae, settings.ema_decay)
    disc = network_from_spec(section["discriminator"]).to(device) if section.get("discriminator") else None
    if disc is not None:  # a discriminator too deep for the training images fails here, not after the warm-up
        shape = settings.patch_size or list(info.image_shape)
        try:
            with torch.no_grad():
                disc(torch.zeros(2, 1, *shape, device=device))
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"autoencoder.discriminator (num_layers_d={section['discriminator'].get('num_layers_d')}) "
                f"cannot judge {shape} training images ({err}); lower num_layers_d or raise "
                "autoencoder.patch_size"
            ) from None
    optimizers = Optimizers(
        network_from_spec(section["optimizer"], params=ae.parameters()),
        disc,
        network_from_spec(section["disc_optimizer"], params=disc.parameters()) if disc else None,
    )
    start_step, run_id, meta = 0, None, {}
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, trust)
        if ckpt.meta.get("kind") != "autoencoder":
            raise ValueError(f"{ckpt_path}: not an autoencoder checkpoint; point latent.autoencoder_ckpt elsewhere")
        if ckpt.step >= settings.max_steps and "scale_factor" in ckpt.meta:
            log.info(
                "autoencoder %s is trained (step %d); raise autoencoder.max_steps to continue", ckpt_path, ckpt.step
            )
            return AutoencoderResult(ckpt_path, ckpt.id, ckpt.step, ckpt.meta["scale_factor"], ckpt.meta.get("val", {}))
        restore_training_state(ckpt, ae, ema, optimizers)
        start_step, run_id = ckpt.step, ckpt.meta.get("mlflow_run_id")
        log.info("resuming the autoencoder from %s at step %d", ckpt_path, start_step)

    train_x, train_y = load_split(info.root, "train")
    val_x, _ = load_split(info.root, "val")
    with tracked(tracker, run_name=run_name, run_id=run_id, tags={"medaug.job": run_name}):
        if start_step == 0:
            tracker.log_params(flatten({"autoencoder": section}))
        meta.update(
            kind="autoencoder",
            spatial_dims=info.spatial_dims,
            image_shape=list(info.image_shape),
            latent_channels=int(spec["latent_channels"]),
            latent_shape=latent_shape,
            dataset=info.fingerprint,
            encode_tile=settings.encode_tile,
            mlflow_run_id=tracker.run_id,
        )
        payload = lambda: {"config": {"model": spec, "autoencoder": dict(section)}, "meta": meta}  # noqa: E731
        validate = (
            (lambda: reconstruction_metrics(ema.model, val_x, settings.batch_size, settings.encode_tile)[0])
            if len(val_x)
            else None
        )
        result = fit(
            ae,
            ema,
            optimizers,
            AutoencoderStep(ae, train_x, settings, optimizers),
            settings.train_settings(),
            start_step=start_step,
            ckpt_path=ckpt_path,
            checkpoint_payload=payload,
            tracker=tracker,
            validate=validate,
        )

        net = ema.model.eval()
        metrics = {}
        if len(val_x) and rank == 0:
            metrics, recon = reconstruction_metrics(net, val_x, settings.batch_size, settings.encode_tile)
            k = min(4, len(val_x))
            grid = save_grid(
                torch.cat([val_x[:k], recon[:k]]),
                torch.tensor([0] * k + [1] * k),
                ["real", "reconstruction"],
                ckpt_path.parent / "reconstructions.png",
                per_class=k,
            )
            tracker.log_metrics(metrics, step=result.step)
            tracker.log_artifact(grid, "autoencoder")
        latents = encode_shared(net, train_x, settings.batch_size, progress=True, tile=settings.encode_tile)
        meta.update(scale_factor=scale_factor_of(latents), val=metrics)
        ae_id = None
        if rank == 0:
            ae_id = file_id(
                save_checkpoint(ckpt_path, model=ae, ema=ema, optimizer=optimizers, step=result.step, **payload())
            )
            write_latent_cache(cache_file(cache_dir, ae_id, info.fingerprint, "train"), latents, train_y)
        barrier()  # the finished checkpoint and its cache are on disk for every rank
        ae_id = ae_id or file_id(ckpt_path)
        tracker.log_metrics({"autoencoder/scale_factor": meta["scale_factor"]}, step=result.step)
    log.info(
        "autoencoder trained to step %d (%s), scale factor %.4f; checkpoint %s",
        result.step,
        ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items()),
        meta["scale_factor"],
        ckpt_path,
    )
    return AutoencoderResult(ckpt_path, ae_id, result.step, meta["scale_factor"], metrics)


def latent_space_for_training(
    latent: Mapping | None,
    prepared_dir: str | Path,
    device: torch.device,
    *,
    clip_sample: bool,
    autoencoder: Mapping | None = None,
    make_tracker: Callable[[], Tracker] = NullTracker,
    run_name: str = "job-autoencoder",
    trust: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> LatentSpace | None:
    """``train``'s latent step: None in pixel space (``latent.autoencoder_ckpt`` null); otherwise the
    autoencoder's latent space, trained first (from the ``autoencoder`` section, tracked by
    ``make_tracker()`` as ``run_name``) when missing and ``latent.train_if_missing``. The UNet then
    needs ``space.latent_channels`` in and out. ``clip_sample`` is the scheduler's (refused: it clips latents)."""
    latent = latent or {}
    if not latent.get("autoencoder_ckpt"):
        return None
    ae_path = Path(latent["autoencoder_ckpt"])
    if clip_sample:
        raise ValueError(
            "scheduler.clip_sample=true clips latents to [-1, 1]; set scheduler.clip_sample=false for latent diffusion"
        )
    if not ae_path.exists() and latent.get("train_if_missing"):
        log.info("no autoencoder at %s: training it first (latent.train_if_missing=true)", ae_path)
        train_autoencoder(
            autoencoder,
            prepared_dir,
            ae_path,
            latent["cache_dir"],
            device=device,
            amp_dtype=amp_dtype,
            tracker=make_tracker(),
            run_name=run_name,
            trust=trust,
        )
    return load_latent_space(ae_path, device, trust=trust)
