"""The latent space of an autoencoder checkpoint: encode/decode (tiled), scale factor, latent cache."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from monai.inferers import SlidingWindowInferer
from monai.metrics import PSNRMetric, SSIMMetric
from torch import nn

from ..data import load_info, load_split
from ..atomic import atomic_file
from ..model import ema_network, load_checkpoint
from ..progress import progress_bar
from ..sampling import sample_images
from ..runtime import rank_and_world

log = logging.getLogger("medaug")
ENCODE_OVERLAP = 0.25  # share of a tile that overlaps its neighbour when images are encoded in tiles


# --------------------------------------------------------------------------- encode / decode


def compression(spec: Mapping) -> int:
    """Downsampling factor per axis of an AutoencoderKL spec: ``2 ** (len(channels) - 1)``."""
    return 2 ** (len(spec["channels"]) - 1)


def check_shape(image_shape: Sequence[int], spec: Mapping) -> list[int]:
    """The latent shape of ``image_shape``; every axis must divide by the compression."""
    f = compression(spec)
    if any(s % f for s in image_shape):
        raise ValueError(
            f"image shape {list(image_shape)} does not divide by the autoencoder's compression {f} "
            f"(channels {list(spec['channels'])}); set data.image_size to multiples of {f}"
        )
    return [s // f for s in image_shape]


def check_tile(
    tile: Sequence[int] | None, image_shape: Sequence[int], factor: int, key: str, overlap: float | None = None
) -> list[int] | None:
    """``tile`` (image voxels per axis: a training patch or an encoding tile) as ints, checked
    against the image shape and the compression ``factor``; None stays None.

    With ``overlap`` (tiles encoded by a sliding window) the window's step, ``int(tile × (1 - overlap))``
    image voxels, must be a multiple of ``factor`` too: a tile starting off the latent grid would
    put its latents a fraction of a voxel off."""
    if tile is None:
        return None
    tile = [int(t) for t in tile]
    if len(tile) != len(image_shape) or any(t < factor or t % factor or t > s for t, s in zip(tile, image_shape)):
        raise ValueError(
            f"{key}={tile}: give one size per axis of the images {list(image_shape)}, each a multiple of "
            f"the compression {factor} and no larger than the image"
        )
    steps = [int(t * (1 - overlap)) for t in tile] if overlap is not None else []
    if any(t < s and step % factor for t, s, step in zip(tile, image_shape, steps)):
        raise ValueError(
            f"{key}={tile}: overlapping by {overlap:.0%}, the tiles step by {steps} voxels, off the "
            f"latent grid of the compression {factor}; give sizes that are multiples of {4 * factor}"
        )
    return tile


def latent_tile(
    tile: Sequence[int] | None, image_shape: Sequence[int], latent_shape: Sequence[int]
) -> list[int] | None:
    """The latent tile of an image tile (image voxels / compression); None stays None."""
    return None if tile is None else [t * z // s for t, z, s in zip(tile, latent_shape, image_shape)]


def _tiler(
    tile: Sequence[int] | None, ndim: int, key: str, overlap: float, batch_size: int
) -> SlidingWindowInferer | None:
    """Overlapping tiles blended with Gaussian weights (MONAI sliding window); None without ``tile``."""
    if tile is None:
        return None
    tile = [int(t) for t in tile]
    if len(tile) != ndim or min(tile) < 1:
        raise ValueError(f"{key}={tile}: give one positive size per axis ({ndim} axes)")
    return SlidingWindowInferer(roi_size=tile, sw_batch_size=batch_size, overlap=overlap, mode="gaussian")


@torch.no_grad()
def encode_mean(
    ae: nn.Module,
    images: torch.Tensor,
    batch_size: int = 8,
    progress: bool = False,
    *,
    tile: Sequence[int] | None = None,
    overlap: float = ENCODE_OVERLAP,
) -> torch.Tensor:
    """Posterior means ``(N, C_lat, *spatial / f)`` (float32, CPU) of images ``(N, 1, *spatial)`` in [-1, 1].

    ``tile`` (image voxels per axis, multiples of f) encodes overlapping tiles one at a time and
    blends their means, for volumes too large to encode whole (and for an autoencoder trained on
    patches of that size, see ``autoencoder.patch_size``); None encodes whole volumes.
    """
    device = next(ae.parameters()).device
    inferer = _tiler(tile, images.ndim - 2, "autoencoder.encode_tile", overlap, batch_size)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return ae.encode(x)[0]

    out = [
        (inferer(x, mean) if inferer is not None else mean(x)).float().cpu()
        for x in (
            images[i : i + batch_size].to(device)
            for i in progress_bar(range(0, len(images), batch_size), desc="encode", unit="batch", disable=not progress)
        )
    ]
    return torch.cat(out)


def encode_shared(
    ae: nn.Module,
    images: torch.Tensor,
    batch_size: int = 8,
    progress: bool = False,
    *,
    tile: Sequence[int] | None = None,
) -> torch.Tensor:
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
def decode_latents(
    ae: nn.Module,
    latents: torch.Tensor,
    *,
    tile: Sequence[int] | None = None,
    overlap: float = 0.25,
    batch_size: int = 8,
) -> torch.Tensor:
    """Images ``(N, 1, *latent * f)`` (CPU, clamped to [-1, 1]) of unscaled latents ``(N, C_lat, *latent)``.

    ``tile`` (latent voxels per axis) decodes overlapping latent tiles one at a time and blends them
    with Gaussian weights (MONAI ``SlidingWindowInferer``), so a volume larger than memory allows
    still decodes; ``None`` decodes whole volumes.
    """
    device = next(ae.parameters()).device
    inferer = _tiler(tile, latents.ndim - 2, "sample.decode_tile", overlap, batch_size)
    out = []
    for i in progress_bar(
        range(0, len(latents), batch_size), desc="decode", unit="batch", disable=len(latents) <= batch_size
    ):
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
def reconstruction_metrics(
    ae: nn.Module, images: torch.Tensor, batch_size: int = 8, tile: Sequence[int] | None = None
) -> tuple[dict, torch.Tensor]:
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
        "autoencoder/val_ssim": float(
            SSIMMetric(spatial_dims=images.ndim - 2, data_range=1.0, win_size=win)(a, b).mean()
        ),
    }
    return metrics, recon


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

    def decode(
        self, latents: torch.Tensor, *, tile: Sequence[int] | None = None, overlap: float = 0.25, batch_size: int = 8
    ) -> torch.Tensor:
        """Images ``(N, 1, *spatial)`` in [-1, 1] of scaled latents (see :func:`decode_latents` for ``tile``;
        None: :attr:`decode_tile`, whole volumes for an autoencoder trained on them)."""
        return decode_latents(
            self.autoencoder,
            latents / self.scale_factor,
            tile=tile or self.decode_tile,
            overlap=overlap,
            batch_size=batch_size,
        )

    def sample(
        self,
        model: nn.Module,
        scheduler,
        labels: torch.Tensor,
        *,
        tile: Sequence[int] | None = None,
        overlap: float = 0.25,
        **kwargs,
    ) -> torch.Tensor:
        """``sampling.sample_images`` in latent space (same seeding and guidance; ``kwargs`` as there,
        without shape and channels), then decoded: images ``(N, 1, *spatial)`` in [-1, 1] on the CPU."""
        z = sample_images(
            model, scheduler, labels, self.latent_shape, channels=self.latent_channels, clip=False, **kwargs
        )
        return self.decode(z, tile=tile, overlap=overlap, batch_size=kwargs.get("batch_size", 8))

    def meta(self) -> dict:
        """What a diffusion checkpoint records about its latent space (``meta["latent"]``)."""
        return dict(
            autoencoder_path=str(self.path),
            autoencoder_id=self.id,
            scale_factor=self.scale_factor,
            latent_channels=self.latent_channels,
            latent_shape=list(self.latent_shape),
        )


def load_latent_space(
    path: str | Path, device: torch.device | str = "cpu", expect_id: str | None = None, trust: bool = False
) -> LatentSpace:
    """The latent space of a finished autoencoder checkpoint; ``expect_id`` guards against a changed file.
    ``trust``: see :func:`medaug.model.load_checkpoint` (a checkpoint is data unless trusted)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: autoencoder checkpoint not found; run `medaug train_autoencoder` "
            "or set latent.train_if_missing=true"
        )
    ckpt = load_checkpoint(path, trust)
    if ckpt.meta.get("kind") != "autoencoder":
        raise ValueError(f"{path}: not an autoencoder checkpoint (written by `medaug train_autoencoder`)")
    if "scale_factor" not in ckpt.meta:
        raise ValueError(
            f"{path}: unfinished autoencoder (step {ckpt.step}, no scale factor yet); "
            "run `medaug train_autoencoder` again to finish it"
        )
    if expect_id and ckpt.id != expect_id:
        raise ValueError(
            f"{path}: autoencoder {ckpt.id} is not the one the diffusion model was trained with "
            f"({expect_id}); restore that file or retrain the diffusion model"
        )
    net = ema_network(ckpt).to(device)
    return LatentSpace(
        net,
        float(ckpt.meta["scale_factor"]),
        int(ckpt.meta["latent_channels"]),
        list(ckpt.meta["latent_shape"]),
        path.resolve(),
        ckpt.id,
        ckpt.meta.get("dataset", ""),
        ckpt.meta.get("encode_tile"),
        ckpt.meta.get("image_shape"),
    )


def cached_latents(
    space: LatentSpace, prepared_dir: str | Path, cache_dir: str | Path, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
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


def latent_space_of(meta: Mapping, device: torch.device | str = "cpu", trust: bool = False) -> LatentSpace | None:
    """``sample``'s latent step: the latent space a diffusion checkpoint's meta records, None in pixel space."""
    latent = meta.get("latent")
    if not latent:
        return None
    space = load_latent_space(latent["autoencoder_path"], device, expect_id=latent["autoencoder_id"], trust=trust)
    space.scale_factor = float(latent["scale_factor"])
    return space
