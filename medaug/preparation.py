"""prepare's checks and report around :func:`medaug.data.prepare.prepare_dataset`: the shape keys, the demo
phantoms as a data source, and the summary (console lines and MLflow metrics).

Example::

    check_shape_keys(2, [64, 64], None)
    labels = demo_labels(labels, raw_dir, spatial_dims=2, n_per_class=8, size=64, spacing_mm=1.0, seed=0)
    info = prepare_dataset(labels, ...)
    log_summary(info); summary_metrics(info)   # {"data/train/healthy": 12, "data/patients": 24, ...}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from .phantoms import make_demo_dataset
from .registry import dataset_entity
from .tracking import flatten, tracked

log = logging.getLogger("medaug")


def check_shape_keys(spatial_dims: int, image_size: Sequence[int] | None, pixdim: Sequence[float] | None) -> None:
    """``data.image_size`` and ``data.pixdim`` give one entry per axis of ``data.spatial_dims`` (2 or 3)."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"data.spatial_dims={spatial_dims}; choose 2 or 3")
    axes = "X, Y" if spatial_dims == 2 else "X, Y, Z"
    for key, value in (("image_size", image_size), ("pixdim", pixdim)):
        if value is not None and len(value) != spatial_dims:
            raise ValueError(
                f"data.{key}={list(value)} has {len(value)} entries; data.spatial_dims={spatial_dims} "
                f"needs {spatial_dims} ({axes})"
            )


def demo_labels(labels: Path, raw_dir: Path, **phantoms) -> Path:
    """The labels file of the demo data source: when ``labels`` does not exist and is where the phantoms'
    labels go (``raw_dir/labels.csv``), generate the phantoms there (``phantoms``: the arguments of
    :func:`medaug.phantoms.make_demo_dataset`). Raises FileNotFoundError for any other missing file."""
    if not labels.exists():
        made = raw_dir / "labels.csv"
        if labels != made:
            raise FileNotFoundError(
                f"{labels}: labels file not found; for your own data add data=labels (the demo "
                f"data source generates phantoms with their labels at {made})"
            )
        make_demo_dataset(raw_dir, **phantoms)
    return labels


def log_summary(info) -> None:
    """What prepare prints of a prepared dataset: counts, classes, splits, the de-identification gate and the
    skipped files with why (file paths on the console only: they never reach outputs or MLflow)."""
    s = info.summary
    log.info(
        "prepared %s: %d patients, %d images (%d DICOM series), %d source slices -> %d %dD items, shape %s",
        info.root,
        s.get("patients", 0),
        s.get("images", 0),
        s.get("series", 0),
        s.get("source_slices", 0),
        s.get("items", 0),
        info.spatial_dims,
        info.image_shape,
    )
    log.info(
        "  classes: %s",
        ", ".join(f"{i}={n} ({s.get('classes', {}).get(n, 0)})" for i, n in enumerate(info.class_names)),
    )
    for split, counts in info.counts.items():
        log.info("  %-5s %s", split, counts)
    log.info("  de-identification: policy %s, %d findings", info.deid.get("policy"), info.deid.get("findings", 0))
    log.info("  skipped files: %d", len(info.skipped))
    for file, why in info.skipped:
        log.info("    %s: %s", file, why)


def summary_metrics(info) -> dict[str, float]:
    """prepare's metrics: ``data/<split>/<class>`` counts and the numeric summary (``data/patients``, ...)."""
    summary = {f"data/{split}/{name}": n for split, counts in info.counts.items() for name, n in counts.items()}
    summary.update({f"data/{k}": v for k, v in info.summary.items() if isinstance(v, (int, float))})
    return summary


def log_prepare(tracker, info, params: Mapping, source: str, run_name: str, job: str) -> None:
    """prepare's MLflow run ``run_name``: ``params`` (the data, preprocess and prepare sections, flattened) and the
    dataset fingerprint, the de-identification tags, :func:`summary_metrics`, the dataset input (``source``:
    where the data came from) and ``dataset.json`` (and ``deid_log.csv``) as artifacts."""
    with tracked(tracker, run_name=run_name, tags={"medaug.job": job, "medaug.stage": "prepare"}):
        tracker.log_params(flatten({**params, "dataset": info.fingerprint}))
        tracker.set_tags({"deid.policy": info.deid.get("policy"), "deid.findings": info.deid.get("findings", 0)})
        tracker.log_metrics(summary_metrics(info))
        tracker.log_dataset(dataset_entity(info, source), "prepare")
        tracker.log_artifact(info.root / "dataset.json", "prepared")
        if (info.root / "deid_log.csv").exists():
            tracker.log_artifact(info.root / "deid_log.csv", "prepared")
