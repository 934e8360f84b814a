"""prepare: raw DICOM/NIfTI + labels → prepared dataset with patient-level splits.

    python -m pipelines.prepare experiment=demo_2d
    medaug prepare data=labels data.labels=/data/study/labels.csv prepare.deid=refuse

Prints a summary (patients, series, slices, classes, skipped files with why) and logs it
to MLflow as run ``<name>-prepare`` in experiment ``<tracking.experiment>-prepare`` (the
job's own run is created by ``train``).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from medaug.data import prepare_dataset
from medaug.preparation import check_shape_keys, demo_labels, log_summary, summary_metrics
from medaug.preprocessing import IntensityWindow, PercentileNormalization
from medaug.registry import dataset_entity
from medaug.tracking import flatten, tracked
from pipelines.common import container, make_tracker, path, stage_main


def normalization_of(cfg: DictConfig):
    """The preprocess group's intensity mapping: a CT window or MR percentiles."""
    if cfg.preprocess.get("percentile") is not None:
        return PercentileNormalization(**cfg.preprocess.percentile)
    return IntensityWindow(**cfg.preprocess.window)


def run(cfg: DictConfig) -> dict:
    data, opts = cfg.data, cfg.prepare
    check_shape_keys(data.spatial_dims, data.get("image_size"), data.get("pixdim"))
    web = container(data.dicomweb) if data.source == "dicomweb" else None
    labels = path(data.labels) if data.labels else None
    if data.source == "demo":
        demo = data.demo
        demo_labels(
            labels,
            path(cfg.paths.raw_dir),
            spatial_dims=data.spatial_dims,
            n_per_class=demo.n_per_class,
            size=demo.size,
            spacing_mm=demo.spacing_mm,
            seed=demo.seed,
        )
    flat = data.spatial_dims == 2
    spatial_size = list(data.image_size) + ([-1] if flat else [])
    pixdim = None if data.pixdim is None else list(data.pixdim) + ([0.0] if flat else [])
    info = prepare_dataset(
        labels,
        path(cfg.paths.prepared_dir),
        normalization_of(cfg),
        spatial_size=spatial_size,
        spatial_dims=data.spatial_dims,
        pixdim=pixdim,
        split_fractions=list(data.split),
        slice_rule=data.slice_rule,
        slice_band=data.slice_band,
        seed=cfg.seed,
        deid=opts.deid,
        strict=opts.strict,
        uneven_spacing=opts.uneven_spacing,
        volume_index=data.get("volume_index"),
        crop=data.get("crop", "center"),
        class_names=None if data.get("classes") is None else list(data.classes),
        dicom_root=path(data.dicom_root) if data.get("dicom_root") else None,
        dicomweb=web,
    )
    log_summary(info)
    summary = summary_metrics(info)
    tracker = make_tracker(OmegaConf.merge(cfg, {"tracking": {"experiment": f"{cfg.tracking.experiment}-prepare"}}))
    with tracked(tracker, run_name=f"{cfg.name}-prepare", tags={"medaug.job": cfg.name, "medaug.stage": "prepare"}):
        config = container(cfg)
        tracker.log_params(
            flatten(
                {k: config[k] for k in ("data", "preprocess", "prepare", "seed") if k in config}
                | {"dataset": info.fingerprint}
            )
        )
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
