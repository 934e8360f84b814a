"""Networks from specs, EMA weights and checkpoints.

A checkpoint is one ``torch.save`` file holding everything ``sample`` needs::

    model, ema        state dicts of the network and of its EMA copy
    optimizer, step   to resume training
    rng               torch / numpy / python (and CUDA) generator states, as tensors and lists
    config            the resolved run config (model spec, scheduler spec, ...) as JSON text
    meta              class names, spatial dims, image shape, intensity window, affine, tracking run id (JSON text)

MONAI schedulers hold no learned state: the scheduler spec in ``config`` rebuilds them.

A checkpoint is data, not code: it holds tensors and plain values only and is read with
``torch.load(weights_only=True)``, and the network its config names is built only when it is a
class of MONAI's networks or schedulers or of medaug (:data:`ALLOWED_TARGETS`), unless the
checkpoint is loaded with ``trust=True`` (the stages' ``trust_checkpoint=true``).

Example::

    net = network_from_spec({"_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": 2, ...})
    save_checkpoint("last.pt", model=net, ema=ema, optimizer=opt, step=100, config=cfg, meta=meta)
    ckpt = load_checkpoint("last.pt")
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .atomic import atomic_file
from .conditioning import SPEC_KEYS
from .flow import flow_kwargs, is_flow

FORMAT = 2  # 1: pickled config/meta/RNG objects (read only with trust); 2: tensors + plain values + JSON text
# What a checkpoint's config may name as the network it is rebuilt with (module prefixes of nn.Module classes).
ALLOWED_TARGETS = ("monai.networks.nets.", "monai.networks.schedulers.", "medaug.")
TRUST_HINT = "if you trust the file, pass trust_checkpoint=true"


class UntrustedCheckpointError(ValueError):
    """A checkpoint that could run code when loaded or built, refused (see ``trust_checkpoint``)."""


def locate(target: str):
    """The object named by a dotted path such as ``monai.networks.nets.DiffusionModelUNet``."""
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {target!r} named by _target_ in the config ({err})") from err


def last_checkpoint(train_dir: str | Path) -> Path:
    """Where a training run in ``train_dir`` keeps (and resumes from) its checkpoint: ``checkpoints/last.pt``."""
    return Path(train_dir) / "checkpoints" / "last.pt"


def network_from_spec(spec: Mapping, **overrides):
    """Build the object a ``{"_target_": ..., **kwargs}`` spec describes (keys starting with ``_`` other than
    the target, and medaug's ``condition`` and ``generates`` (:mod:`medaug.conditioning`), are ignored)."""
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_") and k not in SPEC_KEYS}
    kwargs.update(overrides)
    return locate(spec["_target_"])(**kwargs)


def check_unet_input(spec: Mapping, shape: Sequence[int], what: str = "image") -> None:
    """Refuse a spatial ``shape`` that a ``DiffusionModelUNet`` of ``spec`` cannot take: it halves the
    size once per level after the first, and its skip connections need every axis to halve evenly."""
    levels = len(spec.get("channels", ()))
    factor = 2 ** max(levels - 1, 0)
    if any(int(s) % factor for s in shape):
        raise ValueError(
            f"model.channels={list(spec['channels'])} halves the {what} {levels - 1}x, so each axis of "
            f"the {what} shape {list(shape)} must divide by {factor}; set data.image_size to "
            f"multiples of {factor}" + (" times the autoencoder's compression" if what == "latent" else "")
        )


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
        # frozen weights (a ControlNet's base UNet) are not averaged: they stay as they are
        pairs = [(e, p.detach()) for e, p in zip(self.model.parameters(), model.parameters()) if p.requires_grad]
        for e, p in pairs:  # same memory layout (channels_last), or foreach falls back to slow loops
            if e.stride() != p.stride():
                e.data = torch.empty_like(p).copy_(e.data)
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]
        self.decay = state["decay"]


def rng_state() -> dict:
    """The global generators' states as tensors and plain lists (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (or the tuples of a format-1 checkpoint)."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys).astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    """A loaded checkpoint; ``id`` is a short content hash of the file. ``trusted``: loaded with
    ``trust=True``, so its config may name any class to build (see :func:`checkpoint_network`)."""

    path: Path
    id: str
    step: int
    model: dict
    ema: dict
    optimizer: dict | None
    rng: dict | None
    config: dict
    meta: dict
    trusted: bool = False


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path, *, model, ema, optimizer, step, config, meta) -> Path:
    """Write a checkpoint atomically (temp file, then rename) and return its path. ``config`` and
    ``meta`` are plain containers, stored as JSON text. Temp files of killed writers of ``path`` are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "model": unwrap(model).state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "rng": rng_state(),
        "config": _to_json(config, "config"),
        "meta": _to_json(meta, "meta"),
    }
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
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


