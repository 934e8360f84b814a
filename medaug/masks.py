"""Where the masks of mask-conditioned sampling come from (``sample.masks``).

* ``prepared:<split>``: the label maps of a split of the prepared dataset, each with its image's class
  (``mask_source`` = ``real``);
* a folder ``<folder>/<class_name>/*.nii.gz`` or a CSV with columns ``mask`` (path relative to the CSV) and
  ``class_name``: the user's own label maps (``user``), on the model's grid (as prepare writes them:
  the checkpoint's image shape, 2D as ``(X, Y)`` or ``(X, Y, 1)``), values among the model's labels;
* ``generate``: label maps drawn per class by a mask model (``model.generates=mask``, ``sample.mask_ckpt``),
  then the image model on each (``generated``).

Each mask is used ``sample.per_mask`` times (different noise each time).

Example::

    source = read_masks("prepared:val", class_names, image_shape=(32, 32), mask_labels=labels, prepared_dir=p)
    source.masks.shape, source.labels.shape, source.kind      # (N, 1, 32, 32), (N,), "real"
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from .conditioning import Conditioning, image_to_mask, num_labels
from .io import is_nifti
from .model import last_checkpoint

log = logging.getLogger("medaug")

MASK_SOURCES = ("user", "real", "generated")  # a samples manifest's mask_source


class MaskSource(NamedTuple):
    """Label maps ``(N, 1, *spatial)`` int64, their classes ``(N,)`` int64 and where they came from."""

    masks: torch.Tensor
    labels: torch.Tensor
    kind: str


def read_masks(
    source: str,
    class_names: Sequence[str],
    *,
    image_shape: Sequence[int],
    mask_labels: Mapping[str, int],
    prepared_dir: str | Path | None = None,
    per_mask: int = 1,
) -> MaskSource:
    """The masks ``source`` names (``prepared:<split>``, a folder or a CSV; see the module docstring), each
    repeated ``per_mask`` times. Raises ValueError / FileNotFoundError naming the offending file and the fix."""
    if per_mask < 1:
        raise ValueError(f"sample.per_mask={per_mask}; give an integer >= 1")
    if source.startswith("prepared:"):
        masks, labels, kind = *_prepared_masks(source, class_names, mask_labels, prepared_dir), "real"
    else:
        masks, labels, kind = *_user_masks(Path(source).expanduser(), class_names, image_shape), "user"
    if len(masks) == 0:
        raise ValueError(f"sample.masks={source} holds no masks; give at least one")
    if masks.shape[2:] != tuple(image_shape):
        raise ValueError(
            f"sample.masks={source}: masks of shape {list(masks.shape[2:])}, but the model makes images of "
            f"{list(image_shape)}; give masks on the model's grid (as prepare writes them)"
        )
    top = num_labels(mask_labels) - 1
    if masks.min() < 0 or masks.max() > top:
        raise ValueError(
            f"sample.masks={source}: mask values {int(masks.min())}..{int(masks.max())}, but the model knows "
            f"labels {dict(mask_labels)}; relabel the masks to 0..{top}"
        )
    return MaskSource(masks.repeat_interleave(per_mask, 0), labels.repeat_interleave(per_mask, 0), kind)


def _prepared_masks(source: str, class_names, mask_labels, prepared_dir) -> tuple[torch.Tensor, torch.Tensor]:
    from .data import SPLITS, load_info, load_split, load_split_masks

    split = source.split(":", 1)[1]
    if split not in SPLITS:
        raise ValueError(f"sample.masks={source}: split {split!r} unknown; use prepared:<{'|'.join(SPLITS)}>")
    if prepared_dir is None:
        raise ValueError(f"sample.masks={source} needs the prepared dataset (paths.prepared_dir)")
    info = load_info(prepared_dir)
    if list(info.class_names) != list(class_names) or dict(info.mask_labels) != dict(mask_labels):
        raise ValueError(
            f"sample.masks={source}: {prepared_dir} has classes {info.class_names} and labels {info.mask_labels}, "
            f"the model {list(class_names)} and {dict(mask_labels)}; point paths.prepared_dir at its training data"
        )
    masks = load_split_masks(prepared_dir, split)
    if masks is None:
        raise ValueError(f"sample.masks={source}: {prepared_dir} has no masks; prepare it with masks")
    return masks, load_split(prepared_dir, split)[1]


def _user_masks(source: Path, class_names, image_shape) -> tuple[torch.Tensor, torch.Tensor]:
    if source.is_file() and source.suffix == ".csv":
        with open(source, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or not {"mask", "class_name"} <= set(rows[0]):
            raise ValueError(f"{source}: a masks CSV needs columns mask, class_name (one row per mask)")
        entries = [
            (source.parent / r["mask"].strip(), r["class_name"].strip(), f"{source}:{i}")
            for i, r in enumerate(rows, start=2)
        ]
    elif source.is_dir():
        entries = [
            (p, d.name, str(p))
            for d in sorted(q for q in source.iterdir() if q.is_dir() and not q.name.startswith("."))
            for p in sorted(d.iterdir())
            if is_nifti(p)
        ]
        if not entries:
            raise ValueError(
                f"{source}: no masks found; put NIfTI label maps in one sub-folder per class "
                f"(<folder>/<class_name>/*.nii.gz), or list them in a CSV with columns mask, class_name"
            )
    else:
        raise FileNotFoundError(
            f"sample.masks={source}: not found; give a folder <folder>/<class_name>/*.nii.gz, a CSV "
            "(mask, class_name), prepared:<split> or generate"
        )
    masks, labels = [], []
    for path, name, where in entries:
        if name not in class_names:
            raise ValueError(f"{where}: class {name!r} unknown; the model's classes are {list(class_names)}")
        if not path.is_file():
            raise FileNotFoundError(f"{where}: mask {path} not found (paths are relative to the CSV)")
        array = np.asarray(nib.load(str(path)).dataobj)
        if len(image_shape) == 2 and array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if np.any(array != np.rint(array)):
            raise ValueError(f"{where}: {path} holds non-integer values; a mask is a label map of integers")
        masks.append(torch.from_numpy(array.astype(np.int64))[None])
        labels.append(list(class_names).index(name))
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) > 1:
        raise ValueError(f"{source}: masks of different shapes {sorted(shapes)}; give masks on the model's grid")
    return torch.stack(masks), torch.tensor(labels, dtype=torch.long)


def mask_labels(meta: Mapping, num_labels: int = 0) -> dict[str, int]:
    """The ``labels`` ({name: value}, background 0) that ``meta`` (a samples ``info.json`` or a prepared
    ``dataset.json``) records under ``mask_labels`` or ``labels``; else ``label_<k>`` for k < ``num_labels``."""
    labels = meta.get("mask_labels") or meta.get("labels")
    if isinstance(labels, Mapping) and labels and all(isinstance(v, int) for v in labels.values()):
        return {str(k): int(v) for k, v in sorted(labels.items(), key=lambda kv: kv[1])}
    return {"background": 0, **{f"label_{k}": k for k in range(1, num_labels)}}


def prepared_mask_labels(prepared_dir: str | Path, masks: torch.Tensor | None = None) -> dict[str, int]:
    """The prepared dataset's mask labels from its ``dataset.json`` (``label_<k>`` names for the values in
    ``masks`` when it records none)."""
    meta = json.loads((Path(prepared_dir) / "dataset.json").read_text())
    return mask_labels(meta, 0 if masks is None or masks.numel() == 0 else int(masks.max()) + 1)


def mask_model_dir(train_dir: str | Path) -> Path:
    """Where ``training.mask_model=true`` trains the mask model: ``<train_dir>/mask`` (its checkpoint
    ``checkpoints/last.pt`` there is the default ``sample.mask_ckpt``)."""
    return Path(train_dir) / "mask"


def mask_checkpoint(train_dir: str | Path) -> Path:
    """The mask model's checkpoint of a job whose image model trains in ``train_dir`` (``sample.mask_ckpt`` null)."""
    return last_checkpoint(mask_model_dir(train_dir))


