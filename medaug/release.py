"""What export reads before it writes: the evaluation of the samples, the copy filter, the data card's fields.

Export's recipe (``pipelines/export.py``) is: load the samples, :func:`read_evaluation`, :func:`share_gate`,
:func:`card_fields`, :func:`filter_copies` (or :func:`audit_scores` unfiltered), then
:func:`medaug.export.export_dataset`.

Example::

    ev = read_evaluation("job/eval", "job/samples")
    warning = share_gate(ev, "share", allow_failed=False)   # ExportError on a fail verdict or no audit
    kept = filter_copies(images, labels, rows, "job/eval")           # drops samples above the copy threshold
    kept.note  # 'copy filter on (threshold 0.9000): 1 of 6 samples dropped'
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

import medaug
from medaug.atomic import is_complete
from medaug.dp import describe
from medaug.export import ExportError, metrics_table, refuse_real_patients
from medaug.preprocessing import IntensityWindow
from medaug.privacy import copy_filter, read_copy_scores, read_mask_copy_scores
from medaug.sampling import load_sample_masks, load_samples, samples_id

log = logging.getLogger("medaug")

PRIVACY_REPORTS = ("metrics.json", "privacy*.json", "privacy*.md", "report*.md", "report*.html")


class Evaluation(NamedTuple):
    """An evaluation folder as export sees it: ``complete`` (its DONE marker), its ``metrics`` ({} when none),
    ``audited`` (it holds per-sample copy scores), the privacy ``reports`` an export may copy and the data
    card's one-line privacy ``verdict``."""

    root: Path
    complete: bool
    metrics: dict
    audited: bool
    reports: list[Path]
    verdict: str


def read_evaluation(eval_dir: str | Path, samples_dir: str | Path) -> Evaluation:
    """The evaluation in ``eval_dir``; refuses one of other samples than those in ``samples_dir``, warns
    when there is none (the data card then has no metrics)."""
    eval_dir = Path(eval_dir)
    complete = is_complete(eval_dir)
    if complete and json.loads((eval_dir / "privacy.json").read_text()).get("samples_id") != samples_id(samples_dir):
        raise ExportError(
            f"{eval_dir} evaluated other samples than {samples_dir} (sampled or trained again since?); "
            "run `medaug evaluate` again, or set paths.eval_dir to these samples' evaluation"
        )
    metrics = json.loads((eval_dir / "metrics.json").read_text()) if complete else {}
    if not metrics:
        log.warning("no evaluation found in %s: the data card will have no metrics; run `medaug evaluate`", eval_dir)
    reports, verdict = privacy_inputs(eval_dir, metrics) if complete else ([], "not audited")
    return Evaluation(
        eval_dir, complete, metrics, complete and (eval_dir / "per_sample.csv").is_file(), reports, verdict
    )


def privacy_inputs(eval_dir: Path, metrics: dict) -> tuple[list[Path], str]:
    """The privacy report files an evaluation left (``metrics.json`` and text reports; none that
    embeds an image, which could carry training data into an export) and a one-line verdict."""
    files = sorted({p for pattern in PRIVACY_REPORTS for p in eval_dir.glob(pattern)})
    files = [p for p in files if "data:image" not in p.read_text(errors="ignore")]
    audit = {k: v for k, v in metrics.items() if k.count("/") == 1 and k.startswith("privacy/") and v is not None}
    privacy = eval_dir / "privacy.json"
    verdict = json.loads(privacy.read_text()).get("verdict") if privacy.is_file() else None
    shown = [
        f"`{k}` {v:.4g}"
        for k, v in sorted(audit.items())
        if isinstance(v, (int, float)) and not k.startswith("privacy/mia_")  # the attack: one sentence below
    ]
    text = (f"verdict **{verdict}**: " if verdict else "") + ", ".join(shown) + membership_text(metrics)
    return files, text if audit else "not audited: run `medaug evaluate` with the privacy audit before sharing"


