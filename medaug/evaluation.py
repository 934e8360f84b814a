"""The evaluate stage: synthetic images + held-out real data -> realism, utility and privacy metrics and the
evaluation folder.

    settings = EvalSettings.from_dict({"classifier_steps": 400, "privacy": {"max_copy_rate": 0.05}})
    result = evaluate("out/samples", "out/prepared", "out/eval", settings, torch.device("cpu"))
    result.metrics["fidelity/fd"], result.verdict          # 12.3, "pass"

The folder (written atomically, ``DONE`` last) holds ``metrics.json`` (NaN as null), ``privacy.json`` (verdict,
reasons, copy threshold, feature extractors, the id of the samples evaluated), ``per_sample.csv`` (copy score and
nearest training item per synthetic sample; export's copy filter reads these), ``report.md`` and the pictures.

The real-trained classifiers (label fidelity, default encoder, 2.5D encoder) are cached beside that folder in
``<eval folder>_classifiers/`` (:func:`classifier_cache_dir`), named by their settings and a digest of the images
they were trained on: a re-evaluation, which replaces the eval folder as a whole, reuses them, a re-prepared train
split with other images trains new ones, and the prepared folder is never written to.

Segmentation: when the prepared dataset has masks and the samples carry the masks they were made with
(:mod:`medaug.masks`), also mask fidelity and segmentation utility (:mod:`medaug.metrics.segmentation`,
``segmentation/...``; the real-trained fidelity segmenter is cached with the classifiers) and the memorisation
audit of the generated masks (``privacy/mask_...``; a mask copied from a training mask fails the verdict like a
copied image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .data import load_info, load_split, read_manifest
from .latent import latent_space_of
from .atomic import atomic_file, atomic_folder
from .metrics import (
    FeatureExtractor,
    PlaneFeatureExtractor,
    fidelity_metrics,
    load_weights,
    make_classifier,
    realism_metrics,
    slices_for_training,
    train_classifier,
    utility_metrics,
)
from .conditioning import Conditioning
from .data import load_split_masks
from .masks import prepared_mask_labels
from .membership import MIASettings, find_checkpoint, membership_audit
from .metrics.segmentation import fidelity_dice, make_segmenter, segmentation_utility, train_segmenter
from .model import build_scheduler, checkpoint_network, load_checkpoint, network_from_spec
from .privacy import VERDICT_CODES, PrivacyAudit, PrivacyFlags, privacy_audit, write_per_sample
from .report import segmentation_section, write_pictures, write_report
from .sampling import load_sample_masks
from .sampling import load_samples, samples_id

log = logging.getLogger("medaug")


@dataclass(frozen=True)
class EncoderSettings:
    """Features for FD/KID/precision/recall/density/coverage and embedding-space privacy (``evaluate.encoder``)."""

    weights: Path | None = None  # None: the classifier trained on the real train split
    network: dict | None = None  # with weights: the network they belong to, {_target_: ..., **arguments}
    channels: int = 1  # repeat the grey image to this many input channels
    planes_25d: bool = True  # 3D only: also the 2.5D features (mid-plane slices through a 2D encoder)


@dataclass(frozen=True)
class UtilitySettings:
    """Train-on-real / synthetic / both classifiers (``evaluate.utility``); no ``seeds``: no utility metrics."""

    seeds: tuple[int, ...] = (0, 1)
    steps: int = 400
    batch_size: int = 32


@dataclass(frozen=True)
class PrivacySettings:
    """The memorisation audit (``evaluate.privacy``): copy-score space and threshold percentile, and the flags."""

    space: str = "pixel"  # pixel | embedding
    percentile: float = 95.0  # copy threshold = this percentile of held-out -> train highest correlations
    max_copy_rate: float = 0.10
    max_closer_share: float = 0.55
    min_dcr_ratio: float = 0.9
    alpha: float = 0.05
    max_mia_auc: float = 0.6  # membership inference: fail above (when its 95 % CI excludes 0.5)

    @property
    def flags(self) -> PrivacyFlags:
        return PrivacyFlags(self.max_copy_rate, self.max_closer_share, self.min_dcr_ratio, self.alpha, self.max_mia_auc)


@dataclass(frozen=True)
class SegmentationSettings:
    """Segmenters of the segmentation metrics (``evaluate.segmentation``), used when the prepared dataset and the
    samples both have masks: ``steps`` per segmenter; ``seeds``: one per seed and training set for the utility
    (none: no segmentation utility; mask fidelity uses ``evaluate.seed``)."""

    steps: int = 200
    seeds: tuple[int, ...] = (0, 1)
    batch_size: int = 16


@dataclass(frozen=True)
class EvalSettings:
    """Everything :func:`evaluate` is told, one field per key of the ``evaluate`` config section."""

    real_split: tuple[str, ...] = ("val", "test")  # held-out real split(s), concatenated
    classifier_steps: int = 400
    n_pairs: int = 64  # random pairs per class for MS-SSIM diversity
    seed: int = 0
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    fidelity: dict = field(default_factory=dict)  # fidelity_metrics keywords: pr_k, dc_k, kid_subsets, ...
    utility: UtilitySettings = field(default_factory=UtilitySettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    mia: MIASettings = field(default_factory=MIASettings)  # membership inference on the checkpoint
    segmentation: SegmentationSettings = field(default_factory=SegmentationSettings)
    pairs_top: int = 16  # suspicious synthetic samples drawn beside their nearest training image

    @classmethod
    def from_dict(cls, section: dict) -> EvalSettings:
        """From the plain (resolved) ``evaluate`` section of a config; missing keys take the defaults, an unknown
        key is a ValueError, and a relative ``encoder.weights`` is relative to the working directory."""
        s = dict(section)
        split = s.get("real_split", cls.real_split)
        s["real_split"] = (split,) if isinstance(split, str) else tuple(str(x) for x in split)
        encoder = dict(s.get("encoder") or {})
        encoder["weights"] = Path(str(encoder["weights"])).expanduser().resolve() if encoder.get("weights") else None
        s["encoder"] = _settings(EncoderSettings, encoder, "evaluate.encoder")
        utility = dict(s.get("utility") or {})
        utility["seeds"] = tuple(int(x) for x in utility.get("seeds") or ())
        s["utility"] = _settings(UtilitySettings, utility, "evaluate.utility")
        s["privacy"] = _settings(PrivacySettings, s.get("privacy") or {}, "evaluate.privacy")
        s["mia"] = MIASettings.from_dict(s.get("mia"))
        seg = dict(s.get("segmentation") or {})
        seg["seeds"] = tuple(int(x) for x in seg.get("seeds") or ())
        s["segmentation"] = _settings(SegmentationSettings, seg, "evaluate.segmentation")
        s["fidelity"] = dict(s.get("fidelity") or {})
        return _settings(cls, s, "evaluate")


def _settings(kind: type, values: dict, where: str):
    """``kind(**values)``, refusing a key ``kind`` does not have with one line naming it."""
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown setting; {where} has {', '.join(sorted(known))}")
    return kind(**values)


class EvalResult(NamedTuple):
    """What :func:`evaluate` found: ``metrics`` (``fidelity/...``, ``privacy/...``; NaN where undefined), the
    privacy ``verdict`` (pass | warn | fail) and its ``reasons``, the feature ``extractors`` used, the folder
    written and the MLflow run of the samples (None when they were not tracked)."""

    metrics: dict[str, float]
    verdict: str
    reasons: list[str]
    extractors: list[str]
    out_dir: Path
    mlflow_run_id: str | None


@dataclass
class EvalData:
    """The images an evaluation compares, all ``(N, 1, *spatial)`` in [-1, 1] on the host, labels ``(N,)``."""

    synth_x: torch.Tensor
    synth_y: torch.Tensor
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor  # the held-out real images
    test_y: torch.Tensor
    class_names: list[str]
    spatial_dims: int
    train_items: list[dict]  # manifest rows of the train split, in order
    sample_index: list[int]  # the samples manifest's index of each synthetic image
    info: dict  # the samples' info.json
    masks: SegData | None = None  # when the dataset and the samples both have masks


@dataclass
class SegData:
    """The label maps ``(N, 1, *spatial)`` int64 of the images of :class:`EvalData`, their ``labels``
    ({name: value}, background 0), each synthetic mask's ``source`` (user | generated | real) and the voxel
    ``spacing`` in mm."""

    synth: torch.Tensor
    train: torch.Tensor
    test: torch.Tensor
    labels: dict[str, int]
    source: list[str]
    spacing: tuple[float, ...]


def held_out(root: Path, splits) -> tuple[torch.Tensor, torch.Tensor]:
    """The real images of one split name or a list of them (patients never trained on), concatenated."""
    splits = [splits] if isinstance(splits, str) else [str(s) for s in splits]
    parts = [load_split(root, s) for s in splits]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if len(x) < 2:
        raise ValueError(
            f"{root}: held-out split(s) {splits} hold {len(x)} images; at least 2 are needed "
            "(set evaluate.real_split=[val,test] or prepare with a larger split)"
        )
    return x, y


def load_seg_data(samples_dir: Path, prepared_dir: Path, real_split, rows: list[dict], info: dict) -> SegData | None:
    """The masks of the samples (``rows``: their manifest, ``info``: their ``info.json``) and of the train and
    held-out splits; None unless both the samples and the prepared dataset have masks (a warning when only one side
    has them). Their labels must agree."""
    synth = load_sample_masks(samples_dir)
    train = load_split_masks(prepared_dir, "train")
    if synth is None or train is None:
        if synth is not None or train is not None:
            log.warning(
                "%s has masks but %s has none: no segmentation metrics",
                *((samples_dir, prepared_dir) if synth is not None else (prepared_dir, samples_dir)),
            )
        return None
    splits = [real_split] if isinstance(real_split, str) else list(real_split)
    test = torch.cat([load_split_masks(prepared_dir, str(s)) for s in splits])
    prepared = load_info(prepared_dir)
    spacing = np.linalg.norm(np.asarray(prepared.affine)[:3, :3], axis=0)[: prepared.spatial_dims]
    labels = prepared_mask_labels(prepared_dir, train)
    named = info.get("mask_labels")
    if (named and dict(named) != labels) or (len(synth) and int(synth.max()) >= len(labels)):
        raise ValueError(
            f"{samples_dir}: the samples' masks are labelled {named or 'values up to ' + str(int(synth.max()))} but "
            f"{prepared_dir} has {labels}; evaluate samples of a model trained on this dataset"
        )
    source = [str(r.get("mask_source", "")) for r in rows]
    return SegData(synth, train, test, labels, source, tuple(float(v) for v in spacing))


def load_eval_data(samples_dir: Path, prepared_dir: Path, real_split) -> EvalData:
    """The samples of ``samples_dir`` and the train and held-out real images of ``prepared_dir`` (and their masks,
    when both have masks); their class names must agree."""
    synth_x, synth_y, rows, info = load_samples(samples_dir)
    prepared = load_info(prepared_dir)
    names = prepared.class_names
    if names != info["class_names"]:
        raise ValueError(f"samples have classes {info['class_names']} but {prepared.root} has {names}")
    train_x, train_y = load_split(prepared.root, "train")
    test_x, test_y = held_out(prepared.root, real_split)
    train_items = [r for r in read_manifest(prepared.root) if r["split"] == "train"]
    sample_index = [int(r.get("index", i)) for i, r in enumerate(rows)]  # one manifest row per sample
    return EvalData(
        synth_x,
        synth_y,
        train_x,
        train_y,
        test_x,
        test_y,
        names,
        prepared.spatial_dims,
        train_items,
        sample_index,
        info,
        load_seg_data(samples_dir, prepared.root, real_split, rows, info),
    )


def classifier_cache_dir(out_dir: str | os.PathLike) -> Path:
    """Where the classifiers of the evaluation written to ``out_dir`` are cached: ``<out_dir>_classifiers/``,
    beside it, so that the atomic rewrite of ``out_dir`` keeps them and its files stay the evaluation's own."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}_classifiers")