def _to_json(value, what: str) -> str:
    def plain(obj):  # numpy scalars and arrays become numbers and lists; anything else is refused
        if isinstance(obj, (np.generic, np.ndarray)):
            return obj.tolist()
        raise TypeError(f"checkpoint {what} holds a {type(obj).__name__} ({obj!r}); only plain values are stored")

    return json.dumps(value, default=plain)


def load_checkpoint(path: str | Path, trust: bool = False) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` onto the CPU, as data: ``torch.load(weights_only=True)``.

    A checkpoint written by an older medaug (pickled config and RNG objects) can run code when read, so it
    is refused unless ``trust`` (then it is read with ``weights_only=False``). ``trust`` also lets
    :func:`checkpoint_network` build a class outside :data:`ALLOWED_TARGETS`.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"{path}: is a folder; pass the checkpoint file in it as ckpt_path=<file.pt> "
            "(training writes train/checkpoints/last.pt)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train first or pass ckpt_path=<file.pt>")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # objects beyond tensors and plain values: pickle could run code
        if not trust:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            what = f"pickled Python objects ({found.group(1)})" if found else "something other than tensors"
            raise UntrustedCheckpointError(
                f"{path}: refused: it holds {what}, which can run code when loaded (an old-format medaug "
                f"checkpoint, or a crafted file); retrain, or {TRUST_HINT}"
            ) from None
        payload = _load_pickled(path)
    except Exception as err:
        raise ValueError(f"{path}: not a readable medaug checkpoint ({err})") from err
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not a medaug checkpoint (a {type(payload).__name__}, not a dict)")
    missing = {"model", "ema", "step", "config", "meta"} - set(payload)
    if missing:
        raise ValueError(f"{path}: not a medaug checkpoint (missing {sorted(missing)})")
    config, meta = (json.loads(v) if isinstance(v, str) else v for v in (payload["config"], payload["meta"]))
    return Checkpoint(
        path,
        file_id(path),
        payload["step"],
        payload["model"],
        payload["ema"],
        payload.get("optimizer"),
        payload.get("rng"),
        config,
        meta,
        trusted=trust,
    )


def _load_pickled(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{path}: not a readable medaug checkpoint ({err})") from err


def check_target(target, path: str | Path, key: str = "model._target_") -> None:
    """Refuse a ``_target_`` read from the checkpoint ``path`` unless it names an ``nn.Module`` class of
    :data:`ALLOWED_TARGETS` (MONAI networks and schedulers, medaug). Nothing outside those modules is
    imported to find out."""
    allowed = isinstance(target, str) and target.startswith(ALLOWED_TARGETS)
    if allowed:
        obj = locate(target)
        allowed = (
            inspect.isclass(obj) and issubclass(obj, nn.Module) and f"{obj.__module__}.".startswith(ALLOWED_TARGETS)
        )
    if not allowed:
        raise UntrustedCheckpointError(
            f"{path}: refused to build {key}={target!r} named by this checkpoint: only classes of "
            f"{', '.join(p.rstrip('.') for p in ALLOWED_TARGETS)} are built from a file; {TRUST_HINT}"
        )


def checkpoint_network(ckpt: Checkpoint, weights: str = "ema") -> nn.Module:
    """The network of a checkpoint rebuilt from its config's model spec, with its EMA (``ema``) or training
    (``model``) weights, in eval mode. The spec's ``_target_`` must pass :func:`check_target` unless the
    checkpoint was loaded with ``trust=True``."""
    spec = ckpt.config["model"]
    if not ckpt.trusted:
        check_target(spec.get("_target_"), ckpt.path)
    net = network_from_spec(spec)
    net.load_state_dict(ckpt.ema["model"] if weights == "ema" else ckpt.model)
    return net.eval()


def restore_training_state(ckpt: Checkpoint, model: nn.Module, ema: EMA, optimizer=None) -> None:
    """Load the weights, EMA weights, optimizer state and RNG states of ``ckpt`` into a resumed run."""
    model.load_state_dict(ckpt.model)
    ema.load_state_dict(ckpt.ema)
    if ckpt.optimizer and optimizer is not None:
        optimizer.load_state_dict(ckpt.optimizer)
    if ckpt.rng:
        set_rng_state(ckpt.rng)


def ema_network(ckpt: Checkpoint) -> nn.Module:
    """The EMA network of a checkpoint, rebuilt from its config, in eval mode (see :func:`checkpoint_network`)."""
    return checkpoint_network(ckpt, "ema")


def build_scheduler(spec: Mapping):
    """The training noise scheduler of a ``scheduler`` spec: a rectified flow (``scheduler=rflow``) checked key by
    key (:func:`medaug.flow.flow_kwargs`: keys of DDPM-type schedulers are refused by name), anything else as its
    ``_target_`` says."""
    if is_flow(spec):
        return locate(spec["_target_"])(**flow_kwargs(spec))
    return network_from_spec(spec)


def trained_space(autoencoder_id: str | None) -> str:
    """What a diffusion model trains on, in words for an error line: an autoencoder's latents, or pixels."""
    return f"the latents of autoencoder {autoencoder_id}" if autoencoder_id else "pixels"
