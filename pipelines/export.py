"""export: synthetic images → dataset folder (NIfTI / DICOM / PNG, manifest, data card, checksums).

    python -m pipelines.export experiment=demo_2d
    python -m pipelines.export experiment=demo_2d 'export.format=[nifti,dicom,png]' export.profile=share
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections import Counter
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

import medaug
from medaug.export import export_dataset, metrics_table
from medaug.io import is_complete
from medaug.preprocessing import IntensityWindow
from medaug.sampling import load_samples
from pipelines.common import REPO_ROOT, log, make_tracker, path, stage_main, tracking_uri


PRIVACY_REPORTS = ("metrics.json", "privacy*.json", "privacy*.md", "report*.md", "report*.html")


def privacy_inputs(eval_dir: Path, n: int, metrics: dict) -> tuple[list | None, list[Path], str]:
    """What the evaluation left about privacy: per-sample scores (``privacy_scores.csv`` with
    columns ``index,score``), report files (``metrics.json`` and text reports; none that embeds
    an image, which could carry training data into an export) and a one-line verdict for the data card."""
    scores = None
    table = eval_dir / "privacy_scores.csv"
    if table.is_file():
        scores = [None] * n
        with open(table, newline="") as fh:
            for row in csv.DictReader(fh):
                if int(row["index"]) < n and row.get("score", "") != "":
                    scores[int(row["index"])] = float(row["score"])
    files = sorted({p for pattern in PRIVACY_REPORTS for p in eval_dir.glob(pattern)})
    files = [p for p in files if "data:image" not in p.read_text(errors="ignore")]
    audit = {k: v for k, v in metrics.items() if k.startswith("privacy/") and v is not None}
    shown = [f"`{k}` {v:.4g}" if isinstance(v, (int, float)) else f"`{k}` {v}" for k, v in sorted(audit.items())]
    verdict = ", ".join(shown) if audit else "not audited: run `medaug evaluate` with the privacy audit before sharing"
    return scores, files, verdict


def run(cfg: DictConfig) -> dict:
    x = cfg.export
    formats = OmegaConf.to_container(x.format) if OmegaConf.is_config(x.format) else [x.format]
    images, labels, rows, info = load_samples(path(cfg.paths.samples_dir))
    eval_dir = path(cfg.paths.eval_dir)
    complete = is_complete(eval_dir)
    metrics = json.loads((eval_dir / "metrics.json").read_text()) if complete else {}
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
    scores, reports, card["privacy"] = (privacy_inputs(eval_dir, len(rows), metrics) if complete
                                        else (None, [], "not audited"))
    template = path(x.template) if x.template else REPO_ROOT / "data_cards" / "TEMPLATE.md"
    out = export_dataset(images, rows, path(cfg.paths.export_dir), window=window, affine=affine,
                         card_fields=card, template=template, formats=formats, profile=x.profile,
                         png_bits=x.png_bits, dicom_multiframe=x.dicom_multiframe, dataset_json=x.dataset_json,
                         privacy_scores=scores, privacy_files=reports, archive=x.archive, overwrite=x.overwrite)

    tracker = make_tracker(cfg)
    tracker.start(run_name=cfg.name, run_id=info.get("mlflow_run_id"), tags={"medaug.job": cfg.name})
    tracker.log_artifact(out / "DATA_CARD.md", "export")
    tracker.log_artifact(out / "manifest.csv", "export")
    tracker.end()
    print(f"\nSynthetic dataset : {out}  ({len(rows)} images)")
    print(f"Data card         : {out / 'DATA_CARD.md'}")
    result = {"export_dir": str(out), "samples": len(rows), "formats": formats}
    if x.profile == "share":
        result["archive"] = str(out.with_name(f"{out.name}.{x.archive}"))
        print(f"Sharing bundle    : {result['archive']}  (checksum in {result['archive']}.sha256)")
    if tracker.run_id:
        uri = tracking_uri(cfg)
        print(f"MLflow run        : {tracker.run_id} in experiment '{cfg.tracking.experiment}' at {uri}")
        print(f"Open the UI with  : mlflow ui --backend-store-uri {uri}")
    return result


main = stage_main("export", run)

if __name__ == "__main__":
    main()
