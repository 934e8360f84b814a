"""prepare: raw DICOM/NIfTI + labels → prepared dataset with patient-level splits.

    python -m pipelines.prepare experiment=demo_2d
    medaug prepare data=labels data.labels=/data/study/labels.csv prepare.deid=refuse

Prints a summary (patients, series, slices, classes, skipped files with why) and logs it
to MLflow as run ``<name>-prepare`` in experiment ``<tracking.experiment>-prepare`` (the
job's own run is created by ``train``).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from medaug.dataset import prepare_dataset
from medaug.phantoms import make_demo_dataset
from medaug.preprocessing import IntensityWindow, PercentileNormalization
from medaug.registry import dataset_entity
from medaug.tracking import flatten, tracked
from pipelines.common import container, log, make_tracker, path, stage_main


def normalization_of(cfg: DictConfig):
    """The preprocess group's intensity mapping: a CT window or MR percentiles."""
    if cfg.preprocess.get("percentile") is not None:
        return PercentileNormalization(**cfg.preprocess.percentile)
    return IntensityWindow(**cfg.preprocess.window)


def check_shape_keys(data: DictConfig) -> None:
    """``data.image_size`` and ``data.pixdim`` give one entry per axis of ``data.spatial_dims``."""
    dims = data.spatial_dims
    if dims not in (2, 3):
        raise ValueError(f"data.spatial_dims={dims}; choose 2 or 3")
    axes = "X, Y" if dims == 2 else "X, Y, Z"
    for key in ("image_size", "pixdim"):
        value = data.get(key)
        if value is not None and len(value) != dims:
            raise ValueError(f"data.{key}={list(value)} has {len(value)} entries; data.spatial_dims={dims} needs "
                             f"{dims} ({axes})")


def run(cfg: DictConfig) -> dict:
    data, opts = cfg.data, cfg.prepare
    check_shape_keys(data)
    labels = path(data.labels)
    if data.source == "demo" and not labels.exists():
        made = path(cfg.paths.raw_dir) / "labels.csv"  # where the phantoms' labels are written
        if labels != made:
            raise FileNotFoundError(f"{labels}: labels file not found; for your own data add data=labels (the demo "
                                    f"data source generates phantoms with their labels at {made})")
        demo = data.demo
        make_demo_dataset(path(cfg.paths.raw_dir), spatial_dims=data.spatial_dims, n_per_class=demo.n_per_class,
                          size=demo.size, spacing_mm=demo.spacing_mm, seed=demo.seed)
    flat = data.spatial_dims == 2
    spatial_size = list(data.image_size) + ([-1] if flat else [])
    pixdim = None if data.pixdim is None else list(data.pixdim) + ([0.0] if flat else [])
    info = prepare_dataset(labels, path(cfg.paths.prepared_dir), normalization_of(cfg),
                           spatial_size=spatial_size, spatial_dims=data.spatial_dims, pixdim=pixdim,
                           split_fractions=list(data.split), slice_rule=data.slice_rule,
                           slice_band=data.slice_band, seed=cfg.seed, deid=opts.deid, strict=opts.strict,
                           uneven_spacing=opts.uneven_spacing, volume_index=data.get("volume_index"),
                           crop=data.get("crop", "center"),
                           class_names=None if data.get("classes") is None else list(data.classes),
                           dicom_root=path(data.dicom_root) if data.get("dicom_root") else None)
    s = info.summary
    log.info("prepared %s: %d patients, %d images (%d DICOM series), %d source slices -> %d %dD items, "
             "shape %s", info.root, s.get("patients", 0), s.get("images", 0), s.get("series", 0),
             s.get("source_slices", 0), s.get("items", 0), info.spatial_dims, info.image_shape)
    log.info("  classes: %s", ", ".join(f"{i}={n} ({s.get('classes', {}).get(n, 0)})"
                                        for i, n in enumerate(info.class_names)))
    for split, counts in info.counts.items():
        log.info("  %-5s %s", split, counts)
    log.info("  de-identification: policy %s, %d findings", info.deid.get("policy"), info.deid.get("findings", 0))
    log.info("  skipped files: %d", len(info.skipped))
    for file, why in info.skipped:
        log.info("    %s: %s", file, why)   # console only: paths never reach outputs or MLflow

    summary = {f"data/{split}/{name}": n for split, counts in info.counts.items() for name, n in counts.items()}
    summary.update({f"data/{k}": v for k, v in s.items() if isinstance(v, (int, float))})
    tracker = make_tracker(OmegaConf.merge(cfg, {"tracking": {"experiment": f"{cfg.tracking.experiment}-prepare"}}))
    with tracked(tracker, run_name=f"{cfg.name}-prepare", tags={"medaug.job": cfg.name, "medaug.stage": "prepare"}):
        config = container(cfg)
        tracker.log_params(flatten({k: config[k] for k in ("data", "preprocess", "prepare", "seed")
                                    if k in config} | {"dataset": info.fingerprint}))
        tracker.set_tags({"deid.policy": info.deid.get("policy"), "deid.findings": info.deid.get("findings", 0)})
        tracker.log_metrics(summary)
        tracker.log_dataset(dataset_entity(info, data.source), "prepare")
        tracker.log_artifact(info.root / "dataset.json", "prepared")
        if (info.root / "deid_log.csv").exists():
            tracker.log_artifact(info.root / "deid_log.csv", "prepared")
    return summary


main = stage_main("prepare", run)

if __name__ == "__main__":
    main()
