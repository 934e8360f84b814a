"""export: synthetic images → dataset folder (NIfTI / DICOM / PNG, manifest, data card, checksums).

    python -m pipelines.export experiment=demo_2d
    python -m pipelines.export experiment=demo_2d 'export.format=[nifti,dicom,png]' export.profile=share
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import medaug
from medaug.dataset import load_split
from medaug.export import ExportError, export_dataset, export_modality, metrics_table
from medaug.atomic import is_complete
from medaug.model import load_checkpoint
from medaug.preprocessing import IntensityWindow
from medaug.privacy import copy_filter, pixel_copy_scores, read_copy_scores, replace_copies
from medaug.registry import synthetic_entity
from medaug.sampling import inference_scheduler, load_samples, sample_images, samples_id, sampling_network
from medaug.tracking import tracked
from pipelines.common import REPO_ROOT, default_ckpt, log, make_tracker, path, stage_main, tracking_uri


PRIVACY_REPORTS = ("metrics.json", "privacy*.json", "privacy*.md", "report*.md", "report*.html")


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


def filter_copies(cfg: DictConfig, images, labels, rows: list[dict], info: dict, eval_dir: Path):
    """Apply the copy filter: drop samples above the audit's copy threshold and, with
    ``export.regenerate``, replace them by new samples of the same class that pass it.
    Returns ``(images, rows, scores, note)``."""
    x = cfg.export
    index, score, threshold = read_copy_scores(eval_dir)
    by_index = dict(zip(index.tolist(), score.tolist()))
    missing = [r["index"] for r in rows if int(r["index"]) not in by_index]
    if missing:
        raise ExportError(f"{eval_dir}: the audit has no score for samples {missing[:5]}...; rerun `medaug evaluate`")
    scores = np.array([by_index[int(r["index"])] for r in rows])
    keep = copy_filter(scores, threshold)
    dropped = int((~keep).sum())
    if not dropped or not x.regenerate:
        note = f"copy filter on (threshold {threshold:.4f}): {dropped} of {len(rows)} samples dropped"
        return images[torch.from_numpy(keep)], [r for r, k in zip(rows, keep) if k], scores[keep], note
    space = json.loads((eval_dir / "privacy.json").read_text()).get("space")
    if space != "pixel":
        raise ExportError(f"export.regenerate needs the audit in pixel space (it used {space!r}); "
                          "set evaluate.privacy.space=pixel or export.regenerate=false")
    ckpt = load_checkpoint(default_ckpt(cfg), cfg.trust_checkpoint)
    if ckpt.id != info["checkpoint_id"]:
        raise ExportError(f"{ckpt.path} is not the checkpoint these samples came from; pass ckpt_path=")
    s = info["sample"]
    net, names = sampling_network(ckpt, "cpu", use_ema=s.get("use_ema", True)), ckpt.meta["class_names"]
    train_x, _ = load_split(path(cfg.paths.prepared_dir), "train")

    def generate(want: torch.Tensor, first: int) -> torch.Tensor:
        sch = inference_scheduler(ckpt.config["scheduler"], s["sampler"], s["steps"])
        return sample_images(net, sch, want, ckpt.meta["image_shape"], guidance_scale=s["guidance_scale"],
                             null_class=len(names), seed=s["seed"] + first, batch_size=s["batch_size"], eta=s["eta"],
                             clip_x0=s.get("clip_x0", True))  # the settings the samples were made with

    new_x, new_y, source, new_scores = replace_copies(images, labels, keep, threshold, generate,
                                                      lambda imgs: pixel_copy_scores(imgs, train_x), x.max_rounds)
    new_rows = []
    for src, y, sc in zip(source.tolist(), new_y.tolist(), new_scores.tolist()):
        row = rows[src] if src < len(rows) else {**rows[0], "index": src, "label": y, "class_name": names[y],
                                                    "seed": s["seed"] + src, "replaces_copy": True}
        new_rows.append(row)
    final_scores = np.where(np.isnan(new_scores), scores[source.clip(max=len(rows) - 1)], new_scores)
    short = len(rows) - len(new_rows)
    note = (f"copy filter on (threshold {threshold:.4f}): {dropped} of {len(rows)} samples dropped and "
            f"{dropped - short} regenerated"
            + (f"; {short} could not be replaced in {x.max_rounds} rounds" if short else ""))
    if short:
        log.warning(note)
    return new_x, new_rows, final_scores, note


def run(cfg: DictConfig) -> dict:
    x = cfg.export
    formats = OmegaConf.to_container(x.format) if OmegaConf.is_config(x.format) else [x.format]
    samples_dir, eval_dir = path(cfg.paths.samples_dir), path(cfg.paths.eval_dir)
    images, labels, rows, info = load_samples(samples_dir)
    complete = is_complete(eval_dir)
    if complete and json.loads((eval_dir / "privacy.json").read_text()).get("samples_id") != samples_id(samples_dir):
        raise ExportError(f"{eval_dir} evaluated other samples than {samples_dir} (sampled or trained again since?); "
                          "run `medaug evaluate` again, or set paths.eval_dir to these samples' evaluation")
    metrics = json.loads((eval_dir / "metrics.json").read_text()) if complete else {}
    if not metrics:
        log.warning("no evaluation found in %s: the data card will have no metrics; run `medaug evaluate`", eval_dir)
    headline = {k: v for k, v in metrics.items() if v is not None and k.count("/") == 1
                and not k.endswith(("_std", "_code")) and "threshold" not in k}
    prepared_meta = path(cfg.paths.prepared_dir) / "dataset.json"
    deid = json.loads(prepared_meta.read_text()).get("deid", {}) if prepared_meta.is_file() else {}
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
        intensity=f"training window [{window.lo:g}, {window.hi:g}] {window.unit}",
        class_counts=", ".join(f"{name}: {n}" for name, n in sorted(counts.items())),
        metrics=metrics_table(headline) if headline else "_not evaluated_",
        deid=(f"gate policy `{deid.get('policy')}`" + (", PHI findings trusted by the user (see prepare's log)"
                                                       if deid.get("policy") == "trust" else "")
              if deid else "not recorded"),
    )
    reports, card["privacy"] = privacy_inputs(eval_dir, metrics) if complete else ([], "not audited")
    use_filter = x.profile == "share" if x.copy_filter == "auto" else bool(x.copy_filter)
    audited = complete and (eval_dir / "per_sample.csv").is_file()
    scores, card["filtered"] = None, "copy filter off"
    if use_filter:
        if not audited:
            raise ExportError(f"{eval_dir}: the copy filter needs a privacy audit; run `medaug evaluate` first "
                              "(or export.copy_filter=false to export unfiltered)")
        images, rows, scores, card["filtered"] = filter_copies(cfg, images, labels, rows, info, eval_dir)
        card["class_counts"] = ", ".join(f"{n}: {c}" for n, c in sorted(Counter(r["class_name"] for r in rows).items()))
    elif audited:
        index, score, _ = read_copy_scores(eval_dir)
        by_index = dict(zip(index.tolist(), score.tolist()))
        scores = [by_index.get(int(r["index"])) for r in rows]
    template = path(x.template) if x.template else REPO_ROOT / "data_cards" / "TEMPLATE.md"
    out = export_dataset(images, rows, path(cfg.paths.export_dir), window=window, affine=affine,
                         card_fields=card, template=template, formats=formats, profile=x.profile,
                         png_bits=x.png_bits, dicom_multiframe=x.dicom_multiframe, dataset_json=x.dataset_json,
                         privacy_scores=None if scores is None else list(scores), privacy_files=reports,
                         archive=x.archive, overwrite=x.overwrite,
                         modality=export_modality(info.get("modality"), window))

    tracker = make_tracker(cfg)
    with tracked(tracker, run_name=cfg.name, run_id=info.get("mlflow_run_id"), tags={"medaug.job": cfg.name}):
        tracker.log_artifact(out / "DATA_CARD.md", "export")
        tracker.log_artifact(out / "manifest.csv", "export")
        tracker.log_dataset(synthetic_entity(samples_id(samples_dir), info, len(rows)), "synthetic")
    result = {"export_dir": str(out), "samples": len(rows), "formats": formats, "mlflow_run_id": tracker.run_id,
              "mlflow_uri": getattr(tracker, "uri", None) or tracking_uri(cfg)}  # local store if the server was down
    if x.profile == "share":
        result["archive"] = str(out.with_name(f"{out.name}.{x.archive}"))
    print_summary(cfg, result)
    return result


def print_summary(cfg: DictConfig, result: dict) -> None:
    """What a job ends with (``make demo``, ``medaug run``): where export's ``result`` put the synthetic
    dataset, its data card and sharing bundle, and the MLflow run that tracked it."""
    out = Path(result["export_dir"])
    print(f"\nSynthetic dataset : {out}  ({result['samples']} images)")
    print(f"Data card         : {out / 'DATA_CARD.md'}")
    if result.get("archive"):
        print(f"Sharing bundle    : {result['archive']}  (checksum in {result['archive']}.sha256)")
    if result.get("mlflow_run_id"):
        uri = result.get("mlflow_uri") or tracking_uri(cfg)
        print(f"MLflow run        : {result['mlflow_run_id']} in experiment '{cfg.tracking.experiment}' at {uri}")
        print(f"Open the UI with  : mlflow ui --backend-store-uri {uri}")


main = stage_main("export", run)

if __name__ == "__main__":
    main()
