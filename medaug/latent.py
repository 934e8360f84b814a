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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.losses import PatchAdversarialLoss
from monai.metrics import PSNRMetric, SSIMMetric
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .dataset import load_info, load_split
from .atomic import atomic_file
from .model import (EMA, ema_network, file_id, load_checkpoint, network_from_spec, restore_training_state,
                    save_checkpoint)
from .progress import progress_bar
from .sampling import sample_images, save_grid
from .runtime import barrier, rank_and_world
from .tracking import NullTracker, Tracker, flatten, guarded, tracked
from .training import StepDraw, StepLoss, TrainSettings, fit, to_device

log = logging.getLogger("medaug")
ENCODE_OVERLAP = 0.25  # share of a tile that overlaps its neighbour when images are encoded in tiles

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


def autoencoder_loss(model: nn.Module, x: torch.Tensor, noise: torch.Tensor, *, kl_weight: float,
                     adv_weight: float = 0.0, discriminator: nn.Module | None = None) -> AutoencoderLosses:
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
    fake_term = criterion(discriminator(fake.detach().contiguous().float())[-1], target_is_real=False,
                          for_discriminator=True)
    real_term = criterion(discriminator(real.contiguous().float())[-1], target_is_real=True, for_discriminator=True)
    return 0.5 * (fake_term + real_term)


# --------------------------------------------------------------------------- encode / decode


def compression(spec: Mapping) -> int:
    """Downsampling factor per axis of an AutoencoderKL spec: ``2 ** (len(channels) - 1)``."""
    return 2 ** (len(spec["channels"]) - 1)