def cached_classifier(
    cache_dir: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int,
    seed: int,
    device: torch.device,
    kind: str = "label",
) -> torch.nn.Module:
    """A classifier trained on ``images`` (N, 1, *spatial) / ``labels`` (N,), on ``device``, trained once per
    training set and setting and cached in ``cache_dir`` (``kind`` names it: ``label`` for the train images,
    ``slice`` for their 2D plane slices, the 2.5D encoder)."""
    cache = Path(cache_dir) / f"{kind}_clf_s{steps}_seed{seed}_{_digest(images, labels, num_classes)}.pt"
    return _cached_model(
        cache,
        lambda: make_classifier(images.shape[2:], num_classes),
        lambda: train_classifier(images, labels, num_classes, steps=steps, seed=seed, device=device),
        device,
    )


def cached_segmenter(
    cache_dir: Path,
    images: torch.Tensor,
    masks: torch.Tensor,
    num_labels: int,
    settings: SegmentationSettings,
    seed: int,
    device: torch.device,
) -> torch.nn.Module:
    """The segmenter of mask fidelity (:func:`medaug.metrics.segmentation.train_segmenter` on the real train
    ``images`` and ``masks``), on ``device``, trained once per training set and setting and cached in ``cache_dir``
    like the classifiers."""
    s = settings
    cache = Path(cache_dir) / f"seg_unet_s{s.steps}_b{s.batch_size}_seed{seed}_{_digest(images, masks, num_labels)}.pt"
    return _cached_model(
        cache,
        lambda: make_segmenter(images.shape[2:], num_labels),
        lambda: train_segmenter(images, masks, num_labels, s.steps, s.batch_size, seed=seed, device=device),
        device,
    )


