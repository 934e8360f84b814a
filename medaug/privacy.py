"""Memorisation audit of a synthetic set, and the copy filter that export applies.

For every synthetic sample: its highest Pearson correlation to any training sample, in
pixel space and in the encoder's embedding space, and which training sample that is.
The copy threshold is calibrated on data (Dar et al. 2024, "Unconditional Latent Diffusion Models Memorize
Patient Imaging Data"): the same maximum for each held-out
real sample (patients the generator never saw), 95th percentile. A synthetic sample above
it is closer to a training image than 95 % of genuinely new images are: a copy.

Reported (``privacy/...``): ``threshold``, ``copy_rate`` (in the primary space, and per space
and class), ``memorised_patients`` (share of training patients with at least one copy),
``closer_to_train`` (share of synthetic samples closer to a training subset than to a held-out
set of the same size; 0.5 expected, one-sided t-test ``closer_to_train_p``), ``dcr_ratio``
(5th percentile of the distance to the closest training record, 1 - correlation, synthetic
over held-out; < 1 means closer than new real data), and, given the attack's metrics
(:mod:`medaug.membership`), ``mia_auc``. Flags (``PrivacyFlags``, defaults from ANCHORS.md) give a
verdict: pass, warn or fail, with the reasons (``judge``).

Example::

    scores = copy_scores(synth_x, train_x, heldout_x, encoder, space="pixel")
    keep = copy_filter(scores.score, scores.threshold)      # (N,) bool, False for copies
    index, score, threshold = read_copy_scores("outputs/demo_2d/eval")   # the same, from evaluate's folder
    audit = privacy_audit(synth_x, train_x, heldout_x, train_patients, encoder)
    audit.verdict, audit.reasons, audit.metrics["privacy/copy_rate"]
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from scipy.stats import ttest_1samp

SPACES = ("pixel", "embedding")
VERDICT_CODES = {"pass": 0, "warn": 1, "fail": 2}
Encoder = Callable[[torch.Tensor], torch.Tensor]


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (N, ...) flattened to ``(N, D)`` float32, zero mean and unit norm, so a dot product
    is the Pearson correlation. A constant row becomes zeros (correlation 0 with everything)."""
    x = x.reshape(len(x), -1).float()
    x = x - x.mean(1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 1e-8, x / norm.clamp_min(1e-8), torch.zeros_like(x))


