"""What export reads before it writes: the evaluation of the samples, the copy filter, the data card's fields.

Export's recipe (``pipelines/export.py``) is: load the samples, :func:`read_evaluation`, :func:`card_fields`,
:func:`filter_copies` (or :func:`audit_scores` unfiltered), then :func:`medaug.export.export_dataset`.

Example::

    ev = read_evaluation("job/eval", "job/samples")
    kept = filter_copies(images, labels, rows, "job/eval")           # drops samples above the copy threshold
    kept.note  # 'copy filter on (threshold 0.9000): 1 of 6 samples dropped'
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

import medaug
from medaug.atomic import is_complete
from medaug.dp import describe
from medaug.export import ExportError, metrics_table
from medaug.preprocessing import IntensityWindow
from medaug.privacy import copy_filter, read_copy_scores
from medaug.sampling import samples_id

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
    shown = [f"`{k}` {v:.4g}" for k, v in sorted(audit.items()) if isinstance(v, (int, float))]
    text = (f"verdict **{verdict}**: " if verdict else "") + ", ".join(shown)
    return files, text if audit else "not audited: run `medaug evaluate` with the privacy audit before sharing"


def class_counts_text(rows: Sequence[Mapping]) -> str:
    """``"a: 2, b: 3"``: the exported samples per class name."""
    return ", ".join(f"{name}: {n}" for name, n in sorted(Counter(r["class_name"] for r in rows).items()))


def card_fields(name: str, info: Mapping, rows: Sequence[Mapping], ev: Evaluation, prepared_dir: str | Path) -> dict:
    """The data card's fields from the samples' ``info.json``, their manifest ``rows``, the evaluation and
    the de-identification record in ``prepared_dir/dataset.json`` ("not recorded" without one). ``filtered``
    says "copy filter off" until :func:`filter_copies` replaces it."""
    meta = Path(prepared_dir) / "dataset.json"
    deid = json.loads(meta.read_text()).get("deid", {}) if meta.is_file() else {}
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
        deid=(
            f"gate policy `{deid.get('policy')}`"
            + (", PHI findings trusted by the user (see prepare's log)" if deid.get("policy") == "trust" else "")
            if deid
            else "not recorded"
        ),
        filtered="copy filter off",
        privacy=ev.verdict,
    )


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


def filter_copies(
    images: torch.Tensor,
    labels: torch.Tensor,
    rows: Sequence[dict],
    eval_dir: str | Path,
    regenerate: Callable | None = None,
) -> Filtered:
    """Drop the samples (N, 1, *spatial) whose copy score is above the audit's threshold and, when
    ``regenerate`` is given (:func:`medaug.regeneration.regenerate_copies` with its other arguments bound),
    replace them by new samples of the same class that pass it (needs an audit in pixel space)."""
    eval_dir = Path(eval_dir)
    scores, threshold = audit_scores(eval_dir, rows)
    keep = copy_filter(scores, threshold)
    dropped = int((~keep).sum())
    if not dropped or regenerate is None:
        note = f"copy filter on (threshold {threshold:.4f}): {dropped} of {len(rows)} samples dropped"
        return Filtered(images[torch.from_numpy(keep)], [r for r, k in zip(rows, keep) if k], scores[keep], note)
    space = json.loads((eval_dir / "privacy.json").read_text()).get("space")
    if space != "pixel":
        raise ExportError(
            f"export.regenerate needs the audit in pixel space (it used {space!r}); "
            "set evaluate.privacy.space=pixel or export.regenerate=false"
        )
    new = regenerate(images, labels, rows, keep, scores, threshold)
    note = (
        f"copy filter on (threshold {threshold:.4f}): {dropped} of {len(rows)} samples dropped and "
        f"{dropped - new.short} regenerated"
        + (f"; {new.short} could not be replaced in {new.max_rounds} rounds" if new.short else "")
    )
    if new.short:
        log.warning(note)
    return Filtered(new.images, new.rows, new.scores, note)


def masks_for(masks: torch.Tensor | None, sample_rows: Sequence[Mapping], rows: Sequence[Mapping]):
    """The label maps of ``rows`` (what the copy filter kept, in its order) from ``masks`` (N, 1, *spatial), one per
    row of the samples manifest ``sample_rows``; None without masks. A regenerated sample has no mask: an error
    that names the fix."""
    if masks is None:
        return None
    position = {int(r["index"]): i for i, r in enumerate(sample_rows)}
    missing = [r["index"] for r in rows if int(r["index"]) not in position]
    if missing:
        raise ExportError(
            f"samples {missing[:5]} were regenerated by the copy filter without a mask; "
            "set export.regenerate=false to drop the copies of mask-conditioned samples instead"
        )
    return masks[torch.tensor([position[int(r["index"])] for r in rows], dtype=torch.long)]