def _digest(images: torch.Tensor, targets: torch.Tensor, num_outputs: int) -> str:
    """16 hex digits of a digest of a training set (images, their labels or masks) and its number of outputs."""
    digest = hashlib.sha256(repr((tuple(images.shape), num_outputs)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(targets.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _cached_model(cache: Path, build, train, device: torch.device) -> torch.nn.Module:
    """The network ``build()`` with the weights in ``cache`` when it exists, else ``train()``'s, saved there."""
    if cache.exists():
        model = build()
        model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        return model.to(device).eval()
    model = train()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(cache) as tmp:  # a killed run leaves no half-written network
        torch.save(model.state_dict(), tmp)
    return model


def encoder_of(settings: EvalSettings, clf: torch.nn.Module, device: torch.device) -> FeatureExtractor:
    """The user's network and weights when ``settings.encoder.weights`` is set, else the real-trained ``clf``."""
    enc = settings.encoder
    if enc.weights is None:
        return FeatureExtractor(
            clf,
            f"medaug DenseNet classifier trained on the real train split "
            f"({settings.classifier_steps} steps, seed {settings.seed}), penultimate pooled "
            "features",
        )
    if not enc.network:
        raise ValueError(
            "evaluate.encoder.weights is set but evaluate.encoder.network is not; give the network's "
            "_target_ and arguments, e.g. {_target_: monai.networks.nets.DenseNet121, ...}"
        )
    net = load_weights(network_from_spec(dict(enc.network)), enc.weights).to(device)
    digest = hashlib.sha256(enc.weights.read_bytes()).hexdigest()[:12] if enc.weights.is_file() else "?"
    return FeatureExtractor(
        net,
        f"user encoder {enc.network['_target_']} (weights sha256 {digest}), penultimate features",
        channels=int(enc.channels),
    )


def compute_metrics(
    data: EvalData, settings: EvalSettings, device: torch.device, cache_dir: Path, mia: dict | None = None
) -> tuple[dict[str, float], PrivacyAudit, list[str]]:
    """Realism (label fidelity, diversity), fidelity (also 2.5D for volumes), privacy and utility metrics of
    ``data``; ``mia``: the membership-inference metrics (:func:`membership`), which join the privacy verdict.
    Returns ``(metrics, privacy audit, feature extractor descriptions)``."""
    d, s, k, names = data, settings, len(data.class_names), data.class_names
    clf = cached_classifier(cache_dir, d.train_x, d.train_y, k, s.classifier_steps, s.seed, device)
    encoder = encoder_of(s, clf, device)
    extractors = [encoder.description]
    metrics = realism_metrics(
        clf, d.train_x, d.train_y, d.test_x, d.test_y, d.synth_x, d.synth_y, names, n_pairs=s.n_pairs, seed=s.seed
    )
    fkw = dict(s.fidelity, seed=s.seed)
    metrics.update(fidelity_metrics(encoder(d.test_x), d.test_y, encoder(d.synth_x), d.synth_y, names, **fkw))
    if d.spatial_dims == 3 and s.encoder.planes_25d:
        sx, sy = slices_for_training(d.train_x, d.train_y)
        clf2d = cached_classifier(cache_dir, sx, sy, k, s.classifier_steps, s.seed, device, kind="slice")
        planes = PlaneFeatureExtractor(
            FeatureExtractor(
                clf2d,
                f"medaug 2D DenseNet trained on plane slices of the real train volumes ({s.classifier_steps} steps)",
            )
        )
        extractors.append(planes.description)
        metrics.update(
            fidelity_metrics(planes(d.test_x), d.test_y, planes(d.synth_x), d.synth_y, names, suffix="_25d", **fkw)
        )
    p = s.privacy
    audit = privacy_audit(
        d.synth_x,
        d.train_x,
        d.test_x,
        [r["patient"] for r in d.train_items],
        encoder,
        space=p.space,
        percentile=p.percentile,
        flags=p.flags,
        synth_labels=d.synth_y,
        class_names=names,
        seed=s.seed,
        extra=mia,
    )
    metrics.update(audit.metrics)
    if s.utility.seeds:
        metrics.update(
            utility_metrics(
                d.train_x,
                d.train_y,
                d.synth_x,
                d.synth_y,
                d.test_x,
                d.test_y,
                k,
                seeds=list(s.utility.seeds),
                steps=s.utility.steps,
                batch_size=s.utility.batch_size,
                train_fn=partial(train_classifier, device=device),
            ).metrics()
        )
    return metrics, audit, extractors


def membership(
    data: EvalData,
    settings: EvalSettings,
    ckpt_path: Path | None,
    device: torch.device,
    trust: bool = False,
    wanted: str | None = None,
) -> tuple[dict[str, float], dict]:
    """The membership-inference attack (:mod:`medaug.membership`) on the checkpoint the samples came from: the
    train split's images against the held-out ones (a mask-conditioned model's with their real masks as its
    condition). ``ckpt_path`` is where to look (that file, or one beside it with the samples' checkpoint id;
    ``wanted``: another id, e.g. the samples' mask model's, attacked on the real masks). Returns ``(privacy/mia_*
    metrics, what privacy.json records of it)``; ``({}, {"run": False, ...})`` when it is switched off or, with
    ``enabled: auto``, the checkpoint is not found."""
    mia = settings.mia
    if mia.enabled is False:
        return {}, {"run": False, "why": "evaluate.mia.enabled=false"}
    wanted = wanted or data.info.get("checkpoint_id")
    found = find_checkpoint(ckpt_path, wanted)
    if found is None:
        why = f"the samples' checkpoint {wanted} is not {ckpt_path} nor beside it (trained on since?)"
        if mia.enabled is True:
            raise FileNotFoundError(f"evaluate.mia.enabled=true but {why}; pass ckpt_path=<that checkpoint>")
        log.warning("membership inference not run: %s; pass ckpt_path=<the samples' checkpoint>", why)
        return {}, {"run": False, "why": why}
    ckpt = load_checkpoint(found, trust)
    cond = Conditioning.from_meta(ckpt.meta)
    masks = data.masks
    if cond != Conditioning() and masks is None:
        why = f"the checkpoint is a {cond.kind} model generating {cond.generates}s, and the real masks are missing"
        log.warning("membership inference not run: %s", why)
        return {}, {"run": False, "why": why}
    net = checkpoint_network(ckpt, "ema").to(device)
    space = latent_space_of(ckpt.meta, device, trust) if cond.generates == "image" else None  # None: pixel space
    with_masks = cond != Conditioning()
    metrics = membership_audit(
        net,
        build_scheduler(ckpt.config["scheduler"]),
        (data.train_x, data.train_y, *([masks.train] if with_masks else [])),
        (data.test_x, data.test_y, *([masks.test] if with_masks else [])),
        data.class_names,
        mia,
        seed=settings.seed,
        encode=None if space is None else space.encode,
        conditioning=cond,
    )
    return metrics, {
        "run": True,
        "checkpoint_id": ckpt.id,
        "checkpoint_step": ckpt.step,
        "condition": cond.kind,
        "generates": cond.generates,
        **asdict(mia),
    }


def mask_model_membership(
    data: EvalData, settings: EvalSettings, mask_ckpt_path: Path | None, device: torch.device, trust: bool = False
) -> tuple[dict[str, float], dict]:
    """The membership attack on the mask model that drew the samples' generated masks (its id in the samples'
    ``info.json``, ``sample.mask_ckpt``; looked for at ``mask_ckpt_path`` or beside it), on the real train masks
    against the held-out ones: :func:`membership`'s metrics and record; ``({}, {"run": False, ...})`` when the
    samples' masks were not generated or that mask model is not found (a warning, never an error)."""
    wanted = (data.info.get("sample") or {}).get("mask_ckpt")
    if data.masks is None or "generated" not in data.masks.source or not wanted or settings.mia.enabled is False:
        return {}, {"run": False, "why": "no generated masks, or evaluate.mia.enabled=false"}
    if find_checkpoint(mask_ckpt_path, wanted) is None:
        why = f"the samples' mask model {wanted} is not {mask_ckpt_path} nor beside it"
        log.warning("membership inference on the mask model not run: %s; pass sample.mask_ckpt=<it>", why)
        return {}, {"run": False, "why": why}
    return membership(data, settings, mask_ckpt_path, device, trust, wanted=wanted)


def mia_context(record: dict) -> str:
    """The report's line on the membership-inference attack, from what :func:`membership` recorded."""
    if not record.get("run"):
        return f"not run: {record.get('why', 'no record')}"
    on = "" if record.get("condition", "class") == "class" else " with each image's real mask as the condition"
    if record.get("generates") == "mask":
        on = " of the mask model, on the real masks"
    return (
        f"loss attack{on} on checkpoint {record['checkpoint_id']} (step {record['checkpoint_step']}), timesteps "
        f"{list(record['timesteps'])} of the schedule x noise seeds {list(record['seeds'])}, up to "
        f"{record['max_per_class']} train and held-out images per class"
    )


def segmentation_metrics(
    data: EvalData, settings: EvalSettings, device: torch.device, cache_dir: Path, mask_mia: dict | None = None
) -> tuple[dict[str, float], PrivacyAudit | None, np.ndarray | None]:
    """Mask fidelity, segmentation utility (``segmentation/...``) and the memorisation audit of the non-empty
    generated masks, calibrated on the non-empty held-out real masks (``privacy/mask_...``; None when no non-empty
    mask was generated or fewer than 2 held-out masks have a label) of ``data.masks``, with each sample's mask copy
    score (N,) (NaN where its mask was not audited; None without the audit) for ``per_sample.csv``. ``mask_mia``:
    the membership attack on the mask model (:func:`mask_model_membership`), which joins the mask audit
    (``privacy/mask_mia_auc`` ...)."""
    d, m, seg = data, data.masks, settings.segmentation
    k = max(m.labels.values()) + 1
    segmenter = cached_segmenter(cache_dir, d.train_x, m.train, k, seg, settings.seed, device)
    metrics = fidelity_dice(segmenter, d.synth_x, m.synth, d.test_x, m.test, m.labels)
    if seg.seeds:
        metrics.update(
            segmentation_utility(
                (d.train_x, m.train),
                (d.synth_x, m.synth),
                (d.test_x, m.test),
                m.labels,
                seeds=seg.seeds,
                steps=seg.steps,
                batch_size=seg.batch_size,
                spacing=m.spacing,
                train_fn=partial(train_segmenter, device=device),
            ).metrics()
        )
    # empty masks carry nothing to copy (and correlate 0 with everything): audited are the non-empty ones
    generated = torch.tensor([s == "generated" for s in m.source], dtype=torch.bool) & m.synth.flatten(1).any(1)
    heldout = m.test[m.test.flatten(1).any(1)]
    if not generated.any():
        return metrics, None, None
    if len(heldout) < 2:
        log.warning(
            "%d held-out real masks with a label: too few to calibrate the mask copy audit; skipped", len(heldout)
        )
        return metrics, None, None
    p = settings.privacy
    audit = privacy_audit(
        m.synth[generated].float(),
        m.train.float(),
        heldout.float(),
        [r["patient"] for r in d.train_items],
        space="pixel",
        percentile=p.percentile,
        flags=p.flags,
        synth_labels=d.synth_y[generated],
        class_names=d.class_names,
        seed=settings.seed,
        extra=mask_mia,
    )
    metrics.update({k.replace("privacy/", "privacy/mask_", 1): v for k, v in audit.metrics.items()})
    per_sample = np.full(len(m.synth), np.nan)
    per_sample[generated.numpy()] = audit.scores.score
    return metrics, audit, per_sample


def privacy_summary(audit: PrivacyAudit, mask_audit: PrivacyAudit | None, metrics: dict[str, float]) -> dict:
    """``privacy.json``: the image audit's summary; with a mask audit also its summary under ``mask``, its
    checks and flags (prefixed ``masks:``) added and the worse verdict of the two (``privacy/verdict_code`` in
    ``metrics`` updated to it)."""
    summary = audit.summary()
    if mask_audit is None:
        return summary
    summary["mask"] = mask_audit.summary()
    summary["checks"] = summary["checks"] + [f"masks: {c}" for c in mask_audit.checks]
    summary["reasons"] = summary["reasons"] + [f"masks: {r}" for r in mask_audit.reasons]
    summary["failed"] = summary["failed"] + [f"masks: {f}" for f in mask_audit.failed]
    summary["verdict"] = max(summary["verdict"], mask_audit.verdict, key=VERDICT_CODES.get)
    metrics["privacy/verdict_code"] = float(VERDICT_CODES[summary["verdict"]])
    return summary


def write_eval_folder(
    out_dir: Path,
    data: EvalData,
    settings: EvalSettings,
    metrics: dict[str, float],
    privacy: dict,
    audit: PrivacyAudit,
    extractors: list[str],
    mask_audit: PrivacyAudit | None = None,
    mask_scores: np.ndarray | None = None,
) -> Path:
    """The evaluation folder, atomically: ``metrics.json``, ``privacy.json`` (``privacy``), ``per_sample.csv``
    (with each sample's ``mask_scores``, the audit of the generated masks, when ``mask_audit`` ran), the pictures
    and ``report.md``. Returns ``out_dir``."""
    d, names = data, data.class_names
    with atomic_folder(out_dir) as tmp:
        (tmp / "metrics.json").write_text(
            json.dumps({key: (v if math.isfinite(v) else None) for key, v in sorted(metrics.items())}, indent=2)
        )
        (tmp / "privacy.json").write_text(json.dumps(privacy, indent=2))
        write_per_sample(
            tmp / "per_sample.csv",
            audit.scores,
            d.sample_index,
            d.synth_y.tolist(),
            names,
            d.train_items,
            mask_scores=mask_scores,
            mask_threshold=None if mask_audit is None else mask_audit.scores.threshold,
        )
        pictures = write_pictures(
            tmp, d.synth_x, d.synth_y, d.test_x, d.test_y, d.train_x, names, audit.scores, settings.pairs_top
        )
        p = settings.privacy
        write_report(
            tmp / "report.md",
            metrics,
            names,
            extractors,
            privacy,
            pictures,
            {
                "samples": f"{len(d.synth_x)} synthetic ({d.info.get('checkpoint_id', '?')}), "
                f"{len(d.train_x)} real train, {len(d.test_x)} real held-out",
                "copy score space": f"{p.space} (threshold = {p.percentile}th percentile of held-out maxima)",
                "membership inference": mia_context(privacy.get("mia") or {}),
                **(
                    {"membership inference, mask model": mia_context(privacy["mask_mia"])}
                    if "mask_mia" in privacy
                    else {}
                ),
            },
        )
        if d.masks is not None:
            section = segmentation_section(metrics, list(d.masks.labels)[1:], settings.segmentation.steps)
            with open(tmp / "report.md", "a") as fh:
                fh.write(section)
    return Path(out_dir)


def evaluate(
    samples_dir: str | os.PathLike,
    prepared_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: EvalSettings,
    device: torch.device,
    cache_dir: str | os.PathLike | None = None,
    ckpt_path: str | os.PathLike | None = None,
    trust: bool = False,
    mask_ckpt_path: str | os.PathLike | None = None,
) -> EvalResult:
    """Evaluate the synthetic images of ``samples_dir`` against the real ones of ``prepared_dir`` and write the
    evaluation folder ``out_dir`` (see the module doc).

    Args:
        samples_dir: a complete samples folder (``medaug sample``): ``samples.pt``, ``manifest.csv``, ``info.json``.
        prepared_dir: the complete prepared dataset the model was trained on; its ``train`` split is what
            memorisation is measured against, ``settings.real_split`` the held-out reference. Only read.
        out_dir: the evaluation folder to write; replaced as a whole when it exists.
        settings: what to compute (:class:`EvalSettings`, e.g. ``EvalSettings.from_dict(evaluate_section)``).
        device: where the classifiers and encoders run; the images stay in host memory.
        cache_dir: where real-trained classifiers are cached; default :func:`classifier_cache_dir` of ``out_dir``.
        ckpt_path: the samples' checkpoint, or one beside it (the membership-inference attack, :func:`membership`);
            ``trust``: load it trusting its contents (see :func:`medaug.model.load_checkpoint`).
        mask_ckpt_path: the mask model of samples with generated masks (or one beside it): the attack on it
            (:func:`mask_model_membership`) joins the audit of the generated masks.

    Returns:
        :class:`EvalResult` with the metrics (NaN where undefined, null in ``metrics.json``) and the privacy verdict.

    Raises:
        FileNotFoundError / DatasetError: an input folder is not complete.
        ValueError: the class names of samples and dataset differ, the held-out split has under 2 images, or
            ``encoder.weights`` is set without ``encoder.network``.
    """
    samples_dir, out_dir = Path(samples_dir), Path(out_dir)
    data = load_eval_data(samples_dir, Path(prepared_dir), settings.real_split)
    cache_dir = Path(cache_dir) if cache_dir is not None else classifier_cache_dir(out_dir)
    mia, mia_record = membership(data, settings, Path(ckpt_path) if ckpt_path else None, device, trust)
    metrics, audit, extractors = compute_metrics(data, settings, device, cache_dir, mia)
    mask_audit = mask_scores = None
    mask_mia, mask_mia_record = mask_model_membership(
        data, settings, Path(mask_ckpt_path) if mask_ckpt_path else None, device, trust
    )
    if data.masks is not None:
        seg_metrics, mask_audit, mask_scores = segmentation_metrics(data, settings, device, cache_dir, mask_mia)
        metrics.update(seg_metrics)
    privacy = privacy_summary(audit, mask_audit, metrics)
    privacy |= {"extractors": extractors, "samples_id": samples_id(samples_dir), "mia": mia_record}
    if data.masks is not None:
        privacy["mask_mia"] = mask_mia_record
    write_eval_folder(out_dir, data, settings, metrics, privacy, audit, extractors, mask_audit, mask_scores)
    return EvalResult(
        metrics, privacy["verdict"], list(privacy["reasons"]), extractors, out_dir, data.info.get("mlflow_run_id")
    )