def nearest_by_correlation(
    query: torch.Tensor, reference: torch.Tensor, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """For standardised ``query`` (N, D) and ``reference`` (M, D): each query row's highest correlation
    to a reference row and that row's index, ``((N,) float, (N,) int)``."""
    if len(reference) == 0:
        raise ValueError("no reference samples to compare with (empty training or held-out split)")
    corr, index = [], []
    for i in range(0, len(query), chunk):
        best = (query[i : i + chunk] @ reference.T).max(1)
        corr.append(best.values)
        index.append(best.indices)
    if not corr:
        return np.empty(0), np.empty(0, dtype=np.int64)
    return torch.cat(corr).double().numpy(), torch.cat(index).numpy()


MAX_PIXELS = 32**3


def pixel_view(images: torch.Tensor, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """``images`` (N, C, *spatial) average-pooled to at most ``max_pixels`` per image (same aspect), so
    pixel-space neighbours of large 3D sets fit in memory (1000 volumes: 128 MB); copies stay copies."""
    spatial = images.shape[2:]
    if int(np.prod(spatial)) <= max_pixels:
        return images
    factor = (np.prod(spatial) / max_pixels) ** (1 / len(spatial))
    size = [max(1, int(s / factor)) for s in spatial]
    pool = torch.nn.functional.adaptive_avg_pool3d if len(spatial) == 3 else torch.nn.functional.adaptive_avg_pool2d
    return torch.cat([pool(images[i : i + 64].float(), size) for i in range(0, len(images), 64)])


def represent(images: torch.Tensor, encoder: Encoder | None) -> dict[str, torch.Tensor]:
    """Standardised representations of ``images`` (N, 1, *spatial): ``pixel`` always (``pixel_view``),
    ``embedding`` when an encoder (``images -> (N, D) features``) is given."""
    reps = {"pixel": standardise(pixel_view(images))}
    if encoder is not None:
        reps["embedding"] = standardise(encoder(images))
    return reps


@dataclass
class CopyScores:
    """Per-synthetic-sample memorisation scores.

    ``score`` (N,) is the highest correlation to any training sample in the primary ``space``;
    ``threshold`` the 95th percentile (``percentile``) of the same for held-out real samples;
    ``nn_index`` (N,) the index of that nearest training sample (in the order of the training
    split). ``corr``/``index``/``thresholds``/``heldout`` hold the same per space
    (``heldout[space]`` is (M,), the held-out maxima the threshold came from).
    """

    space: str
    percentile: float
    corr: dict[str, np.ndarray]
    index: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]
    thresholds: dict[str, float] = field(init=False)

    def __post_init__(self):
        self.thresholds = {s: float(np.percentile(h, self.percentile)) for s, h in self.heldout.items()}

    @property
    def score(self) -> np.ndarray:
        return self.corr[self.space]

    @property
    def threshold(self) -> float:
        return self.thresholds[self.space]

    @property
    def nn_index(self) -> np.ndarray:
        return self.index[self.space]

    @property
    def is_copy(self) -> np.ndarray:
        return ~copy_filter(self.score, self.threshold)


def _scores_from(reps_s: dict, reps_t: dict, reps_h: dict, space: str, percentile: float) -> CopyScores:
    if space not in reps_s:
        raise ValueError(
            f"privacy space {space!r} not available; choose one of {sorted(reps_s)} (embedding needs an encoder)"
        )
    if not 50 <= percentile < 100:
        raise ValueError(f"copy threshold percentile={percentile}; use a value in [50, 100), e.g. 95")
    corr, index, heldout = {}, {}, {}
    for s in reps_s:
        corr[s], index[s] = nearest_by_correlation(reps_s[s], reps_t[s])
        heldout[s], _ = nearest_by_correlation(reps_h[s], reps_t[s])
    return CopyScores(space, percentile, corr, index, heldout)


def copy_scores(
    synth: torch.Tensor,
    train: torch.Tensor,
    heldout: torch.Tensor,
    encoder: Encoder | None = None,
    space: str = "pixel",
    percentile: float = 95.0,
) -> CopyScores:
    """Nearest training neighbour of every synthetic image and the data-calibrated copy threshold.

    ``synth`` (N, 1, *spatial), ``train`` (M, 1, *spatial) and ``heldout`` (H, 1, *spatial) real
    images of patients not in ``train``, all in model space [-1, 1]; ``encoder`` maps images to
    features (N, D) (needed for ``space="embedding"``). Returns ``CopyScores``: ``.score`` (N,)
    in [-1, 1], higher = more like a training image, and ``.threshold``: the
    ``percentile``-th percentile of the held-out maxima. Feed both to ``copy_filter``.
    """
    return _scores_from(
        represent(synth, encoder), represent(train, encoder), represent(heldout, encoder), space, percentile
    )


def copy_filter(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The keep mask of the copy filter: ``True`` for every sample whose score (highest correlation to a
    training sample, ``CopyScores.score`` or the ``copy_score`` column of ``per_sample.csv``) is at
    most ``threshold`` (``CopyScores.threshold`` or ``threshold`` in ``privacy.json``). ``(N,) -> (N,) bool``."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(threshold):
        raise ValueError(f"copy threshold {threshold} is not a finite number")
    return ~(scores > threshold)


def write_per_sample(
    path: str | Path,
    scores: CopyScores,
    sample_index: Sequence[int],
    labels: Sequence[int],
    class_names: Sequence[str],
    train_items: Sequence[dict],
    mask_scores: np.ndarray | None = None,
    mask_threshold: float | None = None,
) -> Path:
    """``per_sample.csv``: one row per synthetic sample with its ``index`` (the samples manifest's),
    label, ``copy_score`` (``scores.score``), ``is_copy``, the nearest training item and its pseudonymous
    patient (``train_items``: manifest rows of the training split, in order) and the correlation per space.
    With the audit of the generated masks, ``mask_scores`` (N,) (NaN for a mask it did not audit: not generated,
    or empty) and its ``mask_threshold``: also ``mask_copy_score`` (empty where NaN) and ``mask_is_copy``."""
    path = Path(path)
    with_masks = mask_scores is not None and mask_threshold is not None
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "index",
                "label",
                "class_name",
                "copy_score",
                "is_copy",
                "nn_train_item",
                "nn_patient",
                *[f"corr_{sp}" for sp in scores.corr],
                *(["mask_copy_score", "mask_is_copy"] if with_masks else []),
            ]
        )
        for i, (index, y) in enumerate(zip(sample_index, labels)):
            nn = train_items[int(scores.nn_index[i])]
            writer.writerow(
                [
                    int(index),
                    int(y),
                    class_names[int(y)],
                    f"{scores.score[i]:.6f}",
                    int(scores.is_copy[i]),
                    nn["item_id"],
                    nn["patient"],
                    *[f"{scores.corr[sp][i]:.6f}" for sp in scores.corr],
                    *(_mask_columns(float(mask_scores[i]), mask_threshold) if with_masks else []),
                ]
            )
    return path