def mask_model_overrides(paths: Mapping[str, str], name: str, experiment: str) -> dict:
    """The config changes that turn a job's train stage into its mask model's (``training.mask_model=true``): a
    class-conditional model of label maps, in pixel space, trained afresh into :func:`mask_model_dir` of the job's
    ``paths`` (resolved: the job's folders and MLflow experiment stay the job's although the run is named
    ``<name>-mask``)."""
    return {
        "model": {"condition": "class", "generates": "mask"},
        "paths": {**paths, "train_dir": str(mask_model_dir(paths["train_dir"]))},
        "tracking": {"experiment": experiment},
        "ckpt_path": None,
        "name": f"{name}-mask",
        "latent": {"autoencoder_ckpt": None},  # the mask model trains on pixels
    }


def mask_seed(seed: int, attempt: int = 0) -> int:
    """The seed of the generated masks of samples seeded from ``seed``: a stream apart from the images' noise;
    ``attempt`` k > 0: the stream of the k-th redraw of an implausible mask (:class:`MaskRange`)."""
    entropy = [seed, 2] if attempt == 0 else [seed, 2, attempt]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 2)


@dataclass(frozen=True)
class MaskRange:
    """What the training masks of each class show, per foreground label: how many connected components a mask
    has (``count``: ``{class: {label: (min, max)}}``) and how many voxels a component has (``size``, the same
    layout). A generated mask is plausible (:meth:`plausible`) when, for its class and every label, its component
    count is within the training range and each component's size within the training range widened by
    ``tolerance`` (0.5: from half the smallest to 1.5 times the largest). A class without training masks passes
    anything."""

    count: dict
    size: dict
    tolerance: float = 0.5

    @classmethod
    def of(cls, masks: torch.Tensor, labels: torch.Tensor, tolerance: float = 0.5) -> "MaskRange":
        """The ranges of label maps ``masks`` (N, 1, *spatial) with classes ``labels`` (N,)."""
        count: dict = {}
        size: dict = {}
        top = int(masks.max()) if masks.numel() else 0
        for m, y in zip(masks, labels.tolist()):
            for label in range(1, top + 1):
                sizes = component_sizes(m[0].numpy() == label)
                lo, hi = count.setdefault(y, {}).get(label, (len(sizes), len(sizes)))
                count[y][label] = (min(lo, len(sizes)), max(hi, len(sizes)))
                if sizes:
                    lo, hi = size.setdefault(y, {}).get(label, (min(sizes), max(sizes)))
                    size[y][label] = (min(lo, min(sizes)), max(hi, max(sizes)))
        return cls(count, size, tolerance)

    def plausible(self, masks: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """``(N,) bool``: which label maps ``masks`` (N, 1, *spatial) of classes ``labels`` (N,) are plausible."""
        ok = np.ones(len(masks), dtype=bool)
        for i, (m, y) in enumerate(zip(masks, labels.tolist())):
            if y not in self.count:
                continue
            present = set(torch.unique(m).tolist()) - {0}
            for label in set(self.count[y]) | present:
                sizes = component_sizes(m[0].numpy() == label)
                lo, hi = self.count[y].get(label, (0, 0))
                if not lo <= len(sizes) <= hi:
                    ok[i] = False
                    break
                if sizes:
                    s_lo, s_hi = self.size[y][label]
                    if min(sizes) < s_lo * (1 - self.tolerance) or max(sizes) > s_hi * (1 + self.tolerance):
                        ok[i] = False
                        break
        return ok


def component_sizes(region: np.ndarray) -> list[int]:
    """The voxel counts of the connected components (faces touching) of a boolean ``region`` (2D or 3D)."""
    components, n = ndimage.label(region)
    return np.bincount(components.ravel())[1:].tolist() if n else []


def check_mask_model(mask_meta: Mapping, image_meta: Mapping, path) -> int:
    """Refuse a mask checkpoint that does not fit the image model (classes, shape, labels); returns its label
    channels."""
    mask_cond, image_cond = Conditioning.from_meta(mask_meta), Conditioning.from_meta(image_meta)
    if mask_cond.generates != "mask":
        raise ValueError(
            f"sample.mask_ckpt={path} generates images, not masks; train a mask model with model.generates=mask"
        )
    for key in ("class_names", "image_shape"):
        if list(mask_meta[key]) != list(image_meta[key]):
            raise ValueError(
                f"sample.mask_ckpt={path} has {key} {mask_meta[key]}, the image model {image_meta[key]}; "
                "train the mask model on the image model's prepared dataset"
            )
    if dict(mask_cond.label_names) != dict(image_cond.mask_labels):
        raise ValueError(
            f"sample.mask_ckpt={path} generates labels {dict(mask_cond.label_names)}, the image model takes "
            f"{dict(image_cond.mask_labels)}; train both on one prepared dataset"
        )
    return num_labels(mask_cond.label_names)


def sampling_masks(
    source: str | None,
    conditioning: Conditioning,
    class_names: Sequence[str],
    image_shape: Sequence[int],
    *,
    prepared_dir: str | Path | None,
    per_mask: int = 1,
) -> MaskSource | None:
    """The masks ``sample.masks`` gives a model of ``conditioning``: a :class:`MaskSource` for
    ``prepared:<split>``, a folder or a CSV; None for ``generate`` (made chunk by chunk, see
    :func:`mask_generator`) and for a class-only model without ``source``.

    Raises ValueError when a mask-conditioned model gets no ``source``, a class-only one gets one, or for a
    checkpoint that generates masks (it is a ``sample.mask_ckpt``)."""
    if conditioning.generates == "mask":
        raise ValueError(
            "this checkpoint generates masks; use it as sample.mask_ckpt=<file> with sample.masks=generate and "
            "an image model's ckpt_path"
        )
    if not conditioning.uses_mask:
        if source:
            raise ValueError(
                f"sample.masks={source} is for mask-conditioned models (model.condition=mask|mask+class); this "
                "one is conditioned on the class only: drop sample.masks"
            )
        return None
    if not source:
        raise ValueError(
            f"this model is conditioned on masks ({conditioning.kind}); set sample.masks=generate (a mask model), "
            "prepared:<split>, a folder <folder>/<class_name>/*.nii.gz or a CSV (mask, class_name)"
        )
    if source == "generate":
        return None
    return read_masks(
        source,
        class_names,
        image_shape=image_shape,
        mask_labels=conditioning.mask_labels,
        prepared_dir=prepared_dir,
        per_mask=per_mask,
    )


class MaskGenerator(NamedTuple):
    """``make(labels (n,), seed of the first sample) -> label maps (n, 1, *spatial)``, the id of the mask
    model's checkpoint (recorded in the samples' provenance instead of its path) and ``redraws``: ``{sample index:
    how many times its mask was drawn again}`` for the masks the plausibility check (:class:`MaskRange`) refused
    (filled as masks are made; on this process's share of the samples)."""

    make: Callable[[torch.Tensor, int], torch.Tensor]
    checkpoint_id: str
    redraws: dict  # its own dict per generator (a default {} would be one dict shared by every generator)

    def __call__(self, labels: torch.Tensor, first: int) -> torch.Tensor:
        return self.make(labels, first)


def mask_generator(
    path: str | Path,
    image_meta: Mapping,
    device,
    *,
    seed: int,
    trust: bool = False,
    prepared_dir: str | Path | None = None,
    max_redraws: int = 0,
    **sample_kwargs,
) -> MaskGenerator:
    """``make(labels (n,), seed of the first sample) -> label maps (n, 1, *spatial)`` (a :class:`MaskGenerator`)
    from the mask model at ``path`` (checked against the image model's ``image_meta``, :func:`check_mask_model`).
    Sample ``i`` of the images seeded from ``seed + i`` gets the mask seeded from ``mask_seed(seed) + i``.
    ``max_redraws`` > 0 (``sample.mask_redraws``): a mask whose connected components fall outside what the
    training masks of its class in ``prepared_dir`` show (:class:`MaskRange`) is drawn again, up to that many
    times, its k-th redraw seeded from ``mask_seed(seed, k) + i`` (the same masks for any batch size); one still
    implausible then is kept (the count says so). ``sample_kwargs``: ``sampler``, ``steps``, ``use_ema`` and what
    :func:`medaug.sampling.sample_images` takes (guidance_scale, batch_size, eta, clip_x0, amp_dtype)."""
    from .model import load_checkpoint
    from .sampling import inference_scheduler, sample_images, sampling_network

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sample.mask_ckpt={path}: no mask model; train one with `medaug train training.mask_model=true` (or "
            "model.generates=mask paths.train_dir=<its folder>), or give sample.masks=prepared:<split>"
        )
    ckpt = load_checkpoint(path, trust)
    channels = check_mask_model(ckpt.meta, image_meta, path)
    net = sampling_network(ckpt, device, use_ema=sample_kwargs.pop("use_ema", True), conditioned=True)
    scheduler = inference_scheduler(ckpt.config["scheduler"], sample_kwargs.pop("sampler"), sample_kwargs.pop("steps"))
    names = ckpt.meta["class_names"]
    reference = _mask_range(prepared_dir) if max_redraws > 0 else None
    redraws: dict[int, int] = {}

    def draw(labels: torch.Tensor, start: int, attempt: int = 0) -> torch.Tensor:  # start: the first's sample index
        x = sample_images(
            net,
            scheduler,
            labels,
            ckpt.meta["image_shape"],
            null_class=len(names),
            seed=mask_seed(seed, attempt) + start,
            channels=channels,
            progress=False,
            **sample_kwargs,
        )
        return image_to_mask(x)

    def make(labels: torch.Tensor, first: int) -> torch.Tensor:
        masks = draw(labels, first - seed)
        if reference is None:
            return masks
        for attempt in range(1, max_redraws + 1):
            bad = np.flatnonzero(~reference.plausible(masks, labels))
            for j in bad.tolist():  # one at a time: each redraw's seed is its sample's own
                masks[j] = draw(labels[j : j + 1], first - seed + j, attempt)[0]
                redraws[first - seed + j] = attempt
            if not len(bad):
                break
        return masks

    return MaskGenerator(make, ckpt.id, redraws)


def _mask_range(prepared_dir: str | Path | None) -> MaskRange | None:
    """The :class:`MaskRange` of the train split's masks of ``prepared_dir``; None (with a warning) without them."""
    from .data import load_split, load_split_masks

    masks = load_split_masks(prepared_dir, "train") if prepared_dir and Path(prepared_dir).is_dir() else None
    if masks is None:
        log.warning(
            "sample.mask_redraws: no training masks in %s to check generated masks against; no check", prepared_dir
        )
        return None
    return MaskRange.of(masks, load_split(prepared_dir, "train")[1])