def check_shape(image_shape: Sequence[int], spec: Mapping) -> list[int]:
    """The latent shape of ``image_shape``; every axis must divide by the compression."""
    f = compression(spec)
    if any(s % f for s in image_shape):
        raise ValueError(f"image shape {list(image_shape)} does not divide by the autoencoder's compression {f} "
                         f"(channels {list(spec['channels'])}); set data.image_size to multiples of {f}")
    return [s // f for s in image_shape]


def check_tile(tile: Sequence[int] | None, image_shape: Sequence[int], factor: int, key: str,
               overlap: float | None = None) -> list[int] | None:
    """``tile`` (image voxels per axis: a training patch or an encoding tile) as ints, checked
    against the image shape and the compression ``factor``; None stays None.

    With ``overlap`` (tiles encoded by a sliding window) the window's step, ``int(tile × (1 - overlap))``
    image voxels, must be a multiple of ``factor`` too: a tile starting off the latent grid would
    put its latents a fraction of a voxel off."""
    if tile is None:
        return None
    tile = [int(t) for t in tile]
    if len(tile) != len(image_shape) or any(t < factor or t % factor or t > s for t, s in zip(tile, image_shape)):
        raise ValueError(f"{key}={tile}: give one size per axis of the images {list(image_shape)}, each a multiple of "
                         f"the compression {factor} and no larger than the image")
    steps = [int(t * (1 - overlap)) for t in tile] if overlap is not None else []
    if any(t < s and step % factor for t, s, step in zip(tile, image_shape, steps)):
        raise ValueError(f"{key}={tile}: overlapping by {overlap:.0%}, the tiles step by {steps} voxels, off the "
                         f"latent grid of the compression {factor}; give sizes that are multiples of {4 * factor}")
    return tile


def latent_tile(tile: Sequence[int] | None, image_shape: Sequence[int], latent_shape: Sequence[int]
                ) -> list[int] | None:
    """The latent tile of an image tile (image voxels / compression); None stays None."""
    return None if tile is None else [t * z // s for t, z, s in zip(tile, latent_shape, image_shape)]


def _tiler(tile: Sequence[int] | None, ndim: int, key: str, overlap: float, batch_size: int
           ) -> SlidingWindowInferer | None:
    """Overlapping tiles blended with Gaussian weights (MONAI sliding window); None without ``tile``."""
    if tile is None:
        return None
    tile = [int(t) for t in tile]
    if len(tile) != ndim or min(tile) < 1:
        raise ValueError(f"{key}={tile}: give one positive size per axis ({ndim} axes)")
    return SlidingWindowInferer(roi_size=tile, sw_batch_size=batch_size, overlap=overlap, mode="gaussian")


@torch.no_grad()
def encode_mean(ae: nn.Module, images: torch.Tensor, batch_size: int = 8, progress: bool = False, *,
                tile: Sequence[int] | None = None, overlap: float = ENCODE_OVERLAP) -> torch.Tensor:
    """Posterior means ``(N, C_lat, *spatial / f)`` (float32, CPU) of images ``(N, 1, *spatial)`` in [-1, 1].

    ``tile`` (image voxels per axis, multiples of f) encodes overlapping tiles one at a time and
    blends their means, for volumes too large to encode whole (and for an autoencoder trained on
    patches of that size, see ``autoencoder.patch_size``); None encodes whole volumes.
    """
    device = next(ae.parameters()).device
    inferer = _tiler(tile, images.ndim - 2, "autoencoder.encode_tile", overlap, batch_size)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return ae.encode(x)[0]

    out = [(inferer(x, mean) if inferer is not None else mean(x)).float().cpu()
           for x in (images[i : i + batch_size].to(device) for i in
                     progress_bar(range(0, len(images), batch_size), desc="encode", unit="batch",
                                  disable=not progress))]
    return torch.cat(out)


def encode_shared(ae: nn.Module, images: torch.Tensor, batch_size: int = 8, progress: bool = False, *,
                  tile: Sequence[int] | None = None) -> torch.Tensor:
    """:func:`encode_mean` shared out over the ranks of a running process group: each rank encodes a
    contiguous share and every rank gets all the means, in order. Without a process group, encode_mean."""
    rank, world = rank_and_world()
    if world == 1:
        return encode_mean(ae, images, batch_size, progress, tile=tile)
    share = -(-len(images) // world)
    mine = images[rank * share : (rank + 1) * share]
    part = encode_mean(ae, mine, batch_size, progress and rank == 0, tile=tile) if len(mine) else None
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, part)
    return torch.cat([p for p in parts if p is not None])


@torch.no_grad()
def decode_latents(ae: nn.Module, latents: torch.Tensor, *, tile: Sequence[int] | None = None,
                   overlap: float = 0.25, batch_size: int = 8) -> torch.Tensor:
    """Images ``(N, 1, *latent * f)`` (CPU, clamped to [-1, 1]) of unscaled latents ``(N, C_lat, *latent)``.

    ``tile`` (latent voxels per axis) decodes overlapping latent tiles one at a time and blends them
    with Gaussian weights (MONAI ``SlidingWindowInferer``), so a volume larger than memory allows
    still decodes; ``None`` decodes whole volumes.
    """
    device = next(ae.parameters()).device
    inferer = _tiler(tile, latents.ndim - 2, "sample.decode_tile", overlap, batch_size)
    out = []
    for i in progress_bar(range(0, len(latents), batch_size), desc="decode", unit="batch",
                          disable=len(latents) <= batch_size):
        z = latents[i : i + batch_size].to(device)
        x = inferer(z, ae.decode) if inferer is not None else ae.decode(z)
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def scale_factor_of(latents: torch.Tensor) -> float:
    """``1 / std`` of all latent values: scaled latents have unit variance, like the diffusion noise."""
    std = float(latents.float().std())
    if not math.isfinite(std) or std < 1e-8:
        raise ValueError(f"latents have std {std}: the autoencoder collapsed; train it longer or lower the KL weight")
    return 1.0 / std


@torch.no_grad()
def reconstruction_metrics(ae: nn.Module, images: torch.Tensor, batch_size: int = 8,
                           tile: Sequence[int] | None = None) -> tuple[dict, torch.Tensor]:
    """``({"autoencoder/val_l1", "autoencoder/val_psnr" (dB), "autoencoder/val_ssim"}, reconstructions)``
    of images ``(N, 1, *spatial)`` in [-1, 1], decoded from posterior means; PSNR/SSIM on [0, 1].
    ``tile`` (image voxels per axis) encodes in tiles of that size and decodes in the matching latent tiles."""
    z = encode_mean(ae, images, batch_size, tile=tile)
    recon = decode_latents(ae, z, tile=latent_tile(tile, images.shape[2:], z.shape[2:]), batch_size=batch_size)
    a, b = (recon + 1) / 2, (images + 1) / 2
    win = min(11, min(images.shape[2:]))
    win -= 1 - win % 2  # odd
    metrics = {
        "autoencoder/val_l1": float((recon - images).abs().mean()),
        "autoencoder/val_psnr": float(PSNRMetric(max_val=1.0)(a, b).mean()),
        "autoencoder/val_ssim": float(SSIMMetric(spatial_dims=images.ndim - 2, data_range=1.0, win_size=win)(a, b)
                                      .mean()),
    }
    return metrics, recon


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
    patch_size: list[int] | None = None   # train on random crops of this size (image voxels); None: whole images
    encode_tile: list[int] | None = None  # validate (and encode) in overlapping tiles of this size; None: whole
    amp_dtype: torch.dtype | None = None  # autocast dtype of the networks (bf16 on a GPU); None: fp32
    rank: int = 0        # data-parallel training: each of world_size ranks trains on its slice of the
    world_size: int = 1  # global batch of batch_size * world_size (see medaug.training.TrainSettings)

    @classmethod
    def from_section(cls, section: Mapping) -> "AutoencoderSettings":
        return cls(**{k: section[k] for k in cls.__dataclass_fields__ if k in section})

    def train_settings(self) -> TrainSettings:
        """The loop's numbers for :func:`medaug.training.fit` (no gradient clipping, EMA at every step)."""
        return TrainSettings(max_steps=self.max_steps, batch_size=self.batch_size, grad_clip=None, seed=self.seed,
                             ckpt_every=self.ckpt_every, log_every=self.log_every, ema_every=1,
                             val_every=self.val_every, rank=self.rank, world_size=self.world_size)


class Optimizers:
    """The autoencoder's optimizer, and the discriminator with its optimizer when adversarial
    training is on, saved together as a checkpoint's ``optimizer`` entry."""

    def __init__(self, autoencoder: torch.optim.Optimizer, discriminator: nn.Module | None = None,
                 disc_optimizer: torch.optim.Optimizer | None = None):
        self.autoencoder, self.discriminator, self.disc_optimizer = autoencoder, discriminator, disc_optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        """What :func:`medaug.training.fit` steps is the autoencoder's optimizer (the discriminator's is
        :class:`AutoencoderStep`'s)."""
        self.autoencoder.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.autoencoder.step()

    def state_dict(self) -> dict:
        disc = self.discriminator is not None
        return {"autoencoder": self.autoencoder.state_dict(),
                "discriminator": self.discriminator.state_dict() if disc else None,
                "disc_optimizer": self.disc_optimizer.state_dict() if disc else None}

    def load_state_dict(self, state: dict) -> None:
        self.autoencoder.load_state_dict(state["autoencoder"])
        if self.discriminator is not None and state.get("discriminator") is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])


