"""prepare: raw DICOM/NIfTI + labels → prepared dataset with patient-level splits.

    python -m pipelines.prepare experiment=demo_2d
    medaug prepare data=labels data.labels=/data/study/labels.csv
"""

from __future__ import annotations

from omegaconf import DictConfig

from medaug.dataset import prepare_dataset
from medaug.phantoms import make_demo_dataset
from medaug.preprocessing import IntensityWindow
from pipelines.common import log, path, stage_main


def run(cfg: DictConfig) -> dict:
    data = cfg.data
    labels = path(data.labels)
    if data.source == "demo" and not labels.exists():
        demo = data.demo
        make_demo_dataset(path(cfg.paths.raw_dir), spatial_dims=data.spatial_dims, n_per_class=demo.n_per_class,
                          size=demo.size, spacing_mm=demo.spacing_mm, seed=demo.seed)
    flat = data.spatial_dims == 2
    spatial_size = list(data.image_size) + ([-1] if flat else [])
    pixdim = None if data.pixdim is None else list(data.pixdim) + ([0.0] if flat else [])
    info = prepare_dataset(labels, path(cfg.paths.prepared_dir), IntensityWindow(**cfg.preprocess.window),
                           spatial_size=spatial_size, spatial_dims=data.spatial_dims, pixdim=pixdim,
                           split_fractions=list(data.split), slice_rule=data.slice_rule,
                           slice_band=data.slice_band, seed=cfg.seed)
    summary = {f"data/{split}/{name}": n for split, counts in info.counts.items() for name, n in counts.items()}
    log.info("prepared %s: %d classes %s, image shape %s", info.root, info.num_classes, info.class_names,
             info.image_shape)
    for split, counts in info.counts.items():
        log.info("  %-5s %s", split, counts)
    return summary


main = stage_main("prepare", run)

if __name__ == "__main__":
    main()
