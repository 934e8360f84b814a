"""What a diffusion model is conditioned on (the class, a segmentation mask, both) and what it generates.

``model.condition``:

* ``class`` (default, every checkpoint from before): the class label through the UNet's class embedding;
* ``mask``: a label map only: its one-hot encoding ``(K, *spatial)`` (K = label values incl. background)
  is concatenated to the noisy image, so the UNet takes ``C + K`` input channels (trained from scratch);
* ``mask+class``: both.
* ``controlnet``: both, the mask through a ControlNet added to a trained class-conditional model, which stays
  frozen (:mod:`medaug.controlnet`; ``model.controlnet.base_ckpt``); the network still takes the one-hot mask
  concatenated to the noisy image, and the unconditional prediction drops both as below.

Latent diffusion: the one-hot mask is resized to the latent grid (area averaging: each latent cell gets the
share of its voxels under each label) before it is concatenated to the noisy latents.

Classifier-free guidance: with probability ``training.p_uncond`` a training sample loses its condition,
class and mask *jointly* (one draw per sample: the class becomes the null class, the one-hot mask all
zeros, which no real mask is, as its background channel is 1 wherever nothing is labelled). Sampling then
guides with ``eps_u + w (eps_c - eps_u)``, ``eps_u`` the prediction without class and mask.

``model.generates``: ``image`` (default) or ``mask``: a class-conditional model of the label maps themselves
(for ``sample.masks=generate``): its "image" is the one-hot label map scaled to [-1, 1] (``2 onehot - 1``,
K channels), turned back into a label map by the argmax over channels (:func:`image_to_mask`).

A checkpoint records its :class:`Conditioning` in its meta (``condition``); a checkpoint without it is
``class``-conditioned and generates images.

Example::

    cond = Conditioning(use_class=True, mask_labels={"background": 0, "lesion": 1})
    x_in = torch.cat([x_t, cond.one_hot(masks)], 1)        # (N, 1 + 2, *spatial)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

CONDITIONS = ("class", "mask", "mask+class", "controlnet")
GENERATES = ("image", "mask")
SPEC_KEYS = ("condition", "generates", "controlnet")  # medaug's keys of a model spec, not arguments of the network


@dataclass(frozen=True)
class Conditioning:
    """A model's inputs besides the noisy image and the timestep, and what it generates.

    ``use_class``: the class label through the class embedding (null class = ``len(class_names)``).
    ``mask_labels``: ``{name: value}`` of the label maps concatenated as one-hot channels (empty: none).
    ``generates``: ``image`` or ``mask`` (a mask model: label maps as ``num_labels`` one-hot channels).
    ``label_names``: ``{name: value}`` of the label maps a mask model generates.
    ``controlnet``: class and mask, the mask through a ControlNet on a frozen class model (:mod:`medaug.controlnet`)."""

    use_class: bool = True
    mask_labels: Mapping[str, int] = field(default_factory=dict)
    generates: str = "image"
    label_names: Mapping[str, int] = field(default_factory=dict)
    controlnet: bool = False

    @property
    def uses_mask(self) -> bool:
        return bool(self.mask_labels)

    @property
    def mask_channels(self) -> int:
        """One-hot channels concatenated to the noisy input (0 without a mask)."""
        return num_labels(self.mask_labels) if self.mask_labels else 0

    @property
    def kind(self) -> str:
        if self.controlnet:
            return "controlnet"
        return {(True, False): "class", (False, True): "mask", (True, True): "mask+class"}[
            (self.use_class, self.uses_mask)
        ]

    def one_hot(self, masks: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """The mask input of label maps ``masks`` ``(N, 1, *spatial)`` int: ``(N, K, *spatial)`` float32, or on
        ``grid`` (a latent grid) ``(N, K, *grid)``, the share of each cell's voxels under each label."""
        hot = one_hot(masks, self.mask_channels)
        if grid is not None and tuple(grid) != tuple(hot.shape[2:]):
            hot = F.interpolate(hot, size=tuple(int(g) for g in grid), mode="area")
        return hot

    def meta(self) -> dict:
        """What a checkpoint's meta records (``{"condition": {...}}``)."""
        return {
            "condition": dict(
                kind=self.kind,
                use_class=self.use_class,
                mask_labels=dict(self.mask_labels),
                generates=self.generates,
                label_names=dict(self.label_names),
                controlnet=self.controlnet,
            )
        }

    @classmethod
    def from_meta(cls, meta: Mapping) -> "Conditioning":
        """The conditioning a checkpoint's meta records; ``class`` → image for checkpoints from before."""
        c = meta.get("condition")
        if not c:
            return cls()
        return cls(
            c["use_class"],
            dict(c["mask_labels"]),
            c["generates"],
            dict(c.get("label_names", {})),
            bool(c.get("controlnet", False)),
        )