def _mask_columns(score: float, threshold: float) -> list[str]:
    """``per_sample.csv``'s ``mask_copy_score`` and ``mask_is_copy`` of one sample (empty and 0: not audited)."""
    return ["", "0"] if np.isnan(score) else [f"{score:.6f}", str(int(score > threshold))]


def read_copy_scores(eval_dir: str | Path) -> tuple[np.ndarray, np.ndarray, float]:
    """What the copy filter needs from an ``evaluate`` folder: ``(sample index (N,) int — the ``index`` column of
    the samples manifest, copy score (N,) float, threshold)`` from ``per_sample.csv`` and ``privacy.json``.

    Example: ``index, score, thr = read_copy_scores("outputs/demo_2d/eval"); keep = index[copy_filter(score, thr)]``.
    """
    eval_dir = Path(eval_dir)
    per_sample, summary = eval_dir / "per_sample.csv", eval_dir / "privacy.json"
    if not per_sample.is_file() or not summary.is_file():
        raise FileNotFoundError(
            f"{eval_dir}: no per_sample.csv/privacy.json; run `medaug evaluate` on these samples first"
        )
    with open(per_sample, newline="") as fh:
        rows = list(csv.DictReader(fh))
    index = np.array([int(r["index"]) for r in rows], dtype=np.int64)
    scores = np.array([float(r["copy_score"]) for r in rows], dtype=np.float64)
    return index, scores, float(json.loads(summary.read_text())["threshold"])