def membership_text(metrics: Mapping) -> str:
    """The data card's sentence on the membership-inference attack (``privacy/mia_*``); "" when it did not run."""
    if metrics.get("privacy/mia_auc") is None:
        return ""

    def v(key: str, fmt: str = ".2f") -> str:  # null in metrics.json (NaN) reads n/a
        return "n/a" if metrics.get(f"privacy/mia_{key}") is None else format(metrics[f"privacy/mia_{key}"], fmt)

    return (
        f"; membership inference (loss attack, {v('members', '.0f')} training vs {v('nonmembers', '.0f')} held-out "
        f"images): AUC {v('auc')} (95 % CI {v('auc_lo')}-{v('auc_hi')}; 0.5 = no leakage), "
        f"TPR {v('tpr_at_1pct_fpr', '.1%')} at 1 % FPR"
    )


def share_gate(ev: Evaluation, profile: str, allow_failed: bool = False) -> str:
    """The share gate: ``profile="share"`` refuses samples whose privacy audit failed, or that have none, with
    an :class:`ExportError` of one line naming the failed checks and the remedies; ``allow_failed`` lets them
    through and returns the warning the data card then opens with (``""`` when there is nothing to warn of)."""
    if profile != "share":
        return ""
    privacy = ev.root / "privacy.json"
    summary = json.loads(privacy.read_text()) if ev.complete and privacy.is_file() else {}
    verdict = summary.get("verdict")
    override = "set export.allow_failed_audit=true to export anyway"
    if not ev.audited or verdict is None:
        if not allow_failed:
            raise ExportError(
                f"export.profile=share: no privacy audit of these samples in {ev.root}; run `medaug evaluate` "
                f"first, or {override} (with export.copy_filter=false)"
            )
        return (
            "> **WARNING: this dataset was exported for sharing WITHOUT a privacy audit** "
            "(`export.allow_failed_audit=true`). Nothing here shows that it does not reveal its training "
            "patients; do not share it outside the data-use agreement of the training data."
        )
    if verdict != "fail":
        return ""
    failed = "; ".join(summary.get("failed") or summary.get("reasons") or ["(no reason recorded)"])
    if not allow_failed:
        raise ExportError(
            f"privacy audit verdict fail: {failed}; remedies: train with differential privacy "
            "(training.dp.enabled=true), sample from a memorisation-aware checkpoint (ckpt_path=best_private), "
            f"see README 'Sharing a dataset safely'; {override}"
        )
    log.warning("exporting for sharing although the privacy audit failed (%s): export.allow_failed_audit=true", failed)
    return (
        f"> **WARNING: this dataset FAILED its privacy audit** ({failed}) and was exported for sharing only because "
        "`export.allow_failed_audit=true` overrode the share gate. It may reveal its training patients; do not "
        "share it outside the data-use agreement of the training data."
    )


def class_counts_text(rows: Sequence[Mapping]) -> str:
    """``"a: 2, b: 3"``: the exported samples per class name."""
    return ", ".join(f"{name}: {n}" for name, n in sorted(Counter(r["class_name"] for r in rows).items()))


def card_fields(name: str, info: Mapping, rows: Sequence[Mapping], ev: Evaluation, prepared_dir: str | Path) -> dict:
    """The data card's fields from the samples' ``info.json``, their manifest ``rows``, the evaluation and
    the de-identification record in ``prepared_dir/dataset.json`` ("not recorded" without one). ``filtered``
    says "copy filter off" until :func:`filter_copies` replaces it."""
    headline = {
        k: v
        for k, v in ev.metrics.items()
        if v is not None and k.count("/") == 1 and not k.endswith(("_std", "_code")) and "threshold" not in k
    }
    window = IntensityWindow(**info["window"])
    spacing = np.linalg.norm(np.asarray(info["affine"])[:3, :3], axis=0)
    s = info["sample"]
    return dict(
        name=name,
        created=dt.date.today().isoformat(),
        medaug_version=medaug.__version__,
        checkpoint_id=info["checkpoint_id"],
        training_steps=info["checkpoint_step"],
        model=info["model"],
        dataset_fingerprint=info.get("dataset") or "unknown",
        mlflow_run_id=info.get("mlflow_run_id") or "not tracked",
        sampler=f"{s['sampler']}, {s['steps']} steps, eta {s['eta']}",
        guidance_scale=s["guidance_scale"],
        seed=s["seed"],
        spatial_dims=info["spatial_dims"],
        image_shape=" × ".join(map(str, info["image_shape"])),
        spacing=" × ".join(f"{v:.2f}" for v in spacing[: info["spatial_dims"]]),
        intensity=f"training window [{window.lo:g}, {window.hi:g}] {window.unit}",
        class_counts=class_counts_text(rows),
        metrics=metrics_table(headline) if headline else "_not evaluated_",
        differential_privacy=describe(info.get("dp")),
        deid=deid_text(prepared_dir),
        filtered="copy filter off",
        privacy=ev.verdict,
    )


