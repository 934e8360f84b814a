"""export: synthetic images → dataset folder (NIfTI in HU, manifest, data card).

    python -m pipelines.export experiment=demo_2d
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter

import numpy as np
from omegaconf import DictConfig

import medaug
from medaug.export import export_dataset, metrics_table
from medaug.io import is_complete
from medaug.preprocessing import IntensityWindow
from medaug.sampling import load_samples
from pipelines.common import REPO_ROOT, log, make_tracker, path, stage_main, tracking_uri


def run(cfg: DictConfig) -> dict:
    x = cfg.export
    if x.format != "nifti":
        raise ValueError(f"export.format={x.format!r}; this version writes nifti")
    images, labels, rows, info = load_samples(path(cfg.paths.samples_dir))
    eval_dir = path(cfg.paths.eval_dir)
    metrics = json.loads((eval_dir / "metrics.json").read_text()) if is_complete(eval_dir) else {}
    if not metrics:
        log.warning("no evaluation found in %s: the data card will have no metrics; run `medaug evaluate`", eval_dir)
    headline = {k: v for k, v in metrics.items() if v is not None and k.count("/") == 1}
    counts = Counter(r["class_name"] for r in rows)
    window = IntensityWindow(**info["window"])
    affine = np.asarray(info["affine"])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    s = info["sample"]
    card = dict(
        name=cfg.name, created=dt.date.today().isoformat(), medaug_version=medaug.__version__,
        checkpoint_id=info["checkpoint_id"], training_steps=info["checkpoint_step"], model=info["model"],
        dataset_fingerprint=info.get("dataset") or "unknown", mlflow_run_id=info.get("mlflow_run_id") or "not tracked",
        sampler=f"{s['sampler']}, {s['steps']} steps, eta {s['eta']}", guidance_scale=s["guidance_scale"],
        seed=s["seed"], spatial_dims=info["spatial_dims"], image_shape=" × ".join(map(str, info["image_shape"])),
        spacing=" × ".join(f"{v:.2f}" for v in spacing[: info["spatial_dims"]]),
        intensity=f"{window.unit}, window [{window.lo:g}, {window.hi:g}]",
        class_counts=", ".join(f"{name}: {n}" for name, n in sorted(counts.items())),
        metrics=metrics_table(headline) if headline else "_not evaluated_",
    )
    template = path(x.template) if x.template else REPO_ROOT / "data_cards" / "TEMPLATE.md"
    out = export_dataset(images, rows, path(cfg.paths.export_dir), window=window, affine=affine,
                         card_fields=card, template=template, overwrite=x.overwrite)

    tracker = make_tracker(cfg)
    tracker.start(run_name=cfg.name, run_id=info.get("mlflow_run_id"), tags={"medaug.job": cfg.name})
    tracker.log_artifact(out / "DATA_CARD.md", "export")
    tracker.log_artifact(out / "manifest.csv", "export")
    tracker.end()
    print(f"\nSynthetic dataset : {out}  ({len(rows)} images)")
    print(f"Data card         : {out / 'DATA_CARD.md'}")
    if tracker.run_id:
        uri = tracking_uri(cfg)
        print(f"MLflow run        : {tracker.run_id} in experiment '{cfg.tracking.experiment}' at {uri}")
        print(f"Open the UI with  : mlflow ui --backend-store-uri {uri}")
    return {"export_dir": str(out), "samples": len(rows)}


main = stage_main("export", run)

if __name__ == "__main__":
    main()
