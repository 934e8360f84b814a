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
from medaug.preparation import check_shape_keys, demo_labels, log_prepare, log_summary, summary_metrics
from medaug.preprocessing import normalization_of
from pipelines.common import container, make_tracker, path, stage_main


def run(cfg: DictConfig) -> dict:
    data, opts, config = cfg.data, cfg.prepare, container(cfg)
    check_shape_keys(data.spatial_dims, data.get("image_size"), data.get("pixdim"))
    labels = path(data.labels) if data.labels else None
    if data.source == "demo":
        demo_labels(labels, path(cfg.paths.raw_dir), spatial_dims=data.spatial_dims, **config["data"]["demo"])
    flat = data.spatial_dims == 2  # a 2D job takes slices (axis 2) of volumes: spatial size -1, spacing 0 there
    info = prepare_dataset(
        labels,
        path(cfg.paths.prepared_dir),
        normalization_of(config["preprocess"]),
        spatial_size=list(data.image_size) + ([-1] if flat else []),
        spatial_dims=data.spatial_dims,
        pixdim=None if data.pixdim is None else list(data.pixdim) + ([0.0] if flat else []),
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
        dicomweb=config["data"]["dicomweb"] if data.source == "dicomweb" else None,
        mask_labels=config["data"].get("mask_labels"),
    )
    log_summary(info)
    tracker = make_tracker(OmegaConf.merge(cfg, {"tracking": {"experiment": f"{cfg.tracking.experiment}-prepare"}}))
    params = {k: config[k] for k in ("data", "preprocess", "prepare", "seed") if k in config}
    log_prepare(tracker, info, params, data.source, f"{cfg.name}-prepare", cfg.name)
    return summary_metrics(info)


main = stage_main("prepare", run)

if __name__ == "__main__":
    main()
