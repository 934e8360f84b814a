"""The privacy/utility table: one job per row on the same prepared demo data, from training to evaluation.

    python benchmarks/private_table.py                       # the full budget: the experiments as they are
    python benchmarks/private_table.py --budget reduced      # a smoke-size budget (say so when quoting it)

Rows: ``baseline`` (experiment=demo_2d), ``dp_eps10`` and ``dp_eps50`` (experiment=demo_2d_dp at
ε = 10 and 50), ``best_private`` (demo_2d with ``training.privacy_probe_every``, sampled and evaluated
with ``ckpt_path=best_private``). Each row trains (timed), samples and evaluates (membership inference
included) with the stage recipes of ``pipelines/``; columns: FD with its real-vs-real floor, label
fidelity, TSTR accuracy, MIA AUC (95 % CI), closer-to-train (p), copy rate, verdict, ε, training time.
Writes ``benchmarks/results/private-table[-reduced].json`` and ``.md``; a row that fails records its error; rows
not named in ``--rows`` keep their earlier results from that file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from medaug.probe import read_probes
from pipelines import evaluate, prepare, sample, train

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "baseline": ["experiment=demo_2d"],
    "dp_eps10": ["experiment=demo_2d_dp", "training.dp.target_epsilon=10"],
    "dp_eps50": ["experiment=demo_2d_dp", "training.dp.target_epsilon=50"],
    "best_private": ["experiment=demo_2d"],  # + training.privacy_probe_every=PROBE_EVERY[budget]
}
PROBE_EVERY = {"full": 100, "reduced": 50}
REDUCED = [  # a budget for a shared 2-core CPU: a tiny UNet, fewer steps, samples and classifier steps
    "model=unet_tiny",
    "training.max_steps=200",
    "training.ckpt_every=100",
    "sample.num_per_class=12",
    "sample.steps=10",
    "evaluate.classifier_steps=150",
    "evaluate.utility.seeds=[0]",
    "evaluate.utility.steps=150",
    "evaluate.mia.bootstrap=300",
]
COLUMNS = (
    ("FD (floor)", lambda m: f"{m['fidelity/fd']:.2f} ({m['fidelity/fd_floor']:.2f})"),
    ("label acc", lambda m: f"{m['fidelity/label_acc']:.2f}"),
    ("TSTR acc", lambda m: f"{m['utility/tstr_acc']:.2f}" if "utility/tstr_acc" in m else "n/a"),
    (
        "MIA AUC (95% CI)",
        lambda m: f"{m['privacy/mia_auc']:.2f} ({m['privacy/mia_auc_lo']:.2f}-{m['privacy/mia_auc_hi']:.2f})",
    ),
    ("closer-to-train (p)", lambda m: f"{m['privacy/closer_to_train']:.2f} ({m['privacy/closer_to_train_p']:.2g})"),
    ("copy rate", lambda m: f"{m['privacy/copy_rate']:.2f}"),
)


def cfg_of(stage: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=stage, overrides=overrides)


def run_row(name: str, overrides: list[str]) -> dict:
    """Train (timed), sample and evaluate one row; its metrics, verdict, ε and training time."""
    train_cfg = cfg_of("train", overrides)
    started = time.perf_counter()
    train.run(train_cfg)
    train_s = time.perf_counter() - started
    later = [*overrides, "ckpt_path=best_private"] if name == "best_private" else overrides
    sample.run(cfg_of("sample", later))
    metrics = evaluate.run(cfg_of("evaluate", later))
    return row_result(train_cfg, metrics, train_s)


def row_result(train_cfg, metrics: dict, train_s: float) -> dict:
    """One row's record: its metrics, verdict, ε, checkpoint step, training time and probe history."""
    info = json.loads((Path(train_cfg.paths.samples_dir) / "info.json").read_text())
    dp = info.get("dp") or {}
    probes = [
        {k: r[k] for k in ("step", "verdict", "val_loss", "samples")}
        | {k.split("/")[1]: r["metrics"].get(k) for k in ("privacy/closer_to_train", "privacy/closer_to_train_p")}
        for r in read_probes(Path(train_cfg.paths.train_dir) / "checkpoints")
    ]
    return dict(
        metrics={k: v for k, v in metrics.items() if not isinstance(v, float) or math.isfinite(v)},
        verdict=metrics["privacy/verdict"],
        epsilon=dp.get("epsilon"),
        checkpoint_step=info["checkpoint_step"],
        train_s=round(train_s, 1),
        **({"probes": probes} if probes else {}),
    )


def table(rows: dict) -> str:
    head = ["row", *(c for c, _ in COLUMNS), "verdict", "ε", "ckpt step", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = []
        for _, fmt in COLUMNS:
            try:
                cells.append(fmt(r["metrics"]))
            except (KeyError, TypeError):
                cells.append("n/a")
        eps = f"{r['epsilon']:.1f}" if r["epsilon"] is not None else "none"
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {r['verdict']} | {eps} | {r['checkpoint_step']} | {r['train_s']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=["full", "reduced"], default="full")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "private_table"), help="the jobs' folders")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"a subset of {','.join(ROWS)}")
    args = ap.parse_args()
    out, extra = Path(args.out), (REDUCED if args.budget == "reduced" else [])
    common = ["tracking=none", f"paths.prepared_dir={out / 'prepared'}", *extra]
    prepare.run(cfg_of("prepare", [f"paths.output_dir={out}", "experiment=demo_2d", *common]))
    stem = ROOT / "benchmarks" / "results" / ("private-table" + ("-reduced" if args.budget == "reduced" else ""))
    earlier = json.loads(stem.with_suffix(".json").read_text())["rows"] if stem.with_suffix(".json").is_file() else {}
    results = {k: v for k, v in earlier.items() if k not in args.rows.split(",")}  # rows not rerun are kept
    for name in args.rows.split(","):
        overrides = [*ROWS[name], *common, f"name={name}", f"paths.output_dir={out / name}"]
        if name == "best_private":
            overrides.append(f"training.privacy_probe_every={PROBE_EVERY[args.budget]}")
        try:
            results[name] = run_row(name, overrides)
        except Exception as err:  # a row that fails (none passes best_private, ...) is recorded, the others go on
            traceback.print_exc()
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        write(stem, results, args.budget, extra)  # after every row: a later row that is stopped loses nothing
        print(table(results), flush=True)
    print(f"wrote {stem}.json and .md")


def write(stem: Path, results: dict, budget: str, extra: list[str]) -> None:
    """The table so far, in row order, as JSON and Markdown (with the budget and the torch thread count)."""
    results = {name: results[name] for name in ROWS if name in results}
    head = {"budget": budget, "overrides": extra, "torch_threads": torch.get_num_threads()}
    stem.with_suffix(".json").write_text(json.dumps(head | {"rows": results}, indent=2))
    stem.with_suffix(".md").write_text(f"Budget: {budget} {' '.join(extra)}\n\n" + table(results) + "\n")


if __name__ == "__main__":
    main()