def crop(images: torch.Tensor, corners: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crops ``(N, C, *size)`` of images ``(N, C, *spatial)``, image i from its corner ``corners[i]``."""
    return torch.stack([x[(slice(None), *(slice(a, a + p) for a, p in zip(corner.tolist(), size)))]
                        for x, corner in zip(images, corners)])


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
            probe = images[:1] if self.patch is None else crop(images[:1], torch.zeros(1, len(self.patch),
                                                                                       dtype=torch.long), self.patch)
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
        self.autocast = torch.autocast(device.type, dtype=settings.amp_dtype or torch.float32,
                                       enabled=settings.amp_dtype is not None)
        self.device = device

    def __call__(self, draw: StepDraw) -> StepLoss:
        s, gen = self.settings, draw.data_generator
        x = self.images[draw.rows]
        if self.patch is not None:
            corners = torch.stack([torch.randint(0, size - p + 1, (draw.global_batch,), generator=gen)
                                   for p, size in zip(self.patch, self.images.shape[2:])], 1)
            x = crop(x, corners[draw.mine], self.patch)
        noise = torch.randn((draw.global_batch, *self.latent_shape), generator=gen)[draw.mine]
        x, noise = to_device([x, noise], self.device)
        adv_on = self.disc is not None and draw.step >= s.adv_start
        if adv_on:  # the generator's adversarial term: gradients reach the reconstruction, not the critic
            self.disc.requires_grad_(False)
        with self.autocast:
            terms = autoencoder_loss(self.model, x, noise, kl_weight=s.kl_weight, adv_weight=s.adv_weight,
                                     discriminator=self.disc if adv_on else None)
        logged = {"autoencoder/loss": terms.total.detach(), "autoencoder/recon_l1": terms.recon.detach(),
                  "autoencoder/kl": terms.kl.detach()}
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


# --------------------------------------------------------------------------- latent cache


def cache_file(cache_dir: str | Path, autoencoder_id: str, dataset: str, split: str) -> Path:
    """Where the latents of ``split`` live: one folder per (autoencoder id, dataset fingerprint)."""
    return Path(cache_dir) / f"{autoencoder_id}-{dataset}" / f"{split}.pt"


def write_latent_cache(path: str | Path, latents: torch.Tensor, labels: torch.Tensor) -> Path:
    """Save unscaled posterior means ``(N, C_lat, *latent)`` and labels ``(N,)`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save({"latents": latents.float(), "labels": labels.long()}, tmp)
    return path


# --------------------------------------------------------------------------- the latent space of a checkpoint


@dataclass
class LatentSpace:
    """A trained autoencoder (EMA weights, eval mode) with its scale factor: image ⇄ model-space latents."""

    autoencoder: nn.Module
    scale_factor: float
    latent_channels: int
    latent_shape: list[int]
    path: Path
    id: str
    dataset: str = ""
    encode_tile: list[int] | None = None  # images are encoded in tiles of this size (autoencoder.encode_tile)
    image_shape: list[int] | None = None

    @property
    def decode_tile(self) -> list[int] | None:
        """The latent tile matching ``encode_tile``: the size the decoder saw in training; None without one."""
        return latent_tile(self.encode_tile, self.image_shape, self.latent_shape)

    def encode(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Scaled posterior means ``(N, C_lat, *latent)`` (unit variance) of images in [-1, 1]."""
        return encode_mean(self.autoencoder, images, batch_size, tile=self.encode_tile) * self.scale_factor

    def decode(self, latents: torch.Tensor, *, tile: Sequence[int] | None = None, overlap: float = 0.25,
               batch_size: int = 8) -> torch.Tensor:
        """Images ``(N, 1, *spatial)`` in [-1, 1] of scaled latents (see :func:`decode_latents` for ``tile``;
        None: :attr:`decode_tile`, whole volumes for an autoencoder trained on them)."""
        return decode_latents(self.autoencoder, latents / self.scale_factor, tile=tile or self.decode_tile,
                              overlap=overlap, batch_size=batch_size)

    def sample(self, model: nn.Module, scheduler, labels: torch.Tensor, *, tile: Sequence[int] | None = None,
               overlap: float = 0.25, **kwargs) -> torch.Tensor:
        """``sampling.sample_images`` in latent space (same seeding and guidance; ``kwargs`` as there,
        without shape and channels), then decoded: images ``(N, 1, *spatial)`` in [-1, 1] on the CPU."""
        z = sample_images(model, scheduler, labels, self.latent_shape, channels=self.latent_channels, clip=False,
                          **kwargs)
        return self.decode(z, tile=tile, overlap=overlap, batch_size=kwargs.get("batch_size", 8))

    def meta(self) -> dict:
        """What a diffusion checkpoint records about its latent space (``meta["latent"]``)."""
        return dict(autoencoder_path=str(self.path), autoencoder_id=self.id, scale_factor=self.scale_factor,
                    latent_channels=self.latent_channels, latent_shape=list(self.latent_shape))


def load_latent_space(path: str | Path, device: torch.device | str = "cpu",
                      expect_id: str | None = None, trust: bool = False) -> LatentSpace:
    """The latent space of a finished autoencoder checkpoint; ``expect_id`` guards against a changed file.
    ``trust``: see :func:`medaug.model.load_checkpoint` (a checkpoint is data unless trusted)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: autoencoder checkpoint not found; run `medaug train_autoencoder` "
                                "or set latent.train_if_missing=true")
    ckpt = load_checkpoint(path, trust)
    if ckpt.meta.get("kind") != "autoencoder":
        raise ValueError(f"{path}: not an autoencoder checkpoint (written by `medaug train_autoencoder`)")
    if "scale_factor" not in ckpt.meta:
        raise ValueError(f"{path}: unfinished autoencoder (step {ckpt.step}, no scale factor yet); "
                         "run `medaug train_autoencoder` again to finish it")
    if expect_id and ckpt.id != expect_id:
        raise ValueError(f"{path}: autoencoder {ckpt.id} is not the one the diffusion model was trained with "
                         f"({expect_id}); restore that file or retrain the diffusion model")
    net = ema_network(ckpt).to(device)
    return LatentSpace(net, float(ckpt.meta["scale_factor"]), int(ckpt.meta["latent_channels"]),
                       list(ckpt.meta["latent_shape"]), path.resolve(), ckpt.id, ckpt.meta.get("dataset", ""),
                       ckpt.meta.get("encode_tile"), ckpt.meta.get("image_shape"))


def cached_latents(space: LatentSpace, prepared_dir: str | Path, cache_dir: str | Path,
                   split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled posterior means ``(N, C_lat, *latent)`` and labels ``(N,)`` of a prepared split,
    encoded once and then read from ``cache_dir`` (keyed by autoencoder id + dataset fingerprint).
    Under a process group every rank calls this: the ranks share the encoding, rank 0 writes."""
    info = load_info(prepared_dir)
    path = cache_file(cache_dir, space.id, info.fingerprint, split)
    if path.is_file():
        data = torch.load(path, map_location="cpu", weights_only=True)
        log.info("latents of %s read from cache %s", split, path)
        return data["latents"], data["labels"]
    images, labels = load_split(info.root, split)
    latents = encode_shared(space.autoencoder, images, progress=True, tile=space.encode_tile)
    if rank_and_world()[0] == 0:
        write_latent_cache(path, latents, labels)
    log.info("encoded %d %s images to latents %s, cached in %s", len(images), split, list(latents.shape[1:]), path)
    return latents, labels


# --------------------------------------------------------------------------- recipes the stages call


class AutoencoderResult(NamedTuple):
    path: Path
    id: str
    step: int
    scale_factor: float | None
    metrics: dict


def train_autoencoder(section: Mapping | None, prepared_dir: str | Path, ckpt_path: str | Path,
                      cache_dir: str | Path, *, device: torch.device | str = "cpu",
                      amp_dtype: torch.dtype | None = None, tracker: Tracker | None = None,
                      run_name: str = "autoencoder", trust: bool = False) -> AutoencoderResult:
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
        raise ValueError("no autoencoder chosen; pass autoencoder=kl_small (conf/autoencoder/) or an experiment "
                         "that sets one, e.g. experiment=ldm_3d_demo")
    rank, world = rank_and_world()
    tracker = guarded(tracker if tracker is not None and rank == 0 else NullTracker())
    ckpt_path, device = Path(ckpt_path), torch.device(device)
    info = load_info(prepared_dir)
    spec = dict(section["network"])
    if spec.get("spatial_dims") != info.spatial_dims:
        raise ValueError(f"autoencoder.network.spatial_dims={spec.get('spatial_dims')} but {info.root} is "
                         f"{info.spatial_dims}D; set it to ${{data.spatial_dims}}")
    latent_shape = check_shape(info.image_shape, spec)
    settings = AutoencoderSettings.from_section(section)
    settings.amp_dtype, settings.rank, settings.world_size = amp_dtype, rank, world
    factor = compression(spec)
    settings.patch_size = check_tile(settings.patch_size, info.image_shape, factor, "autoencoder.patch_size")
    settings.encode_tile = check_tile(settings.encode_tile, info.image_shape, factor, "autoencoder.encode_tile",
                                      ENCODE_OVERLAP)

    ae = network_from_spec(spec).to(device)
    ema = EMA(ae, settings.ema_decay)
    disc = network_from_spec(section["discriminator"]).to(device) if section.get("discriminator") else None
    if disc is not None:  # a discriminator too deep for the training images fails here, not after the warm-up
        shape = settings.patch_size or list(info.image_shape)
        try:
            with torch.no_grad():
                disc(torch.zeros(2, 1, *shape, device=device))
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"autoencoder.discriminator (num_layers_d={section['discriminator'].get('num_layers_d')}) "
                             f"cannot judge {shape} training images ({err}); lower num_layers_d or raise "
                             "autoencoder.patch_size") from None
    optimizers = Optimizers(network_from_spec(section["optimizer"], params=ae.parameters()), disc,
                            network_from_spec(section["disc_optimizer"], params=disc.parameters()) if disc else None)
    start_step, run_id, meta = 0, None, {}
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, trust)
        if ckpt.meta.get("kind") != "autoencoder":
            raise ValueError(f"{ckpt_path}: not an autoencoder checkpoint; point latent.autoencoder_ckpt elsewhere")
        if ckpt.step >= settings.max_steps and "scale_factor" in ckpt.meta:
            log.info("autoencoder %s is trained (step %d); raise autoencoder.max_steps to continue",
                     ckpt_path, ckpt.step)
            return AutoencoderResult(ckpt_path, ckpt.id, ckpt.step, ckpt.meta["scale_factor"], ckpt.meta.get("val", {}))
        restore_training_state(ckpt, ae, ema, optimizers)
        start_step, run_id = ckpt.step, ckpt.meta.get("mlflow_run_id")
        log.info("resuming the autoencoder from %s at step %d", ckpt_path, start_step)

    train_x, train_y = load_split(info.root, "train")
    val_x, _ = load_split(info.root, "val")
    with tracked(tracker, run_name=run_name, run_id=run_id, tags={"medaug.job": run_name}):
        if start_step == 0:
            tracker.log_params(flatten({"autoencoder": section}))
        meta.update(kind="autoencoder", spatial_dims=info.spatial_dims, image_shape=list(info.image_shape),
                    latent_channels=int(spec["latent_channels"]), latent_shape=latent_shape, dataset=info.fingerprint,
                    encode_tile=settings.encode_tile, mlflow_run_id=tracker.run_id)
        payload = lambda: {"config": {"model": spec, "autoencoder": dict(section)}, "meta": meta}  # noqa: E731
        validate = (lambda: reconstruction_metrics(ema.model, val_x, settings.batch_size, settings.encode_tile)[0]) \
            if len(val_x) else None
        result = fit(ae, ema, optimizers, AutoencoderStep(ae, train_x, settings, optimizers), settings.train_settings(),
                     start_step=start_step, ckpt_path=ckpt_path, checkpoint_payload=payload, tracker=tracker,
                     validate=validate)

        net = ema.model.eval()
        metrics = {}
        if len(val_x) and rank == 0:
            metrics, recon = reconstruction_metrics(net, val_x, settings.batch_size, settings.encode_tile)
            k = min(4, len(val_x))
            grid = save_grid(torch.cat([val_x[:k], recon[:k]]), torch.tensor([0] * k + [1] * k),
                             ["real", "reconstruction"], ckpt_path.parent / "reconstructions.png", per_class=k)
            tracker.log_metrics(metrics, step=result.step)
            tracker.log_artifact(grid, "autoencoder")
        latents = encode_shared(net, train_x, settings.batch_size, progress=True, tile=settings.encode_tile)
        meta.update(scale_factor=scale_factor_of(latents), val=metrics)
        ae_id = None
        if rank == 0:
            ae_id = file_id(save_checkpoint(ckpt_path, model=ae, ema=ema, optimizer=optimizers, step=result.step,
                                            **payload()))
            write_latent_cache(cache_file(cache_dir, ae_id, info.fingerprint, "train"), latents, train_y)
        barrier()  # the finished checkpoint and its cache are on disk for every rank
        ae_id = ae_id or file_id(ckpt_path)
        tracker.log_metrics({"autoencoder/scale_factor": meta["scale_factor"]}, step=result.step)
    log.info("autoencoder trained to step %d (%s), scale factor %.4f; checkpoint %s", result.step,
             ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items()), meta["scale_factor"], ckpt_path)
    return AutoencoderResult(ckpt_path, ae_id, result.step, meta["scale_factor"], metrics)


def latent_space_for_training(latent: Mapping | None, prepared_dir: str | Path, device: torch.device, *,
                              clip_sample: bool, autoencoder: Mapping | None = None,
                              make_tracker: Callable[[], Tracker] = NullTracker, run_name: str = "job-autoencoder",
                              trust: bool = False, amp_dtype: torch.dtype | None = None) -> LatentSpace | None:
    """``train``'s latent step: None in pixel space (``latent.autoencoder_ckpt`` null); otherwise the
    autoencoder's latent space, trained first (from the ``autoencoder`` section, tracked by
    ``make_tracker()`` as ``run_name``) when missing and ``latent.train_if_missing``. The UNet then
    needs ``space.latent_channels`` in and out. ``clip_sample`` is the scheduler's (refused: it clips latents)."""
    latent = latent or {}
    if not latent.get("autoencoder_ckpt"):
        return None
    ae_path = Path(latent["autoencoder_ckpt"])
    if clip_sample:
        raise ValueError("scheduler.clip_sample=true clips latents to [-1, 1]; set scheduler.clip_sample=false "
                         "for latent diffusion")
    if not ae_path.exists() and latent.get("train_if_missing"):
        log.info("no autoencoder at %s: training it first (latent.train_if_missing=true)", ae_path)
        train_autoencoder(autoencoder, prepared_dir, ae_path, latent["cache_dir"], device=device, amp_dtype=amp_dtype,
                          tracker=make_tracker(), run_name=run_name, trust=trust)
    return load_latent_space(ae_path, device, trust=trust)


def latent_space_of(meta: Mapping, device: torch.device | str = "cpu", trust: bool = False) -> LatentSpace | None:
    """``sample``'s latent step: the latent space a diffusion checkpoint's meta records, None in pixel space."""
    latent = meta.get("latent")
    if not latent:
        return None
    space = load_latent_space(latent["autoencoder_path"], device, expect_id=latent["autoencoder_id"], trust=trust)
    space.scale_factor = float(latent["scale_factor"])
    return space
