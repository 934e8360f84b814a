"""export: synthetic images → dataset folder (NIfTI / DICOM / PNG, manifest, data card, checksums).

python -m pipelines.export experiment=demo_2d
python -m pipelines.export experiment=demo_2d 'export.format=[nifti,dicom,png]' export.profile=share
"""

from __future__ import annotations

from functools import partial

import numpy as np
from omegaconf import DictConfig

from medaug.export import export_dataset, export_modality
from medaug.job import job_summary
from medaug.masks import mask_checkpoint, mask_labels
from medaug.preprocessing import IntensityWindow
from medaug.registry import synthetic_entity
from medaug.regeneration import regenerate_copies
from medaug.release import release
from medaug.sampling import samples_id
from medaug.tracking import tracked
from pipelines.common import REPO_ROOT, container, default_ckpt, make_tracker, path, stage_main, tracking_uri

WRITER_KEYS = ("profile", "png_bits", "dicom_multiframe", "dataset_json", "archive", "overwrite")


def run(cfg: DictConfig) -> dict:
    x, samples_dir = container(cfg.export), path(cfg.paths.samples_dir)
    formats = x["format"] if isinstance(x["format"], list) else [x["format"]]
    mask_ckpt = cfg.sample.get("mask_ckpt")  # the mask model, for samples whose generated mask was a copy
    regenerate = partial(
        regenerate_copies,
        ckpt_path=default_ckpt(cfg),
        prepared_dir=path(cfg.paths.prepared_dir),
        trust=cfg.trust_checkpoint,
        max_rounds=x["max_rounds"],
        mask_ckpt_path=path(mask_ckpt) if mask_ckpt else mask_checkpoint(path(cfg.paths.train_dir)),
    )
    out = release(
        samples_dir,
        path(cfg.paths.eval_dir),
        path(cfg.paths.prepared_dir),
        name=cfg.name,
        profile=x["profile"],
        copy_filter=x["copy_filter"],
        allow_failed_audit=x.get("allow_failed_audit", False),
        regenerate=regenerate if x["regenerate"] else None,
    )
    info, window = out.info, IntensityWindow(**out.info["window"])
    folder = export_dataset(
        out.images,
        out.rows,
        path(cfg.paths.export_dir),
        window=window,
        affine=np.asarray(info["affine"]),
        card_fields=out.card,
        formats=formats,
        privacy_scores=out.scores,
        privacy_files=out.evaluation.reports,
        template=path(x["template"]) if x["template"] else REPO_ROOT / "data_cards" / "TEMPLATE.md",
        modality=export_modality(info.get("modality"), window),
        **{k: x[k] for k in WRITER_KEYS},
        dicomweb=x["dicomweb"] if x.get("dicomweb", {}).get("url") else None,
        masks=out.masks,
        mask_labels=None if out.masks is None else mask_labels(info, int(out.masks.max()) + 1),
    )
    tracker = make_tracker(cfg)
    with tracked(tracker, run_name=cfg.name, run_id=info.get("mlflow_run_id"), tags={"medaug.job": cfg.name}):
        tracker.log_artifact(folder / "DATA_CARD.md", "export")
        tracker.log_artifact(folder / "manifest.csv", "export")
        tracker.log_dataset(synthetic_entity(samples_id(samples_dir), info, len(out.rows)), "synthetic")
    uri = getattr(tracker, "uri", None) or tracking_uri(cfg)  # the local store if the server was down
    result = dict(export_dir=str(folder), samples=len(out.rows), formats=formats, mlflow_run_id=tracker.run_id)
    result["mlflow_uri"] = uri
    if x["profile"] == "share":
        result["archive"] = str(folder.with_name(f"{folder.name}.{x['archive']}"))
    print(job_summary(result, cfg.tracking.experiment, tracking_uri(cfg)))
    return result


main = stage_main("export", run)

if __name__ == "__main__":
    main()