def num_labels(mask_labels: Mapping[str, int]) -> int:
    """One-hot channels of label maps with values ``mask_labels`` (the largest value + 1)."""
    return max(int(v) for v in mask_labels.values()) + 1


def one_hot(masks: torch.Tensor, channels: int) -> torch.Tensor:
    """Label maps ``(N, 1, *spatial)`` int → one-hot ``(N, channels, *spatial)`` float32 (0/1).

    Raises ValueError for a value outside ``[0, channels)``."""
    masks = masks.long()
    if masks.numel() and (masks.min() < 0 or masks.max() >= channels):
        raise ValueError(
            f"mask values {int(masks.min())}..{int(masks.max())} outside the model's labels 0..{channels - 1}; "
            "give label maps with the labels the model was trained on"
        )
    return F.one_hot(masks[:, 0], channels).movedim(-1, 1).float()


def mask_to_image(masks: torch.Tensor, channels: int) -> torch.Tensor:
    """Label maps ``(N, 1, *spatial)`` → what a mask model learns: ``2 onehot - 1`` in [-1, 1], ``(N, K, ...)``."""
    return one_hot(masks, channels) * 2 - 1


def image_to_mask(x: torch.Tensor) -> torch.Tensor:
    """A mask model's output ``(N, K, *spatial)`` → label maps ``(N, 1, *spatial)`` int64 (argmax over channels)."""
    return x.argmax(1, keepdim=True)


def training_conditioning(
    spec: dict, *, num_classes: int, mask_labels: Mapping[str, int], latent: bool
) -> Conditioning:
    """The :class:`Conditioning` a model spec's ``condition`` and ``generates`` ask for, checked against the
    data; sets the spec's ``num_class_embeds`` (classes + the null class, or None), ``in_channels`` and
    ``out_channels`` (the image channels as the spec gives them, plus the one-hot mask channels); a
    ``controlnet`` spec is left as it is (the network is the base model's, :mod:`medaug.controlnet`).

    Raises ValueError for an unknown value, a mask without masks in the prepared dataset, a mask model in
    latent space (it is trained on pixels) and a mask model conditioned on a mask."""
    kind, generates = spec.get("condition", "class"), spec.get("generates", "image")
    if kind not in CONDITIONS:
        raise ValueError(f"model.condition={kind!r}; choose one of {', '.join(CONDITIONS)}")
    if generates not in GENERATES:
        raise ValueError(f"model.generates={generates!r}; choose one of {', '.join(GENERATES)}")
    needs_masks = kind != "class" or generates == "mask"
    if needs_masks and not mask_labels:
        raise ValueError(
            f"model.condition={kind} model.generates={generates} needs masks, but the prepared dataset has none; "
            "give every image a mask (labels CSV column `mask`, or an MSD dataset.json) and prepare again"
        )
    if generates == "mask" and latent:
        raise ValueError("a mask model (model.generates=mask) trains on pixels; set latent.autoencoder_ckpt=null")
    if generates == "mask":
        if kind != "class":
            raise ValueError(
                f"model.generates=mask is conditioned on the class only; set model.condition=class, not {kind}"
            )
        k = num_labels(mask_labels)
        spec.update(in_channels=k, out_channels=k, num_class_embeds=num_classes + 1)
        return Conditioning(True, {}, "mask", dict(mask_labels))
    if kind == "controlnet":  # the spec is the base model's (medaug.controlnet.controlnet_spec)
        return Conditioning(True, dict(mask_labels), "image", controlnet=True)
    cond = Conditioning(kind != "mask", dict(mask_labels) if kind != "class" else {}, "image")
    channels = int(spec.get("out_channels", spec.get("in_channels", 1)))
    spec.update(
        in_channels=channels + cond.mask_channels,
        out_channels=channels,
        num_class_embeds=num_classes + 1 if cond.use_class else None,
    )
    return cond


def conditioned_training_data(
    spec: dict, info, images: torch.Tensor, *, latent: bool
) -> tuple[Conditioning, torch.Tensor, torch.Tensor | None]:
    """What ``train`` trains on under the spec's conditioning (see :func:`training_conditioning`, which also
    sets the spec's channels): ``(conditioning, what the model learns to generate (N, C, *spatial), the label
    maps it is conditioned on (N, 1, *spatial) or None)``. ``info`` is the prepared dataset's
    :class:`~medaug.data.PreparedInfo`, ``images`` its train split (or their latents)."""
    from .data import load_split_masks

    cond = training_conditioning(spec, num_classes=info.num_classes, mask_labels=info.mask_labels, latent=latent)
    if cond.generates == "mask":
        return cond, mask_to_image(load_split_masks(info.root, "train"), num_labels(cond.label_names)), None
    return cond, images, load_split_masks(info.root, "train") if cond.uses_mask else None
