"""evaluate: synthetic images + held-out real data → eval/ (metrics, report, pictures) and MLflow.

    python -m pipelines.evaluate experiment=demo_2d
    medaug evaluate experiment=demo_3d evaluate.privacy.max_copy_rate=0.05 evaluate.utility.seeds=[0,1,2]
    medaug evaluate evaluate.encoder.weights=my_encoder.pt \
        'evaluate.encoder.network={_target_: monai.networks.nets.DenseNet121, spatial_dims: 2,
                                  in_channels: 1, out_channels: 2}'

Writes ``metrics.json`` (what MLflow holds), ``privacy.json`` (verdict, reasons, copy threshold),
``per_sample.csv`` (copy score and nearest training item per synthetic sample; export's copy
filter reads these), ``report.md`` and the pictures; all logged under ``evaluation/``.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import partial

import torch
from omegaconf import DictConfig, OmegaConf

from medaug.dataset import load_info, load_split, read_manifest
from medaug.io import atomic_folder
from medaug.metrics import (FeatureExtractor, PlaneFeatureExtractor, fidelity_metrics, load_weights, make_classifier,
                            realism_metrics, slices_for_training, train_classifier, utility_metrics)
from medaug.model import network_from_spec
from medaug.privacy import PrivacyFlags, privacy_audit, write_per_sample
from medaug.report import write_pictures, write_report
from medaug.sampling import load_samples, samples_id
from medaug.tracking import flatten, tracked
from pipelines.common import container, device_of, log, make_tracker, path, stage_main


def cached_classifier(prepared_dir, images, labels, num_classes: int, steps: int, seed: int, device: torch.device,
                      kind: str = "label"):
    """A real-trained classifier on ``device``, trained once per dataset and setting, cached in
    ``prepared/classifiers/`` (``label``: on the training images; ``slice``: on their 2D plane slices,
    for 2.5D features)."""
    cache = prepared_dir / "classifiers" / f"{kind}_clf_s{steps}_seed{seed}.pt"
    if cache.exists():
        model = make_classifier(images.shape[2:], num_classes)
        model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        return model.to(device).eval()
    model = train_classifier(images, labels, num_classes, steps=steps, seed=seed, device=device)
    cache.parent.mkdir(exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model


def encoder_of(e: DictConfig, clf, steps: int, device: torch.device) -> FeatureExtractor:
    """The user's network and weights when ``evaluate.encoder.weights`` is set, else the cached classifier."""
    if not e.encoder.weights:
        return FeatureExtractor(clf, f"medaug DenseNet classifier trained on the real train split ({steps} steps, "
                                     f"seed {e.seed}), penultimate pooled features")
    if not e.encoder.get("network"):
        raise ValueError("evaluate.encoder.weights is set but evaluate.encoder.network is not; give the network's "
                         "_target_ and arguments, e.g. {_target_: monai.networks.nets.DenseNet121, ...}")
    spec = OmegaConf.to_container(e.encoder.network, resolve=True)
    weights = path(e.encoder.weights)
    net = load_weights(network_from_spec(spec), weights).to(device)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.is_file() else "?"
    return FeatureExtractor(net, f"user encoder {spec['_target_']} (weights sha256 {digest}), penultimate features",
                            channels=int(e.encoder.channels))


def held_out(root, splits) -> tuple[torch.Tensor, torch.Tensor]:
    """The real images of one split name or a list of them (patients never trained on), concatenated."""
    splits = [splits] if isinstance(splits, str) else [str(s) for s in splits]
    parts = [load_split(root, s) for s in splits]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if len(x) < 2:
        raise ValueError(f"{root}: held-out split(s) {splits} hold {len(x)} images; at least 2 are needed "
                         "(set evaluate.real_split=[val,test] or prepare with a larger split)")
    return x, y


