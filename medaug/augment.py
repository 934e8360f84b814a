"""Augmentation as a stage: a prepared dataset + a checkpoint → one mixed real + synthetic manifest.

A policy decides how many synthetic images each class gets (:func:`synthetic_counts`):

* ``per_class``: a fixed number per class (an int, or ``{class_name: count}``; the rule of ``sample``,
  :func:`medaug.sampling.class_counts`);
* ``balance``: bring every class up to the largest one (``max(real) - real[c]``);
* ``ratio``: ``round(ratio * real[c])`` synthetic images per class (1.0 doubles each class).

Output folder (synthetic images are stored like prepared items: model space [-1, 1],
NIfTI with the training affine, so real and synthetic items load the same way)::

    plan.json                        settings key, per-class counts, classes, geometry; written first
    chunks/chunk_00000/              one atomic folder per block of ``chunk_size`` samples
        synth_00000_<class>.nii.gz   sample i starts from the noise of ``seed + i``
        rows.json                    its manifest rows
        DONE
    manifest.csv                     real and synthetic items (``synthetic`` column); written last
    DONE

When an evaluation of samples from the same checkpoint exists (``metrics.json`` of ``medaug
evaluate``), :func:`check_utility` reads its augmentation gain: an interval (gain ± its standard
deviation over the evaluation's seeds) entirely below 0 means the synthetic images made the
downstream classifier worse, and the stage stops unless told to ignore it.

Running it again with the same settings does nothing; a run killed mid-way resumes at
the first missing chunk. Chunks are shared out by index (chunk c goes to rank
``c % world_size``, :func:`medaug.sampling.shard_chunks`, with the seeds of ``sample``) and aligned to
the batch size, so sharded runs write exactly the images a single process writes; whichever rank
completes the last chunk writes the manifest.

Example (the module is callable: ``medaug.augment(...)`` is :func:`augment`)::

    result = medaug.augment("outputs/demo_2d/prepared", "outputs/demo_2d/train/checkpoints/last.pt",
                            "outputs/demo_2d/augment", policy="balance")
    loader = monai.data.DataLoader(MixedDataset(result.out_dir), batch_size=16, shuffle=True)

Mask-conditioned checkpoints (``model.condition=mask|mask+class``, :mod:`medaug.conditioning`): synthetic image
``k`` of a class is made for a real mask of that class in the split (a seeded permutation of them, cycled),
written beside it as ``synth_<i>_<class>_mask.nii.gz``; the manifest then has a ``mask`` column (real items:
their prepared mask) and :class:`MixedDataset` yields ``"mask"`` too.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import Compose, LoadImaged, SqueezeDimd

from .conditioning import Conditioning
from .data import DatasetError, load_info, load_split_masks, read_manifest
from .atomic import atomic_file, atomic_folder, is_complete
from .io import write_nifti
from .model import file_id, load_checkpoint
from .pictures import save_grid
from .progress import progress_bar
from .runtime import distributed
from .tracking import flatten, tracked
from .sampling import (
    class_counts,
    generate_chunks,
    inference_scheduler,
    labels_for_counts,
    sample_images,
    samples_id,
    sampling_network,
    shard_chunks,
)

POLICIES = ("per_class", "balance", "ratio")
MANIFEST_FIELDS = [
    "item_id",
    "path",
    "label",
    "class_name",
    "split",
    "synthetic",
    "patient",
    "seed",
    "guidance_scale",
    "checkpoint_id",
]
PLAN_FORMAT = "medaug-augment/1"


@dataclass
class AugmentResult:
    """What an augment call found and did.

    ``synthetic``: planned synthetic count per class name; ``generated``: samples generated
    by this call (0 when the folder was already complete); ``complete``: the manifest exists.
    """

    out_dir: Path
    real: int
    synthetic: dict = field(default_factory=dict)
    generated: int = 0
    complete: bool = False
    rank: int = 0
    world_size: int = 1

    def describe(self) -> str:
        """One log line: what the folder holds, or what this rank did towards it."""
        total = sum(self.synthetic.values())
        if self.complete and self.generated == 0:
            return f"{self.out_dir} is up to date ({self.real} real + {total} synthetic items); nothing to do"
        if self.complete:
            return f"wrote {self.out_dir / 'manifest.csv'}: {self.real} real + {total} synthetic items {self.synthetic}"
        return (
            f"rank {self.rank}/{self.world_size} generated {self.generated} samples; "
            "the last rank to finish writes the manifest"
        )


def synthetic_counts(real_counts: Mapping[str, int], policy: str, num_per_class=None, ratio=None) -> dict[str, int]:
    """How many synthetic images each class gets under ``policy`` (see the module docstring).

    Args:
        real_counts: ``{class_name: real images}`` of the split being augmented, every class in label order.
        policy: ``per_class``, ``balance`` or ``ratio``.
        num_per_class: ``per_class``: an int or ``{class_name: count}`` (:func:`medaug.sampling.class_counts`).
        ratio: ``ratio``: synthetic images per real image, >= 0.

    Returns:
        ``{class_name: synthetic images}`` for every class of ``real_counts`` (a total of 0 is allowed).
    """
    if policy == "per_class":
        if num_per_class is None:
            raise ValueError("augment.policy=per_class needs augment.num_per_class (an int or {class_name: count})")
        return class_counts(num_per_class, list(real_counts), key="augment.num_per_class", allow_empty=True)
    if policy == "balance":
        top = max(real_counts.values())
        return {c: top - n for c, n in real_counts.items()}
    if policy == "ratio":
        if ratio is None or float(ratio) < 0:
            raise ValueError(f"augment.ratio={ratio}; give a number >= 0 (synthetic per real image of each class)")
        return {c: int(round(float(ratio) * n)) for c, n in real_counts.items()}
    raise ValueError(f"augment.policy={policy!r}; choose one of {list(POLICIES)}")


GAIN_KEY = "utility/aug_gain_acc"  # real + synthetic accuracy minus real only, on held-out real images


class UtilityCheck(NamedTuple):
    """What :func:`check_utility` found: ``note`` (a log line), ``negative`` (the gain's interval is below 0)."""

    note: str
    negative: bool = False


def check_utility(
    eval_dir: str | os.PathLike, samples_dir: str | os.PathLike, ckpt_path: str | os.PathLike, ignore: bool = False
) -> UtilityCheck:
    """Read the augmentation gain of the evaluation in ``eval_dir`` if it is one of samples (in
    ``samples_dir``) of the checkpoint ``ckpt_path``; say what was found.

    Raises ``ValueError`` (one line, naming the gain, its interval and the override) when the interval
    ``gain ± std`` of ``utility/aug_gain_acc`` lies entirely below 0, unless ``ignore``.
    """
    eval_dir, samples_dir = Path(eval_dir), Path(samples_dir)
    skip = "utility was not checked: "
    if not is_complete(eval_dir) or not (eval_dir / "metrics.json").is_file():
        return UtilityCheck(f"{skip}no evaluation in {eval_dir} (`medaug evaluate` measures the augmentation gain)")
    info_file, privacy_file = samples_dir / "info.json", eval_dir / "privacy.json"
    if not (is_complete(samples_dir) and info_file.is_file() and privacy_file.is_file()):
        return UtilityCheck(f"{skip}the samples that the evaluation in {eval_dir} scored are not in {samples_dir}")
    if json.loads(privacy_file.read_text()).get("samples_id") != samples_id(samples_dir):
        return UtilityCheck(f"{skip}the evaluation in {eval_dir} scored other samples than those in {samples_dir}")
    if json.loads(info_file.read_text()).get("checkpoint_id") != file_id(ckpt_path):
        return UtilityCheck(f"{skip}the evaluation in {eval_dir} is of samples of another checkpoint")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    gain, std = metrics.get(GAIN_KEY), metrics.get(f"{GAIN_KEY}_std")
    if gain is None or std is None:
        return UtilityCheck(f"{skip}the evaluation in {eval_dir} has no {GAIN_KEY} (evaluate.utility.seeds=[])")
    low, high = gain - std, gain + std
    found = f"{GAIN_KEY}={gain:+.3f}, interval [{low:+.3f}, {high:+.3f}] (evaluation in {eval_dir})"
    if high < 0 and not ignore:
        raise ValueError(
            f"synthetic images lowered held-out accuracy: {found}; augmenting with them would hurt a "
            "downstream model. Improve the model/samples and evaluate again, or set "
            "augment.ignore_utility=true to augment anyway"
        )
    if high < 0:
        return UtilityCheck(
            f"utility checked: negative gain {found}; augmenting anyway (augment.ignore_utility=true)", negative=True
        )
    return UtilityCheck(f"utility checked: {found}")


def _write_json(path: Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def _check_folder(out_dir: Path, key: str, overwrite: bool) -> None:
    """Accept an empty/missing folder or one holding this plan; clear another plan if ``overwrite``."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    plan_file = out_dir / "plan.json"
    same = plan_file.is_file() and json.loads(plan_file.read_text()).get("key") == key
    if same:
        return
    if not plan_file.is_file() and not overwrite:
        raise ValueError(f"{out_dir}: exists and is not an augment folder; choose another output folder")
    if not overwrite:
        raise ValueError(
            f"{out_dir}: holds an augmentation made with other settings; "
            "pass overwrite (augment.overwrite=true) or choose another output folder"
        )
    shutil.rmtree(out_dir)


def augment(
    input: str | os.PathLike,
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    policy: str = "balance",
    num_per_class=None,
    ratio: float | None = None,
    split: str = "train",
    guidance_scale: float = 2.0,
    sampler: str = "dpmpp_2m_sde",
    steps: int = 20,
    eta: float = 0.0,
    seed: int = 1234,
    batch_size: int = 16,
    chunk_size: int | None = None,
    use_ema: bool = True,
    rank: int | None = 0,
    world_size: int | None = 1,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    trust_checkpoint: bool = False,
) -> AugmentResult:
    """Add synthetic images to the ``split`` of the prepared dataset ``input`` and write ``out_dir``.

    ``chunk_size`` (default ``batch_size``) must be a multiple of ``batch_size``; this
    process generates the chunks ``c`` with ``c % world_size == rank``. ``on_chunk(c)`` is
    called after chunk ``c`` is written (progress hooks, tests). Images: model space
    [-1, 1], ``(1, *image_shape)`` per item. ``trust_checkpoint``: see :func:`medaug.model.load_checkpoint`.
    ``rank``/``world_size`` None: torchrun's (``$RANK``, ``$WORLD_SIZE``), else 0 and 1.
    """
    input, out_dir = Path(input), Path(out_dir)
    env_rank, _, env_world = distributed()
    rank, world_size = int(env_rank if rank is None else rank), int(env_world if world_size is None else world_size)
    chunk_size = int(chunk_size or batch_size)
    if batch_size < 1 or chunk_size % batch_size:
        raise ValueError(
            f"augment.chunk_size={chunk_size} must be a multiple of augment.batch_size={batch_size} "
            "(so every process draws the same batches)"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    info = load_info(input)
    real = [r for r in read_manifest(input) if r["split"] == split]
    if not real:
        raise DatasetError(f"{input}: split {split!r} has no items; choose augment.split=train|val|test")
    ckpt = load_checkpoint(ckpt_path, trust_checkpoint)
    trained_on = (list(ckpt.meta["class_names"]), list(ckpt.meta["image_shape"]))
    if trained_on != (list(info.class_names), list(info.image_shape)):
        raise ValueError(
            f"{ckpt_path}: trained on classes {trained_on[0]} of shape {trained_on[1]}, but {input} has "
            f"{info.class_names} of shape {info.image_shape}; use the matching checkpoint"
        )
    real_counts = {c: sum(r["class_name"] == c for r in real) for c in info.class_names}
    counts = synthetic_counts(real_counts, policy, num_per_class, ratio)
    labels = labels_for_counts(counts, info.class_names)
    cond = Conditioning.from_meta(ckpt.meta)
    masks = _real_masks(input, split, real, labels, cond, seed) if cond.uses_mask else None
    settings = dict(
        format=PLAN_FORMAT,
        dataset=info.fingerprint,
        split=split,
        checkpoint_id=ckpt.id,
        counts=counts,
        guidance_scale=float(guidance_scale),
        sampler=sampler,
        steps=int(steps),
        eta=float(eta),
        seed=int(seed),
        batch_size=int(batch_size),
        chunk_size=chunk_size,
        use_ema=bool(use_ema),
    )
    if masks is not None:
        settings["masks"] = "real"
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    result = AugmentResult(out_dir, len(real), counts, rank=rank, world_size=world_size)
    _check_folder(out_dir, key, overwrite)
    if is_complete(out_dir):
        result.complete = True
        return result
    (out_dir / "chunks").mkdir(parents=True, exist_ok=True)
    if not (out_dir / "plan.json").is_file():
        _write_json(
            out_dir / "plan.json",
            dict(
                key=key,
                settings=settings,
                class_names=info.class_names,
                spatial_dims=info.spatial_dims,
                image_shape=info.image_shape,
                window=info.window.as_dict(),
                affine=info.affine.tolist(),
            ),
        )

    chunks = shard_chunks(len(labels), chunk_size)
    chunk_dir = lambda c: out_dir / "chunks" / f"chunk_{c:05d}"
    mine = [
        ch for ch in shard_chunks(len(labels), chunk_size, rank, world_size) if not is_complete(chunk_dir(ch.index))
    ]
    for ch in mine:  # half-written chunks of a killed run (only this rank writes chunk c)
        for stale in (out_dir / "chunks").glob(f".chunk_{ch.index:05d}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
    if mine:
        net = sampling_network(ckpt, device, use_ema=use_ema, conditioned=masks is not None)
        scheduler = inference_scheduler(ckpt.config["scheduler"], sampler, steps)

        def generate(y: torch.Tensor, first_seed: int, m=None) -> torch.Tensor:  # (n,) labels -> (n, 1, *image_shape)
            return sample_images(
                net,
                scheduler,
                y,
                info.image_shape,
                guidance_scale=guidance_scale,
                null_class=len(info.class_names),
                seed=first_seed,
                batch_size=batch_size,
                eta=eta,
                amp_dtype=amp_dtype,
                progress=False,
                masks=m,
                conditioning=cond,
            )

        bar = progress_bar(mine, desc=f"augment (rank {rank})", unit="chunk", disable=not progress)
        for (c, start, stop), images in generate_chunks(generate, labels, bar, seed, masks):
            y = labels[start:stop]
            rows = []
            with atomic_folder(chunk_dir(c)) as tmp:
                for j, (image, label) in enumerate(zip(images, y.tolist())):
                    i = start + j
                    name = f"synth_{i:05d}_{info.class_names[label]}"
                    array = image[0].numpy()
                    write_nifti(
                        tmp / f"{name}.nii.gz",
                        array[..., None] if array.ndim == 2 else array,
                        info.affine,
                        descrip=f"SYNTHETIC medaug {info.class_names[label]}",
                    )
                    rows.append(
                        dict(
                            item_id=name,
                            path=f"chunks/{chunk_dir(c).name}/{name}.nii.gz",
                            label=label,
                            class_name=info.class_names[label],
                            split=split,
                            synthetic=True,
                            patient="",
                            seed=seed + i,
                            guidance_scale=float(guidance_scale),
                            checkpoint_id=ckpt.id,
                        )
                    )
                    if masks is not None:
                        mask = masks[i, 0].numpy()
                        write_nifti(
                            tmp / f"{name}_mask.nii.gz",
                            mask[..., None] if mask.ndim == 2 else mask,
                            info.affine,
                            dtype=np.uint8,
                        )
                        rows[-1]["mask"] = f"chunks/{chunk_dir(c).name}/{name}_mask.nii.gz"
                (tmp / "rows.json").write_text(json.dumps(rows, indent=2))
            result.generated += len(y)
            if on_chunk is not None:
                on_chunk(c)
    if all(is_complete(chunk_dir(ch.index)) for ch in chunks):
        _finish(out_dir, input, real, [chunk_dir(ch.index) for ch in chunks], masks is not None)
        result.complete = True
    return result


def _real_masks(
    prepared: Path, split: str, real: list[dict], labels: torch.Tensor, cond: Conditioning, seed: int
) -> torch.Tensor:
    """The mask of each synthetic sample ``(N, 1, *spatial)``: the ``k``-th of class ``c`` gets the real mask
    ``perm_c[k % n_c]`` of that class in ``split`` (``perm_c`` a permutation seeded from ``(seed, c)``)."""
    info = load_info(prepared)
    if dict(info.mask_labels) != dict(cond.mask_labels):
        raise ValueError(
            f"{prepared}: mask labels {info.mask_labels}, but the checkpoint was conditioned on "
            f"{dict(cond.mask_labels)}; augment the dataset it was trained on"
        )
    split_masks = load_split_masks(prepared, split)
    of_class = {c: [i for i, r in enumerate(real) if r["label"] == c] for c in range(len(info.class_names))}
    picks, taken = [], {}
    for c in labels.tolist():
        if not of_class[c]:
            raise ValueError(
                f"class {info.class_names[c]!r} has no real mask in split {split!r} for the mask-conditioned "
                "checkpoint; give it no synthetic images (augment.num_per_class) or augment another split"
            )
        perm = np.random.default_rng([seed, c]).permutation(len(of_class[c]))
        k = taken[c] = taken.get(c, -1) + 1
        picks.append(of_class[c][perm[k % len(perm)]])
    return split_masks[torch.tensor(picks, dtype=torch.long)] if picks else split_masks[:0]


def _finish(out_dir: Path, prepared: Path, real: list[dict], chunk_dirs: list[Path], masks: bool = False) -> None:
    """Write ``manifest.csv`` (real rows first, paths relative to ``out_dir``; with ``masks`` a ``mask``
    column), then ``DONE``."""
    rows = [
        dict(
            item_id=r["item_id"],
            path=os.path.relpath(prepared.resolve() / r["path"], out_dir.resolve()),
            label=r["label"],
            class_name=r["class_name"],
            split=r["split"],
            synthetic=False,
            patient=r["patient"],
        )
        for r in real
    ]
    if masks:
        for row, r in zip(rows, real):
            row["mask"] = os.path.relpath(prepared.resolve() / r["mask"], out_dir.resolve())
    for d in chunk_dirs:
        rows += json.loads((d / "rows.json").read_text())
    with atomic_file(out_dir / "manifest.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS + (["mask"] if masks else []), restval="")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "DONE").write_text("complete\n")


def read_mixed_manifest(folder: str | os.PathLike) -> list[dict]:
    """Rows of a complete augment folder's manifest; ``label`` int, ``synthetic`` bool, ``path`` absolute."""
    folder = Path(folder)
    if not is_complete(folder):
        raise DatasetError(f"{folder}: not a complete augment folder (no DONE marker); run `medaug augment` first")
    with open(folder / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["label"] = int(row["label"])
        row["synthetic"] = row["synthetic"] == "True"
        row["path"] = str((folder / row["path"]).resolve())
        if row.get("mask"):
            row["mask"] = str((folder / row["mask"]).resolve())
    return rows


class MixedDataset(Dataset):
    """A MONAI ``Dataset`` over an augment folder: items ``{"image": (1, *spatial) in [-1, 1],
    "label": int, "synthetic": bool}``, real and synthetic alike; with masks (a mask-conditioned
    checkpoint's augmentation) also ``"mask"``: the label map ``(1, *spatial)``.

    ``transform`` replaces the default loader chain (it receives ``{"image": path, ...}``);
    ``synthetic=False`` / ``real=False`` keep one kind only. Two lines for a MONAI script::

        ds = MixedDataset("outputs/demo_2d/augment")
        loader = monai.data.DataLoader(ds, batch_size=16, shuffle=True)
    """

    def __init__(self, folder: str | os.PathLike, transform=None, *, real: bool = True, synthetic: bool = True):
        folder = Path(folder)
        rows = [r for r in read_mixed_manifest(folder) if (synthetic if r["synthetic"] else real)]
        plan = json.loads((folder / "plan.json").read_text())
        self.class_names = plan["class_names"]
        self.spatial_dims = plan["spatial_dims"]
        keys = ["image", "mask"] if rows and rows[0].get("mask") else ["image"]
        if transform is None:
            with warnings.catch_warnings():  # MONAI announces its optional GPU DICOM decoder on every loader
                warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
                steps = [LoadImaged(keys=keys, image_only=True, ensure_channel_first=True)]
            if self.spatial_dims == 2:
                steps.append(SqueezeDimd(keys=keys, dim=3))  # (1, X, Y, 1) → (1, X, Y)
            transform = Compose(steps)
        data = [{"image": r["path"], "label": r["label"], "synthetic": r["synthetic"]} for r in rows]
        if "mask" in keys:
            for item, r in zip(data, rows):
                item["mask"] = r["mask"]
        super().__init__(data, transform)


def save_synthetic_grid(folder: str | os.PathLike, path: str | os.PathLike, per_class: int = 8) -> Path | None:
    """A PNG of a complete augment folder's synthetic images, one row per class (up to ``per_class``
    each; 3D: three mid-planes); None when the folder holds none."""
    ds = MixedDataset(folder, real=False)
    chosen: dict[int, list[int]] = {}
    for i, item in enumerate(ds.data):
        if len(chosen.setdefault(item["label"], [])) < per_class:
            chosen[item["label"]].append(i)
    picked = [i for rows in chosen.values() for i in rows]
    if not picked:
        return None
    images = torch.stack([torch.as_tensor(ds[i]["image"]) for i in picked])
    return save_grid(images, torch.tensor([ds.data[i]["label"] for i in picked]), ds.class_names, path)


def log_augment(tracker, result: AugmentResult, settings: Mapping, run_name: str, job: str) -> None:
    """The finished folder as MLflow run ``run_name``: the ``settings`` (the augment section, as tags), real and
    synthetic counts, ``plan.json`` and a grid of the synthetic images (not the manifest: its paths lead to the
    user's folders, and a folder name may hold a patient's name)."""
    with tracked(tracker, run_name=run_name, tags={"medaug.job": job}):
        tracker.set_tags(flatten(dict(settings), "augment."))
        synthetic = {f"augment/synthetic/{name}": n for name, n in result.synthetic.items()}
        tracker.log_metrics(
            {"augment/real": result.real, "augment/synthetic": sum(result.synthetic.values()), **synthetic}
        )
        tracker.log_artifact(result.out_dir / "plan.json", "augment")
        with tempfile.TemporaryDirectory() as tmp:
            grid = save_synthetic_grid(result.out_dir, Path(tmp) / "synthetic_grid.png")
            if grid is not None:
                tracker.log_artifact(grid, "augment")


class _CallableModule(types.ModuleType):
    """``medaug.augment(...)`` calls :func:`augment` while ``medaug.augment.MixedDataset`` stays reachable."""

    def __call__(self, *args, **kwargs) -> AugmentResult:
        return augment(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
