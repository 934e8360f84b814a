"""export: synthetic images → dataset folder (NIfTI / DICOM / PNG, manifest, data card, checksums).

python -m pipelines.export experiment=demo_2d
python -m pipelines.export experiment=demo_2d 'export.format=[nifti,dicom,png]' export.profile=share

Samples that carry masks export as image/label pairs (nnU-Net v2 imagesTr/labelsTr, DICOM SEG, PNG overlays).
"""

from __future__ import annotations

from functools import partial

import numpy as np
from omegaconf import DictConfig, OmegaConf

from medaug.export import ExportError, export_dataset, export_modality
from medaug.job import job_summary
from medaug.masks import load_sample_masks, mask_labels
from medaug.preprocessing import IntensityWindow
from medaug.registry import synthetic_entity
from medaug.regeneration import regenerate_copies
from medaug.release import card_fields, class_counts_text, filter_copies, manifest_scores, masks_for, read_evaluation
from medaug.sampling import load_samples, samples_id
from medaug.tracking import tracked
from pipelines.common import REPO_ROOT, container, default_ckpt, make_tracker, path, stage_main, tracking_uri


def run(cfg: DictConfig) -> dict:
    x = cfg.export
    formats = OmegaConf.to_container(x.format) if OmegaConf.is_config(x.format) else [x.format]
    samples_dir, eval_dir, prepared = (path(cfg.paths[k]) for k in ("samples_dir", "eval_dir", "prepared_dir"))
    images, labels, rows, info = load_samples(samples_dir)
    masks, sample_rows = load_sample_masks(samples_dir), rows
    ev = read_evaluation(eval_dir, samples_dir)
    card = card_fields(cfg.name, info, rows, ev, prepared)
    scores = manifest_scores(ev, rows)
    if x.profile == "share" if x.copy_filter == "auto" else bool(x.copy_filter):
        if not ev.audited:
            raise ExportError(
                f"{eval_dir}: the copy filter needs a privacy audit; run `medaug evaluate` first "
                "(or export.copy_filter=false to export unfiltered)"
            )
        regenerate = (
            partial(
                regenerate_copies,
                sample_info=info,
                ckpt_path=default_ckpt(cfg),
                prepared_dir=prepared,
                trust=cfg.trust_checkpoint,
                max_rounds=x.max_rounds,
            )
            if x.regenerate
            else None
        )
        images, rows, scores, card["filtered"] = filter_copies(images, labels, rows, eval_dir, regenerate)
        card["class_counts"], scores = class_counts_text(rows), list(scores)
    masks = masks_for(masks, sample_rows, rows)
    window = IntensityWindow(**info["window"])
    template = path(x.template) if x.template else REPO_ROOT / "data_cards" / "TEMPLATE.md"
    out = export_dataset(
        images,
        rows,
        path(cfg.paths.export_dir),
        window=window,
        affine=np.asarray(info["affine"]),
        card_fields=card,
        template=template,
        formats=formats,
        profile=x.profile,
        png_bits=x.png_bits,
        dicom_multiframe=x.dicom_multiframe,
        dataset_json=x.dataset_json,
        privacy_scores=scores,
        privacy_files=ev.reports,
        archive=x.archive,
        overwrite=x.overwrite,
        modality=export_modality(info.get("modality"), window),
        dicomweb=container(x.dicomweb) if x.get("dicomweb", {}).get("url") else None,
        masks=masks,
        mask_labels=None if masks is None else mask_labels(info, int(masks.max()) + 1),
    )

    tracker = make_tracker(cfg)
    with tracked(tracker, run_name=cfg.name, run_id=info.get("mlflow_run_id"), tags={"medaug.job": cfg.name}):
        tracker.log_artifact(out / "DATA_CARD.md", "export")
        tracker.log_artifact(out / "manifest.csv", "export")
        tracker.log_dataset(synthetic_entity(samples_id(samples_dir), info, len(rows)), "synthetic")
    result = {
        "export_dir": str(out),
        "samples": len(rows),
        "formats": formats,
        "mlflow_run_id": tracker.run_id,
        "mlflow_uri": getattr(tracker, "uri", None) or tracking_uri(cfg),
    }  # local store if the server was down
    if x.profile == "share":
        result["archive"] = str(out.with_name(f"{out.name}.{x.archive}"))
    print(job_summary(result, cfg.tracking.experiment, tracking_uri(cfg)))
    return result


main = stage_main("export", run)

if __name__ == "__main__":
    main()