def run(cfg: DictConfig) -> dict:
    e = cfg.evaluate
    tracker = make_tracker(cfg)  # first: a tracking server that does not answer stops the stage in seconds
    synth_x, synth_y, rows, info = load_samples(path(cfg.paths.samples_dir))
    prepared = load_info(path(cfg.paths.prepared_dir))
    names = prepared.class_names
    if names != info["class_names"]:
        raise ValueError(f"samples have classes {info['class_names']} but {prepared.root} has {names}")
    train_x, train_y = load_split(prepared.root, "train")
    test_x, test_y = held_out(prepared.root, e.real_split)
    train_items = [r for r in read_manifest(prepared.root) if r["split"] == "train"]
    k = prepared.num_classes
    device = device_of(cfg)  # the classifiers and encoders run there; images stay in host memory

    clf = cached_classifier(prepared.root, train_x, train_y, k, e.classifier_steps, e.seed, device)
    encoder = encoder_of(e, clf, e.classifier_steps, device)
    extractors = [encoder.description]
    metrics = realism_metrics(clf, train_x, train_y, test_x, test_y, synth_x, synth_y, names,
                              n_pairs=e.n_pairs, seed=e.seed)
    fkw = dict(OmegaConf.to_container(e.fidelity), seed=e.seed)
    metrics.update(fidelity_metrics(encoder(test_x), test_y, encoder(synth_x), synth_y, names, **fkw))
    if prepared.spatial_dims == 3 and e.encoder.planes_25d:
        sx, sy = slices_for_training(train_x, train_y)
        clf2d = cached_classifier(prepared.root, sx, sy, k, e.classifier_steps, e.seed, device, kind="slice")
        planes = PlaneFeatureExtractor(FeatureExtractor(clf2d, f"medaug 2D DenseNet trained on plane slices of the "
                                                               f"real train volumes ({e.classifier_steps} steps)"))
        extractors.append(planes.description)
        metrics.update(fidelity_metrics(planes(test_x), test_y, planes(synth_x), synth_y, names, suffix="_25d", **fkw))

    p = e.privacy
    flags = PrivacyFlags(p.max_copy_rate, p.max_closer_share, p.min_dcr_ratio, p.alpha)
    audit = privacy_audit(synth_x, train_x, test_x, [r["patient"] for r in train_items], encoder, space=p.space,
                          percentile=p.percentile, flags=flags, synth_labels=synth_y, class_names=names, seed=e.seed)
    metrics.update(audit.metrics)
    if e.utility.seeds:
        metrics.update(utility_metrics(train_x, train_y, synth_x, synth_y, test_x, test_y, k,
                                       seeds=list(e.utility.seeds), steps=e.utility.steps,
                                       batch_size=e.utility.batch_size,
                                       train_fn=partial(train_classifier, device=device)).metrics())
    finite = {key: v for key, v in metrics.items() if math.isfinite(v)}
    privacy = audit.summary() | {"extractors": extractors, "samples_id": samples_id(path(cfg.paths.samples_dir))}

    out_dir = path(cfg.paths.eval_dir)
    with atomic_folder(out_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps({key: (v if math.isfinite(v) else None)
                                                      for key, v in sorted(metrics.items())}, indent=2))
        (tmp / "privacy.json").write_text(json.dumps(privacy, indent=2))
        sample_index = [int(r.get("index", i)) for i, r in enumerate(rows)]  # one manifest row per sample
        write_per_sample(tmp / "per_sample.csv", audit.scores, sample_index, synth_y.tolist(), names, train_items)
        pictures = write_pictures(tmp, synth_x, synth_y, test_x, test_y, train_x, names, audit.scores, e.pairs_top)
        write_report(tmp / "report.md", metrics, names, extractors, privacy, pictures,
                     {"samples": f"{len(synth_x)} synthetic ({info.get('checkpoint_id', '?')}), "
                                 f"{len(train_x)} real train, {len(test_x)} real held-out",
                      "copy score space": f"{p.space} (threshold = {p.percentile}th percentile of held-out maxima)"})
    tags = flatten(container(e), "evaluate.")
    if e.encoder.weights:
        tags["evaluate.encoder.weights"] = "<path>"
    with tracked(tracker, run_name=cfg.name, run_id=info.get("mlflow_run_id"), tags={"medaug.job": cfg.name}):
        tracker.set_tags(tags | {"evaluate.extractor": " | ".join(extractors), "privacy.verdict": audit.verdict})
        tracker.log_metrics(finite)
        for file in sorted(out_dir.iterdir()):
            if file.name != "DONE":
                tracker.log_artifact(file, "evaluation")
    for key in sorted(metrics):
        if key.count("/") == 1 and not key.endswith("_std"):
            log.info("  %-32s %.4f", key, metrics[key])
    log.info("privacy verdict: %s%s", audit.verdict.upper(), "".join(f"\n  - {r}" for r in audit.reasons))
    log.info("report written to %s", out_dir / "report.md")
    return metrics | {"privacy/verdict": audit.verdict}


main = stage_main("evaluate", run)

if __name__ == "__main__":
    main()