def deid_text(prepared_dir: str | Path) -> str:
    """One line on how the training data in ``prepared_dir`` was de-identified (its ``dataset.json``)."""
    meta = Path(prepared_dir) / "dataset.json"
    deid = json.loads(meta.read_text()).get("deid", {}) if meta.is_file() else {}
    if not deid:
        return "not recorded"
    trusted = ", PHI findings trusted by the user (see prepare's log)" if deid.get("policy") == "trust" else ""
    return f"gate policy `{deid.get('policy')}`{trusted}"


def audit_scores(eval_dir: str | Path, rows: Sequence[Mapping]) -> tuple[np.ndarray, float]:
    """Each row's copy score (N,) from the audit in ``eval_dir`` and the audit's threshold; a row the audit
    has no score for is an error."""
    index, score, threshold = read_copy_scores(eval_dir)
    by_index = dict(zip(index.tolist(), score.tolist()))
    missing = [r["index"] for r in rows if int(r["index"]) not in by_index]
    if missing:
        raise ExportError(f"{eval_dir}: the audit has no score for samples {missing[:5]}...; rerun `medaug evaluate`")
    return np.array([by_index[int(r["index"])] for r in rows], dtype=np.float64), threshold


def manifest_scores(ev: Evaluation, rows: Sequence[Mapping]) -> list[float | None] | None:
    """The copy scores of an unfiltered export's manifest: one per row (None where the audit has none),
    or None without an audit."""
    if not ev.audited:
        return None
    index, score, _ = read_copy_scores(ev.root)
    by_index = dict(zip(index.tolist(), score.tolist()))
    return [by_index.get(int(r["index"])) for r in rows]


class Filtered(NamedTuple):
    """What the copy filter lets through: ``images`` (M, 1, *spatial), their ``rows``, copy ``scores`` (M,)
    and the data card's one-line ``note``."""

    images: torch.Tensor
    rows: list[dict]
    scores: np.ndarray
    note: str
    masks: torch.Tensor | None = None  # (M, 1, *spatial): the label map of each image (mask-conditioned samples)


def mask_copies(eval_dir: str | Path, rows: Sequence[Mapping]) -> tuple[np.ndarray, float] | None:
    """Which rows' generated masks the audit in ``eval_dir`` found copies of a training mask, ``((N,) bool, the
    mask threshold)``; None when it audited no generated mask (:func:`medaug.privacy.read_mask_copy_scores`)."""
    found = read_mask_copy_scores(eval_dir)
    if found is None:
        return None
    index, score, threshold = found
    by_index = dict(zip(index.tolist(), score.tolist()))
    scores = np.array([by_index.get(int(r["index"]), np.nan) for r in rows], dtype=np.float64)
    return ~copy_filter(np.nan_to_num(scores, nan=-np.inf), threshold), threshold


