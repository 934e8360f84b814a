"""A ControlNet on the mask, added to a trained class-conditional UNet (``model.condition=controlnet``).

The base model (``model.controlnet.base_ckpt``, a class-conditional image checkpoint of the same prepared data
and latent space) stays frozen; a MONAI ``ControlNet`` that mirrors its spec (channels, attention levels, res
blocks, class embeddings, spatial dims) learns to steer it with the one-hot mask: its outputs are added to the
UNet's skip connections and middle block (``down_block_additional_residuals``, ``mid_block_additional_residual``,
times ``conditioning_scale``), as MONAI's ``ControlNetDiffusionInferer`` does. The ControlNet starts as a copy of
the UNet's encoder (every weight whose name and shape match, :func:`monai.networks.utils.copy_model_state`) and
its output convolutions start at zero, so before training the pair predicts exactly what the base UNet predicts
(Zhang, Rao, Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models", arXiv:2302.05543).

:class:`ControlledUNet` holds both networks behind the forward signature of a mask-conditioned UNet,
``net(cat([x_t, onehot]), timesteps=, class_labels=)``: the last ``mask_channels`` input channels are the mask
(the ControlNet's conditioning), the others the noisy image or latents (both networks' input). So training,
classifier-free guidance (``training.p_uncond`` drops class and mask together: null class, all-zero one-hot),
EMA, checkpoints, resume, DDP and every sampler work on it unchanged; its checkpoint holds the UNet's weights
too (self-contained; ``sample`` needs nothing but it) and loads with the safe loader (a medaug class that builds
only MONAI's ``DiffusionModelUNet`` and ``ControlNet``).

The mask grid. The conditioning embedding has a single level (``conditioning_embedding_num_channels`` of one
entry: a 3x3 convolution, SiLU, a zero-initialised 3x3 convolution, no striding), so it lands on the grid of its
input. Pixel models get the mask on the image grid; latent models the image-grid one-hot area-resized to the
latent grid (each cell the share of its voxels under each label, :meth:`Conditioning.one_hot`), exactly as the
concatenation models do. The embedding's own stride-2 levels (MAISI's way) would need the full-resolution mask
beside the latents, which the one forward signature above cannot carry, and an autoencoder compression that is
the same power of two on every axis; the area shares already keep a boundary inside a cell as a fraction.

Example::

    base = load_base("outputs/demo_2d/train/checkpoints/last.pt", info, space=None, scheduler=sched_spec)
    spec = controlnet_spec(base, mask_channels=2, embedding_channels=16, conditioning_scale=1.0)
    net = network_from_spec(spec)
    init_from_base(net, base)                       # UNet = base EMA weights, frozen; ControlNet from it
    eps = net(torch.cat([x_t, onehot], 1), timesteps=t, class_labels=y)
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Mapping

import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet
from monai.networks.utils import copy_model_state
from torch import nn

from .conditioning import SPEC_KEYS, Conditioning
from .model import Checkpoint, load_checkpoint, trained_space

__all__ = ["ControlledUNet", "controlnet_spec", "load_base", "init_from_base"]

UNET = "monai.networks.nets.DiffusionModelUNet"
KEY = "model.controlnet.base_ckpt"
# scheduler keys that must agree between the base model and the ControlNet run (what the UNet learnt to predict)
SCHEDULE_KEYS = ("_target_", "num_train_timesteps", "schedule", "beta_start", "beta_end", "prediction_type")


class ControlledUNet(nn.Module):
    """A frozen ``DiffusionModelUNet`` steered by a trainable ``ControlNet`` on the mask.

    Args:
        unet: the base UNet's keyword arguments (its checkpoint's model spec without ``_target_`` and medaug's keys).
        mask_channels: K, the one-hot mask channels at the end of the input.
        embedding_channels: channels of the ControlNet's (single-level) conditioning embedding.
        conditioning_scale: factor on the ControlNet's residuals.

    ``forward(x (N, C + K, *spatial), timesteps (N,), class_labels (N,))`` → ``(N, C, *spatial)``."""

    def __init__(
        self, unet: Mapping, mask_channels: int, embedding_channels: int = 16, conditioning_scale: float = 1.0
    ):
        super().__init__()
        self.mask_channels = int(mask_channels)
        self.conditioning_scale = float(conditioning_scale)
        self.unet = DiffusionModelUNet(**unet).requires_grad_(False).eval()
        accepted = set(inspect.signature(ControlNet.__init__).parameters) - {"self"}
        mirrored = {k: v for k, v in unet.items() if k in accepted}
        self.controlnet = ControlNet(
            **mirrored,
            conditioning_embedding_in_channels=self.mask_channels,
            conditioning_embedding_num_channels=(int(embedding_channels),),
        )

    def train(self, mode: bool = True) -> "ControlledUNet":
        """Train mode for the ControlNet only: the frozen UNet stays in eval mode."""
        super().train(mode)
        self.unet.eval()
        return self

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        x, mask = x[:, : -self.mask_channels], x[:, -self.mask_channels :]
        down, mid = self.controlnet(
            x=x,
            timesteps=timesteps,
            controlnet_cond=mask,
            conditioning_scale=self.conditioning_scale,
            class_labels=class_labels,
        )
        return self.unet(
            x,
            timesteps=timesteps,
            class_labels=class_labels,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )


def load_base(
    path: str | Path | None,
    info,
    *,
    space=None,
    scheduler: Mapping | None = None,
    trust: bool = False,
) -> Checkpoint:
    """The class-conditional checkpoint ``path`` (``model.controlnet.base_ckpt``) a ControlNet is added to,
    checked against the prepared dataset ``info`` (classes, image shape, spatial dims), the run's latent
    ``space`` (None: pixels) and its ``scheduler`` section (:data:`SCHEDULE_KEYS`).

    Raises FileNotFoundError / ValueError in one line naming the file and the fix."""
    if not path:
        raise ValueError(
            f"model.condition=controlnet needs {KEY}: the class-conditional checkpoint the ControlNet is added "
            "to (e.g. outputs/demo_2d/train/checkpoints/last.pt); train one first"
        )
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"{KEY}={path}: not found; train the class-conditional model first (medaug train ...) or fix the path"
        )
    base = load_checkpoint(path, trust)
    cond = Conditioning.from_meta(base.meta)
    if cond != Conditioning():
        raise ValueError(
            f"{KEY}={path} is conditioned on {cond.kind} generating {cond.generates}; a ControlNet is added to a "
            "class-conditional image model (model.condition=class)"
        )
    target = base.config.get("model", {}).get("_target_")
    if target != UNET:
        raise ValueError(f"{KEY}={path} is a {target}; a ControlNet is added to a {UNET}")
    for key, now in (
        ("class_names", list(info.class_names)),
        ("image_shape", list(info.image_shape)),
        ("spatial_dims", info.spatial_dims),
    ):
        if base.meta.get(key) != now:
            raise ValueError(
                f"{KEY}={path} was trained with {key} {base.meta.get(key)}, but {info.root} has {now}; "
                "give the base model of this prepared data"
            )
    trained_on = base.meta.get("latent", {}).get("autoencoder_id")
    now_on = space.id if space is not None else None
    if trained_on != now_on:
        raise ValueError(
            f"{KEY}={path} was trained on {trained_space(trained_on)}, but this run trains on {trained_space(now_on)}; "
            "set latent.autoencoder_ckpt as the base model had it"
        )
    theirs = base.config.get("scheduler", {})
    for key in SCHEDULE_KEYS:
        if scheduler is not None and theirs.get(key) != scheduler.get(key):
            raise ValueError(
                f"{KEY}={path} was trained with scheduler {key}={theirs.get(key)}, this run has "
                f"{scheduler.get(key)}; use the base model's scheduler (scheduler=... as it was trained)"
            )
    return base


def controlnet_spec(
    base: Checkpoint, *, mask_channels: int, embedding_channels: int = 16, conditioning_scale: float = 1.0
) -> dict:
    """The model spec of a :class:`ControlledUNet` on ``base`` (stored in the checkpoint; ``sample`` rebuilds the
    network from it): the base UNet's spec, the mask channels, the embedding and ``_base`` (the base checkpoint's
    id and step: provenance, no path)."""
    unet = {k: v for k, v in base.config["model"].items() if not k.startswith("_") and k not in SPEC_KEYS}
    return {
        "_target_": f"{__name__}.{ControlledUNet.__name__}",
        "_base": {"id": base.id, "step": base.step},
        "condition": "controlnet",
        "unet": unet,
        "mask_channels": int(mask_channels),
        "embedding_channels": int(embedding_channels),
        "conditioning_scale": float(conditioning_scale),
    }


def init_from_base(net: ControlledUNet, base: Checkpoint) -> ControlledUNet:
    """Load the base checkpoint's EMA weights (what it samples with) into the frozen UNet and copy every UNet
    weight whose name and shape match into the ControlNet (its encoder: input convolution, time and class
    embeddings, down and middle blocks); the conditioning embedding and the zero convolutions keep their
    initialisation. Returns ``net``."""
    net.unet.load_state_dict(base.ema["model"])
    copy_model_state(net.controlnet, net.unet.state_dict(), inplace=True)
    return net