def read_mask_copy_scores(eval_dir: str | Path) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The audit of the generated masks from an ``evaluate`` folder, as :func:`read_copy_scores`: ``(sample index
    (N,), mask copy score (N,) — NaN for a mask it did not audit, threshold)``; None when it audited no mask (no
    ``mask_copy_score`` column in ``per_sample.csv`` or no ``mask`` audit in ``privacy.json``)."""
    eval_dir = Path(eval_dir)
    index, _, _ = read_copy_scores(eval_dir)
    mask = json.loads((eval_dir / "privacy.json").read_text()).get("mask")
    with open(eval_dir / "per_sample.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not mask or not rows or "mask_copy_score" not in rows[0]:
        return None
    scores = np.array([float(r["mask_copy_score"] or "nan") for r in rows], dtype=np.float64)
    return index, scores, float(mask["threshold"])


@dataclass
class PrivacyFlags:
    """When the audit raises a flag (defaults: ANCHORS.md): a copy rate above ``max_copy_rate`` fails;
    a closer-to-train share above ``max_closer_share`` fails when its one-sided test against 0.5 is
    significant at ``alpha`` (with few samples a share of 0.6 is chance: reported, no flag); a DCR
    ratio below ``min_dcr_ratio`` warns; a membership-inference AUC above ``max_mia_auc`` fails when its
    bootstrap 95 % interval lies above 0.5 (when the attack ran)."""

    max_copy_rate: float = 0.10
    max_closer_share: float = 0.55
    min_dcr_ratio: float = 0.9
    alpha: float = 0.05
    max_mia_auc: float = 0.6  # membership inference (medaug.membership): fail above when its 95 % CI excludes 0.5

    @classmethod
    def from_dict(cls, values: Mapping) -> PrivacyFlags:
        """The flags among ``values`` (e.g. the ``evaluate.privacy`` section); other keys are ignored."""
        return cls(**{k: float(v) for k, v in values.items() if k in cls.__dataclass_fields__})


class Check(NamedTuple):
    """One flag of the audit: ``name`` (``copy_rate``, ``closer_to_train``, ``dcr_ratio``, ``mia_auc``), ``level``
    (``ok``, ``warn`` or ``fail``), the report's sentence ``line`` and a ``short`` one for one-line messages
    (``closer_to_train 0.66 > 0.55 (p=0.005)``)."""

    name: str
    level: str
    line: str
    short: str


def judge(m: Mapping[str, float], flags: PrivacyFlags, n_samples: int, space: str = "pixel") -> list[Check]:
    """The checks of the audit metrics ``m`` (``privacy/...``) against ``flags``; ``n_samples`` synthetic samples
    were audited in ``space``. The membership-inference check is there when ``m`` has ``privacy/mia_auc``."""
    out = []
    rate, copies, thr = m["privacy/copy_rate"], int(m["privacy/copies"]), m["privacy/threshold"]
    line = (
        f"copy rate {rate:.1%} (limit {flags.max_copy_rate:.0%}): {copies} of {n_samples} synthetic "
        f"samples correlate above {thr:.3f} ({space}) with a training image, "
        f"{m['privacy/memorised_patients']:.0%} of training patients"
    )
    level = "fail" if rate > flags.max_copy_rate else "ok"
    out.append(Check("copy_rate", level, line, f"copy_rate {rate:.2f} > {flags.max_copy_rate:.2f}"))
    share, p = m["privacy/closer_to_train"], m["privacy/closer_to_train_p"]
    line = f"closer-to-train share {share:.2f} (limit {flags.max_closer_share:.2f}, expected 0.5), p = {p:.3g}"
    if share > flags.max_closer_share and p >= flags.alpha:
        line += f" (above the limit but not significant at alpha {flags.alpha} with {n_samples} samples: no flag)"
    level = "fail" if share > flags.max_closer_share and p < flags.alpha else "ok"
    out.append(
        Check("closer_to_train", level, line, f"closer_to_train {share:.2f} > {flags.max_closer_share:.2f} (p={p:.2g})")
    )
    ratio = m["privacy/dcr_ratio"]
    line = f"DCR 5th-percentile ratio synthetic/held-out {ratio:.2f} (limit {flags.min_dcr_ratio:.2f})"
    level = "warn" if ratio < flags.min_dcr_ratio else "ok"
    out.append(Check("dcr_ratio", level, line, f"dcr_ratio {ratio:.2f} < {flags.min_dcr_ratio:.2f}"))
    if "privacy/mia_auc" in m:
        auc, lo, hi = m["privacy/mia_auc"], m["privacy/mia_auc_lo"], m["privacy/mia_auc_hi"]
        line = (
            f"membership-inference AUC {auc:.2f} (95% CI {lo:.2f}-{hi:.2f}; limit {flags.max_mia_auc:.2f}, "
            f"0.5 = no leakage), TPR {m['privacy/mia_tpr_at_1pct_fpr']:.1%} at 1% FPR"
        )
        if auc > flags.max_mia_auc and not lo > 0.5:
            line += " (above the limit but its 95% interval includes 0.5: no flag)"
        level = "fail" if auc > flags.max_mia_auc and lo > 0.5 else "ok"
        out.append(
            Check("mia_auc", level, line, f"mia_auc {auc:.2f} > {flags.max_mia_auc:.2f} (95% CI {lo:.2f}-{hi:.2f})")
        )
    return out


def verdict_of(checks: Sequence[Check]) -> str:
    """``fail`` when a check failed, else ``warn`` when one warned, else ``pass``."""
    levels = {c.level for c in checks}
    return "fail" if "fail" in levels else "warn" if "warn" in levels else "pass"


@dataclass
class PrivacyAudit:
    """Result of ``privacy_audit``: metrics named ``privacy/...``, the verdict and its reasons (the sentences of the
    checks that failed, then of those that warned), every check's sentence, and ``failed``: the short form of
    the failed checks (what export's share gate names)."""

    scores: CopyScores
    metrics: dict[str, float]
    verdict: str
    reasons: list[str]
    flags: PrivacyFlags
    checks: list[str]
    failed: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """What ``privacy.json`` holds (no images, no patient identifiers)."""
        return dict(
            verdict=self.verdict,
            reasons=self.reasons,
            failed=self.failed,
            checks=self.checks,
            space=self.scores.space,
            percentile=self.scores.percentile,
            threshold=self.scores.threshold,
            thresholds=self.scores.thresholds,
            flags=asdict(self.flags),
            metrics={k: (v if np.isfinite(v) else None) for k, v in self.metrics.items()},
        )


def closer_to_train(
    reps_s: torch.Tensor, reps_t: torch.Tensor, reps_h: torch.Tensor, seed: int = 0, repeats: int = 10
) -> tuple[float, float]:
    """Share of synthetic samples more correlated with a random training subset than with a held-out
    subset of the same size ``n = min(M, H)`` (ties count half), averaged over ``repeats`` random
    subsets, and its one-sided p-value against 0.5.

    The test is a t-test of the N per-sample shares: averaging over subsets makes each share less
    variable than a coin flip, so a binomial test would be too cautious (on random features with
    N = 60 it flagged 1 % of null sets at alpha 0.05, and half the set made of noisy copies 61 % of
    the time, against 4 % and 82 % here)."""
    gen = torch.Generator().manual_seed(seed)
    n = min(len(reps_t), len(reps_h))
    if len(reps_s) == 0 or n == 0:
        return float("nan"), float("nan")
    wins = np.zeros(len(reps_s))
    for _ in range(repeats):
        ct, _ = nearest_by_correlation(reps_s, reps_t[torch.randperm(len(reps_t), generator=gen)[:n]])
        ch, _ = nearest_by_correlation(reps_s, reps_h[torch.randperm(len(reps_h), generator=gen)[:n]])
        wins += (ct > ch) + 0.5 * (ct == ch)
    wins /= repeats
    share = float(wins.mean())
    if len(wins) < 2:
        return share, float("nan")
    if wins.std() == 0:  # every sample alike: certain either way
        return share, 0.0 if share > 0.5 else 1.0
    return share, float(ttest_1samp(wins, 0.5, alternative="greater").pvalue)


def privacy_audit(
    synth: torch.Tensor,
    train: torch.Tensor,
    heldout: torch.Tensor,
    train_patients: Sequence[str],
    encoder: Encoder | None = None,
    space: str = "pixel",
    percentile: float = 95.0,
    flags: PrivacyFlags | None = None,
    synth_labels: torch.Tensor | None = None,
    class_names: Sequence[str] = (),
    seed: int = 0,
    extra: Mapping[str, float] | None = None,
) -> PrivacyAudit:
    """The memorisation audit of ``synth`` against ``train`` (pseudonymous patient of each training image
    in ``train_patients``), calibrated on ``heldout``; metrics, verdict and reasons (see module doc).
    ``extra`` metrics join the audit's before the verdict: the membership-inference attack's
    (:func:`medaug.membership.membership_metrics`, ``privacy/mia_auc`` ...) add its check."""
    flags = flags or PrivacyFlags()
    if len(train_patients) != len(train):
        raise ValueError(f"{len(train_patients)} patient ids for {len(train)} training images")
    if len(heldout) < 2:
        raise ValueError(
            f"{len(heldout)} held-out real images; the copy threshold needs at least 2 "
            "(add a val/test split or set evaluate.real_split)"
        )
    reps_s, reps_t, reps_h = represent(synth, encoder), represent(train, encoder), represent(heldout, encoder)
    scores = _scores_from(reps_s, reps_t, reps_h, space, percentile)
    copies = scores.is_copy
    m: dict[str, float] = {
        "privacy/threshold": scores.threshold,
        "privacy/copy_rate": float(copies.mean()),
        "privacy/copies": float(copies.sum()),
        "privacy/nn_corr_max": float(scores.score.max()) if len(copies) else float("nan"),
        "privacy/nn_corr_median": float(np.median(scores.score)) if len(copies) else float("nan"),
    }
    for s in scores.corr:
        m[f"privacy/threshold_{s}"] = scores.thresholds[s]
        m[f"privacy/copy_rate_{s}"] = float((scores.corr[s] > scores.thresholds[s]).mean())
    if synth_labels is not None:
        for c, name in enumerate(class_names):
            sel = (synth_labels == c).numpy()
            if sel.any():
                m[f"privacy/copy_rate/{name}"] = float(copies[sel].mean())
    patients = np.asarray(train_patients)
    m["privacy/memorised_patients"] = len(set(patients[scores.nn_index[copies]])) / len(set(patients))
    share, p = closer_to_train(reps_s[space], reps_t[space], reps_h[space], seed)
    m["privacy/closer_to_train"], m["privacy/closer_to_train_p"] = share, p
    dcr_s = np.percentile(np.clip(1 - scores.score, 0, 2), 5)  # distance to closest record, 1 - r
    dcr_h = np.percentile(np.clip(1 - scores.heldout[space], 0, 2), 5)
    m["privacy/dcr_p5"], m["privacy/dcr_p5_heldout"] = float(dcr_s), float(dcr_h)
    m["privacy/dcr_ratio"] = float(dcr_s / dcr_h) if dcr_h > 1e-12 else float("nan")

    m.update(extra or {})
    checks = judge(m, flags, len(copies), space)
    verdict = verdict_of(checks)
    m["privacy/verdict_code"] = float(VERDICT_CODES[verdict])
    reasons = [c.line for c in checks if c.level == "fail"] + [c.line for c in checks if c.level == "warn"]
    failed = [c.short for c in checks if c.level == "fail"]
    return PrivacyAudit(scores, m, verdict, reasons, flags, [c.line for c in checks], failed)


def pixel_copy_scores(images: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    """Each image's highest pixel-space correlation to a training image ``(N,)``: the copy score of
    ``copy_scores(..., space="pixel")`` without the held-out calibration (compare it with the
    threshold an earlier audit stored)."""
    return nearest_by_correlation(represent(images, None)["pixel"], represent(train, None)["pixel"])[0]


def replace_copies(
    images: torch.Tensor,
    labels: torch.Tensor,
    keep: np.ndarray,
    threshold: float,
    generate: Callable[[torch.Tensor, int], torch.Tensor],
    score: Callable[[torch.Tensor], np.ndarray],
    max_rounds: int = 5,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Replace the samples the copy filter dropped by new ones of the same class that pass it.

    ``images`` (N, 1, *spatial) with ``labels`` (N,) and ``keep`` (N,) bool. Each round draws one
    candidate per missing sample with ``generate(labels, first_index)`` (new sample indices start at
    ``first_index`` = N, N + k, ...: new seeds, never reused) and keeps those with ``score(images)
    <= threshold``. Returns the kept originals followed by the accepted candidates:
    ``(images, labels, source index (original index, or N + k for candidate k), candidates' scores
    (NaN for originals))``. Stops after ``max_rounds``; the caller compares class counts.
    """
    keep = np.asarray(keep, dtype=bool)
    kept = np.flatnonzero(keep)
    out_x, out_y, out_i, out_s = [images[kept]], [labels[kept]], [kept], [np.full(len(kept), np.nan)]
    missing = labels[~torch.from_numpy(keep)]
    next_index = len(images)
    for _ in range(max_rounds):
        if len(missing) == 0:
            break
        candidates = generate(missing, next_index)
        s = np.asarray(score(candidates), dtype=np.float64)
        ok = s <= threshold
        out_x.append(candidates[torch.from_numpy(ok)])
        out_y.append(missing[torch.from_numpy(ok)])
        out_i.append(next_index + np.flatnonzero(ok))
        out_s.append(s[ok])
        next_index += len(missing)
        missing = missing[torch.from_numpy(~ok)]
    return torch.cat(out_x), torch.cat(out_y), np.concatenate(out_i), np.concatenate(out_s)
