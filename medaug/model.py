"""Networks from specs, EMA weights and checkpoints.

A checkpoint is one ``torch.save`` file holding everything ``sample`` needs::

    model, ema        state dicts of the network and of its EMA copy
    optimizer, step   to resume training
    rng               torch / numpy / python (and CUDA) generator states
    config            the resolved run config as plain containers (model spec, scheduler spec, ...)
    meta              class names, spatial dims, image shape, intensity window, affine, tracking run id

MONAI schedulers hold no learned state: the scheduler spec in ``config`` rebuilds them.

Example::

    net = network_from_spec({"_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": 2, ...})
    save_checkpoint("last.pt", model=net, ema=ema, optimizer=opt, step=100, config=cfg, meta=meta)
    ckpt = load_checkpoint("last.pt")
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn


def locate(target: str):
    """The object named by a dotted path such as ``monai.networks.nets.DiffusionModelUNet``."""
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {target!r} named by _target_ in the config ({err})") from err


def network_from_spec(spec: Mapping, **overrides):
    """Build the object a ``{"_target_": ..., **kwargs}`` spec describes (keys starting with ``_`` other than the target are ignored)."""
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    kwargs.update(overrides)
    return locate(spec["_target_"])(**kwargs)


def check_unet_input(spec: Mapping, shape: Sequence[int], what: str = "image") -> None:
    """Refuse a spatial ``shape`` that a ``DiffusionModelUNet`` of ``spec`` cannot take: it halves the
    size once per level after the first, and its skip connections need every axis to halve evenly."""
    levels = len(spec.get("channels", ()))
    factor = 2 ** max(levels - 1, 0)
    if any(int(s) % factor for s in shape):
        raise ValueError(f"model.channels={list(spec['channels'])} halves the {what} {levels - 1}x, so each axis of "
                         f"the {what} shape {list(shape)} must divide by {factor}; set data.image_size to "
                         f"multiples of {factor}" + (" times the autoencoder's compression" if what == "latent" else ""))


class EMA:
    """Exponential moving average of a model's weights, with the usual warm-up.

    decay at step ``t`` is ``min(decay, (1 + t) / (10 + t))``, so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        for e, p in zip(ema_params, params):  # same memory layout (channels_last), or foreach falls back to slow loops
            if e.stride() != p.stride():
                e.data = torch.empty_like(p).copy_(e.data)
        torch._foreach_lerp_(ema_params, params, 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]
        self.decay = state["decay"]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    """A loaded checkpoint; ``id`` is a short content hash of the file."""

    path: Path
    id: str
    step: int
    model: dict
    ema: dict
    optimizer: dict | None
    rng: dict | None
    config: dict
    meta: dict


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path, *, model, ema, optimizer, step, config, meta) -> Path:
    """Write a checkpoint atomically (temp file, then rename) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": unwrap(model).state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "rng": rng_state(),
        "config": config,
        "meta": meta,
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def file_id(*paths: str | Path) -> str:
    """First 12 hex digits of the SHA-256 of the files' contents, in order: a stable checkpoint (or
    samples) id."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` onto the CPU."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path}: is a folder; pass the checkpoint file in it as ckpt_path=<file.pt> "
                                "(training writes train/checkpoints/last.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train first or pass ckpt_path=<file.pt>")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{path}: not a readable medaug checkpoint ({err})") from err
    missing = {"model", "ema", "step", "config", "meta"} - set(payload)
    if missing:
        raise ValueError(f"{path}: not a medaug checkpoint (missing {sorted(missing)})")
    return Checkpoint(path, file_id(path), payload["step"], payload["model"], payload["ema"],
                      payload.get("optimizer"), payload.get("rng"), payload["config"], payload["meta"])


def restore_training_state(ckpt: Checkpoint, model: nn.Module, ema: EMA, optimizer=None) -> None:
    """Load the weights, EMA weights, optimizer state and RNG states of ``ckpt`` into a resumed run."""
    model.load_state_dict(ckpt.model)
    ema.load_state_dict(ckpt.ema)
    if ckpt.optimizer and optimizer is not None:
        optimizer.load_state_dict(ckpt.optimizer)
    if ckpt.rng:
        set_rng_state(ckpt.rng)


def ema_network(ckpt: Checkpoint) -> nn.Module:
    """The EMA network of a checkpoint, rebuilt from its config, in eval mode."""
    net = network_from_spec(ckpt.config["model"])
    net.load_state_dict(ckpt.ema["model"])
    return net.eval()