def filter_copies(
    images: torch.Tensor,
    labels: torch.Tensor,
    rows: Sequence[dict],
    eval_dir: str | Path,
    regenerate: Callable | None = None,
    masks: torch.Tensor | None = None,
) -> Filtered:
    """Drop the samples (N, 1, *spatial) whose copy score is above the audit's threshold, or whose generated
    mask the audit of the masks found a copy of a training mask, and, when ``regenerate`` is given
    (:func:`medaug.regeneration.regenerate_copies` with its other arguments bound), replace them by new samples of
    the same class that pass it (needs an audit in pixel space). ``masks`` (N, 1, *spatial), the samples' label
    maps, follow their images: an image copy is replaced by a new image for the mask of the sample it replaces, a
    mask copy by a new mask and a new image on it (``regenerate`` gets ``mask_copy`` (N,) bool and
    ``mask_threshold``). The note says how many were dropped for each reason."""
    eval_dir = Path(eval_dir)
    scores, threshold = audit_scores(eval_dir, rows)
    image_keep = copy_filter(scores, threshold)
    masked = mask_copies(eval_dir, rows) if masks is not None else None
    mask_copy = np.zeros(len(rows), dtype=bool) if masked is None else masked[0]
    keep = image_keep & ~mask_copy
    dropped = int((~keep).sum())
    note = f"copy filter on (threshold {threshold:.4f}): {dropped} of {len(rows)} samples dropped"
    if masked is not None:
        note += (
            f" ({int((~image_keep).sum())} image copies; {int(mask_copy.sum())} generated masks copying a training "
            f"mask, mask threshold {masked[1]:.4f})"
        )
    if not dropped or regenerate is None:
        kept = torch.from_numpy(keep)
        return Filtered(
            images[kept],
            [r for r, k in zip(rows, keep) if k],
            scores[keep],
            note,
            None if masks is None else masks[kept],
        )
    space = json.loads((eval_dir / "privacy.json").read_text()).get("space")
    if space != "pixel":
        raise ExportError(
            f"export.regenerate needs the audit in pixel space (it used {space!r}); "
            "set evaluate.privacy.space=pixel or export.regenerate=false"
        )
    extra = {} if masks is None else {"masks": masks}
    if mask_copy.any():
        extra |= {"mask_copy": mask_copy, "mask_threshold": masked[1]}
    new = regenerate(images, labels, rows, keep, scores, threshold, **extra)
    note += f" and {dropped - new.short} regenerated" + (
        f"; {new.short} could not be replaced in {new.max_rounds} rounds" if new.short else ""
    )
    if new.short:
        log.warning(note)
    return Filtered(new.images, new.rows, new.scores, note, new.masks)


class Release(NamedTuple):
    """What export writes: the samples the share gate and the copy filter let through (``images`` (M, 1,
    *spatial) in [-1, 1], manifest ``rows``, label ``masks`` or None, copy ``scores`` or None), the samples'
    ``info.json``, the data card's fields and the evaluation."""

    images: torch.Tensor
    rows: list
    masks: torch.Tensor | None
    scores: list | None
    info: dict
    card: dict
    evaluation: Evaluation


def release(
    samples_dir: str | Path,
    eval_dir: str | Path,
    prepared_dir: str | Path,
    *,
    name: str,
    profile: str = "augment",
    copy_filter: bool | str = "auto",
    allow_failed_audit: bool = False,
    regenerate: Callable | None = None,
) -> Release:
    """Read a samples folder and its evaluation and decide what export writes: the share gate
    (:func:`share_gate`: ``profile="share"`` refuses a failed or missing audit unless ``allow_failed_audit``, and
    samples that carry a real patient, :func:`medaug.export.refuse_real_patients`, whatever ``allow_failed_audit``),
    then the copy filter (``copy_filter``: auto = on for the share profile; it needs an audit), replacing the
    dropped samples when ``regenerate`` (:func:`medaug.regeneration.regenerate_copies` with the checkpoint
    bound; the samples' ``sample_info`` is bound here) is given. Nothing is written. Raises ExportError naming
    the missing audit and the fix."""
    eval_dir = Path(eval_dir)
    images, labels, rows, info = load_samples(samples_dir)
    masks = load_sample_masks(samples_dir)
    ev = read_evaluation(eval_dir, samples_dir)
    warning = share_gate(ev, profile, allow_failed_audit)  # before anything is written
    refuse_real_patients(rows, profile)  # and before any regeneration; not an audit result: no override
    card = card_fields(name, info, rows, ev, prepared_dir) | {"audit_warning": warning}
    scores = manifest_scores(ev, rows)
    if profile == "share" if copy_filter == "auto" else bool(copy_filter):
        if not ev.audited:
            raise ExportError(
                f"{eval_dir}: the copy filter needs a privacy audit; run `medaug evaluate` first "
                "(or export.copy_filter=false to export unfiltered)"
            )
        regenerate = partial(regenerate, sample_info=info) if regenerate is not None else None
        images, rows, kept_scores, card["filtered"], masks = filter_copies(
            images, labels, rows, eval_dir, regenerate, masks
        )
        card["class_counts"], scores = class_counts_text(rows), list(kept_scores)
    return Release(images, rows, masks, scores, info, card, ev)
