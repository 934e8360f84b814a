"""Realism against the number of sampling steps, per sampler, for one trained job.

Run by hand after `make demo` (or any finished train stage):

    python benchmarks/sampler_steps.py --job outputs/demo_2d [--plan dpmpp_2m:10,dpmpp_2m:20,ddim:50,ddpm:1000]

Rectified flow beside it: train a second job on the same data with the same budget and ``scheduler=rflow``,
then give it as ``--rflow-job`` (its rows are ``rflow:<steps>``; the two checkpoints must share the dataset
and the training steps):

    medaug run experiment=demo_2d name=demo_2d_rflow scheduler=rflow
    python benchmarks/sampler_steps.py --job outputs/demo_2d --rflow-job outputs/demo_2d_rflow \
        --plan dpmpp_2m_sde:5,dpmpp_2m_sde:10,dpmpp_2m_sde:20,dpmpp_2m_sde:30,dpmpp_2m_sde:50,ddpm:1000

For each sampler:steps pair it samples the same labels with the same seed from the job's
checkpoint and scores them with the evaluate stage's metrics against the held-out real
splits (val + test): Fréchet distance, precision and recall on the features of a classifier
trained on the real train split, label fidelity and intensity histogram distance; one run per
seed (``--seeds``), reported as mean and standard deviation, since with the demo's small
held-out set the Fréchet distance of one run is noisy. Writes
benchmarks/results/sampler-steps-<job>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from medaug.data import load_info, load_split
from medaug.metrics import FeatureExtractor, fidelity_with_floor, realism_metrics, train_classifier
from medaug.model import ema_network, load_checkpoint
from medaug.sampling import inference_scheduler, labels_for_counts, sample_images

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("fidelity/fd", "fidelity/precision", "fidelity/recall", "fidelity/label_acc", "fidelity/hist_w1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="outputs/demo_2d")
    ap.add_argument(
        "--plan",
        default="dpmpp_2m_sde:10,dpmpp_2m_sde:15,dpmpp_2m_sde:20,dpmpp_2m_sde:30,"
        "dpmpp_2m_sde:50,dpmpp_2m:10,dpmpp_2m:20,dpmpp_2m:50,pndm:20,ddim:20,ddim:50,ddpm:1000",
    )
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--seeds", default="1234,11234,21234", help="one run per seed; mean and sd reported")
    ap.add_argument("--rflow-job", default=None, help="a job trained with scheduler=rflow on the same data and budget")
    ap.add_argument("--rflow-plan", default="rflow:5,rflow:10,rflow:20,rflow:30,rflow:50")
    args = ap.parse_args()
    job = Path(args.job)
    ckpt = load_checkpoint(job / "train" / "checkpoints" / "last.pt")
    info = load_info(job / "prepared")
    nets = {"": (ema_network(ckpt), ckpt)}
    plan = args.plan.split(",")
    if args.rflow_job:
        flow = load_checkpoint(Path(args.rflow_job) / "train" / "checkpoints" / "last.pt")
        if (flow.meta.get("dataset"), flow.step) != (ckpt.meta.get("dataset"), ckpt.step):
            raise SystemExit(
                f"{args.rflow_job}: trained {flow.step} steps on dataset {flow.meta.get('dataset')}, "
                f"{args.job}: {ckpt.step} on {ckpt.meta.get('dataset')}; give both the same data and "
                "budget"
            )
        nets["rflow"] = (ema_network(flow), flow)
        plan += args.rflow_plan.split(",")
    train_x, train_y = load_split(info.root, "train")
    held = [load_split(info.root, split) for split in ("val", "test")]  # the evaluate stage's default
    test_x, test_y = torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])
    clf = train_classifier(train_x, train_y, info.num_classes, steps=400, seed=0)
    features = FeatureExtractor(clf, "DenseNet trained on the real train split")
    real_feats = features(test_x)
    labels = labels_for_counts({c: args.per_class for c in range(info.num_classes)})
    seeds = [int(v) for v in args.seeds.split(",")]
    rows = {}
    for item in plan:
        sampler, steps = item.split(":")
        net, which = nets.get("rflow", nets[""]) if sampler == "rflow" else nets[""]
        runs = []
        for seed in seeds:  # sample i starts from seed + i: keep seeds further apart than the sample count
            t0 = time.perf_counter()
            x = sample_images(
                net,
                inference_scheduler(which.config["scheduler"], sampler, int(steps)),
                labels,
                ckpt.meta["image_shape"],
                guidance_scale=args.guidance,
                null_class=info.num_classes,
                seed=seed,
                batch_size=64,
                progress=False,
            )
            sampling_s = time.perf_counter() - t0  # the metrics below are not the sampler's time
            m = realism_metrics(clf, train_x, train_y, test_x, test_y, x, labels, info.class_names, seed=0)
            m.update({f"fidelity/{k}": v for k, v in fidelity_with_floor(real_feats, features(x), seed=0).items()})
            runs.append(
                {
                    **{k: m[k] for k in KEYS},
                    "seconds": time.perf_counter() - t0,
                    "s_per_sample": sampling_s / len(labels),
                }
            )
        rows[item] = {k: float(np.mean([r[k] for r in runs])) for k in (*KEYS, "seconds", "s_per_sample")}
        rows[item].update(
            {f"{k}_sd": float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0 for k in KEYS}
        )
        print(item, rows[item], flush=True)
    rows["real_reference"] = {
        "fidelity/label_acc": m["fidelity/label_acc_real"],
        "fidelity/hist_w1": m["fidelity/hist_w1_real"],
        **{k: m[f"{k}_floor"] for k in KEYS[:3]},
    }
    out = ROOT / "benchmarks" / "results" / f"sampler-steps-{job.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "checkpoint": ckpt.id,
                "training_steps": ckpt.step,
                "per_class": args.per_class,
                "rflow_checkpoint": nets["rflow"][1].id if "rflow" in nets else None,
                "seeds": seeds,
                "guidance_scale": args.guidance,
                "results": rows,
            },
            indent=1,
        )
    )
    print(f"\n{'sampler:steps':16} " + " ".join(f"{k:>22}" for k in KEYS) + "  s/sample")
    for item, r in rows.items():
        cells = [f"{r[k]:.4f}" + (f" ±{r[k + '_sd']:.4f}" if k + "_sd" in r else "") for k in KEYS]
        print(f"{item:16} " + " ".join(f"{c:>22}" for c in cells) + f"  {r.get('s_per_sample', 0):8.4f}")
    print("written to", out)


if __name__ == "__main__":
    main()
