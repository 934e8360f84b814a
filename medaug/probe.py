"""Memorisation-aware checkpoints: a privacy probe during training, and the best checkpoint that passes it.

``training.privacy_probe_every=k``: every k steps (through :func:`medaug.training.fit`'s ``on_step`` hook) the
EMA model draws the samples that ``medaug sample`` would draw from that checkpoint (the ``sample`` section's
sampler, steps, guidance, seed and ``num_per_class``; ``training.privacy_probe_per_class`` to draw fewer), which
the memorisation audit (:func:`medaug.privacy.privacy_audit`, pixel space) compares with the train split and the
held-out split(s) the evaluation audits against (``evaluate.real_split``): copy rate, closer-to-train share (p),
DCR ratio; and the membership-inference attack (:mod:`medaug.membership`) runs on a subset of train against val
images (its non-member loss on val is the fidelity below: checkpoints are never ranked on the test split).

Why the probe draws as many samples as the audit, with the same sampler: on the demo (800 steps, 48 samples,
DPM-Solver++ 20 steps) the audit finds closer-to-train 0.66 (p = 0.0045, fail), while a probe of 4 samples per
class with 10 DDIM steps passed at every step from 100 to 800 (closer-to-train 0.37 to 0.53): a different sampler
draws different images from those the audit judges, and 12 samples could not make 0.66 significant anyway. So
``best_private`` took step 800, the failing checkpoint (benchmarks/results/private-table.md). The held-out set
matters as much: closer-to-train compares each sample with a train subset and a held-out subset of the same size,
so a memorised training image is in the train subset in n / |train| of the draws. Against val alone (24 of 72
train images) the probe of step 500 read 0.51; the audit against val + test (48) read 0.66, p = 0.006.

The probe's metrics are logged as ``probe/...`` curves; the checkpoint is kept as ``checkpoints/step_<k>.pt``
and its probe appended to ``checkpoints/probes.json``.

Fidelity, for picking among checkpoints, is the **held-out denoising loss** ``probe/val_loss``: the EMA
model's mean denoising error on the val images at the attack's fixed timesteps and noises (the attack's
non-member error, so it costs nothing extra). Lower means the model describes patients it never saw
better; unlike a Fréchet distance of a few probe samples it is stable with a handful of images, and it
rises again when the model starts to memorise instead of generalise.

``ckpt_path=best_private`` (:func:`best_private`) takes, among the probed checkpoints whose probe passes the
privacy flags (``evaluate.privacy``, checked again when choosing: verdict not ``fail``), the one with the
lowest ``probe/val_loss`` (the later one on a tie).

Example::

    probe = probe_callback(500, tracker=tracker, ema=ema, meta=meta, ckpt_dir=Path("train/checkpoints"),
                           save=lambda path, step: save_checkpoint(path, ...), prepared_dir="prepared",
                           scheduler_spec=config["scheduler"], sampling=config["sample"])
    fit(..., on_step=chained(preview, probe))
    best_private("train/checkpoints", PrivacyFlags())     # Path("train/checkpoints/step_1500.pt")
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .atomic import atomic_file
from .membership import MIASettings, membership_audit
from .model import build_scheduler
from .privacy import PrivacyFlags, judge, privacy_audit, verdict_of

log = logging.getLogger("medaug")

BEST_PRIVATE = "best_private"  # the ckpt_path value that picks the best probed checkpoint
PROBES = "probes.json"
FIDELITY = "probe/val_loss"


def chained(*callbacks: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """One ``on_step`` for :func:`medaug.training.fit` that calls each given callback in turn (None: none given)."""
    given = [c for c in callbacks if c is not None]
    if not given:
        return None

    def call(step: int) -> None:
        for c in given:
            c(step)

    return call


def probe_metrics(audit_metrics: Mapping[str, float]) -> dict[str, float]:
    """The ``probe/...`` curves of a probe's audit metrics (``privacy/x`` -> ``probe/x``, per class left out) and
    ``probe/val_loss``."""
    out = {f"probe/{k.split('/', 1)[1]}": float(v) for k, v in audit_metrics.items() if k.count("/") == 1}
    out[FIDELITY] = float(audit_metrics["privacy/mia_loss_nonmember"])
    return out


def read_probes(ckpt_dir: str | Path) -> list[dict]:
    """The rows of ``ckpt_dir/probes.json`` (one per probe, by step); [] when there is none."""
    file = Path(ckpt_dir) / PROBES
    return json.loads(file.read_text())["probes"] if file.is_file() else []


def write_probe(ckpt_dir: str | Path, row: dict) -> Path:
    """Add (or replace, same step: a resumed run) ``row`` in ``ckpt_dir/probes.json``, atomically."""
    file = Path(ckpt_dir) / PROBES
    rows = [r for r in read_probes(ckpt_dir) if r["step"] != row["step"]] + [row]
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(file) as tmp:
        Path(tmp).write_text(
            json.dumps({"fidelity": FIDELITY, "probes": sorted(rows, key=lambda r: r["step"])}, indent=2)
        )
    return file


def probe_callback(
    every: int | None,
    *,
    tracker,
    ema,
    meta: Mapping,
    ckpt_dir: Path,
    save: Callable[[Path, int], object],
    prepared_dir: str | Path,
    scheduler_spec: Mapping,
    heldout: Sequence[str] = ("val",),
    space=None,
    flags: PrivacyFlags | None = None,
    mia: MIASettings | None = None,
    sampling: Mapping | None = None,
    per_class: int | None = None,
) -> Callable[[int], None] | None:
    """``callback(step)`` for :func:`medaug.training.fit`'s ``on_step``: every ``every`` steps the probe of the module
    doc on ``ema.model``, logged with ``tracker`` as ``probe/...`` at ``step``, the checkpoint written by
    ``save(ckpt_dir / "step_<step>.pt", step)`` and its row added to ``ckpt_dir/probes.json``. ``sampling``: the
    ``sample`` section (``num_per_class``, ``sampler``, ``steps``, ``guidance_scale``,
    ``seed``, ``batch_size``, ``eta``, ``clip_x0``; missing keys: 4 per class, 10 DDIM steps, w = 2, seed 0);
    ``per_class``: samples per class instead of ``num_per_class``; ``heldout``: the split(s) the copy and
    closer-to-train checks compare with (the evaluation's ``real_split``); ``mia``: the attack's settings (default: 8
    images per class and split, 200 bootstrap resamples). ``space``: a latent model's
    :class:`medaug.latent.LatentSpace`.
    ``every`` 0 or None: no probe (returns None)."""
    if not every:
        return None
    from .data import load_split
    from .dp import train_patients
    from .evaluation import held_out
    from .sampling import class_counts, labels_for_counts, preview_samples

    train_x, train_y = load_split(prepared_dir, "train")
    val_x, val_y = load_split(prepared_dir, "val")
    if len(val_x) < 2:
        raise ValueError(
            f"training.privacy_probe_every={every} needs a val split of at least 2 images in {prepared_dir} "
            f"(it has {len(val_x)}); prepare with a larger data.split val share, or set training.privacy_probe_every=0"
        )
    ref_x = held_out(Path(prepared_dir), heldout)[0]
    patients = train_patients(prepared_dir)
    names = list(meta["class_names"])
    flags = flags or PrivacyFlags()
    mia = mia or MIASettings(max_per_class=8, bootstrap=200, seeds=(0,))
    train_scheduler = build_scheduler(scheduler_spec)
    draw = {"sampler": None, "steps": 10, "guidance_scale": 2.0, "seed": 0, "num_per_class": 4, **(sampling or {})}
    options = {k: draw[k] for k in ("batch_size", "eta", "clip_x0") if k in draw}
    counts = class_counts(per_class or draw["num_per_class"], names, key="the privacy probe's sample.num_per_class")
    labels = labels_for_counts(counts, names)  # the sample stage's labels, in its order
    ckpt_dir = Path(ckpt_dir)

    def callback(step: int) -> None:
        if step % every:
            return
        net = ema.model
        synth = preview_samples(
            net,
            scheduler_spec,
            labels,
            meta["image_shape"],
            null_class=len(names),
            space=space,
            steps=draw["steps"],
            seed=draw["seed"],
            guidance_scale=draw["guidance_scale"],
            sampler=draw["sampler"],
            **options,
        )
        attack = membership_audit(
            net,
            train_scheduler,
            (train_x, train_y),
            (val_x, val_y),
            names,
            mia,
            seed=draw["seed"],
            encode=None if space is None else space.encode,
        )
        audit = privacy_audit(
            synth, train_x, ref_x, patients, None, flags=flags, synth_labels=labels, class_names=names, extra=attack
        )
        curves = probe_metrics(audit.metrics)
        tracker.log_metrics({k: v for k, v in curves.items() if np.isfinite(v)}, step=step)
        path = ckpt_dir / f"step_{step}.pt"
        save(path, step)
        row = dict(
            step=step,
            checkpoint=path.name,
            samples=len(synth),
            verdict=audit.verdict,
            failed=audit.failed,
            val_loss=curves[FIDELITY],
            metrics={k: (float(v) if np.isfinite(v) else None) for k, v in audit.metrics.items() if k.count("/") == 1},
            flags=asdict(flags),
        )
        write_probe(ckpt_dir, row)
        log.info(
            "privacy probe at step %d: %s, val loss %.4f, MIA AUC %.2f, closer-to-train %.2f; kept %s",
            step,
            audit.verdict,
            row["val_loss"],
            audit.metrics["privacy/mia_auc"],
            audit.metrics["privacy/closer_to_train"],
            path.name,
        )

    return callback


def probe_verdict(row: Mapping, flags: PrivacyFlags) -> tuple[str, list[str]]:
    """A probe row's verdict and failed checks under ``flags`` (the row's metrics judged again)."""
    m = {k: (float("nan") if v is None else v) for k, v in row["metrics"].items()}
    checks = judge(m, flags, int(row["samples"]))
    return verdict_of(checks), [c.short for c in checks if c.level == "fail"]


def best_private(ckpt_dir: str | Path, flags: PrivacyFlags | None = None) -> Path:
    """The probed checkpoint of ``ckpt_dir`` with the lowest ``probe/val_loss`` (the later one on a tie) among those
    whose probe passes ``flags`` (verdict not ``fail``; defaults: :class:`medaug.privacy.PrivacyFlags`).

    Raises FileNotFoundError without probes, ValueError (naming each probe's failed checks) when none passes."""
    ckpt_dir, flags = Path(ckpt_dir), flags or PrivacyFlags()
    rows = [r for r in read_probes(ckpt_dir) if (ckpt_dir / r["checkpoint"]).is_file()]
    if not rows:
        raise FileNotFoundError(
            f"{ckpt_dir}: no probed checkpoints ({PROBES}) for ckpt_path={BEST_PRIVATE}; train with "
            "training.privacy_probe_every=<steps> (README 'Sharing a dataset safely')"
        )
    judged = [(r, *probe_verdict(r, flags)) for r in rows]
    passing = [r for r, verdict, _ in judged if verdict != "fail" and r["val_loss"] is not None]
    if not passing:
        why = "; ".join(f"step {r['step']}: {', '.join(failed)}" for r, _, failed in judged)
        raise ValueError(
            f"ckpt_path={BEST_PRIVATE}: no probed checkpoint in {ckpt_dir} passes the privacy flags ({why}); "
            "train with differential privacy (training.dp.enabled=true), or probe earlier and more often"
        )
    best = min(passing, key=lambda r: (r["val_loss"], -r["step"]))
    log.info(
        "%s: step %d (held-out denoising loss %.4f, the lowest of %d passing of %d probed checkpoints)",
        BEST_PRIVATE,
        best["step"],
        best["val_loss"],
        len(passing),
        len(rows),
    )
    return ckpt_dir / best["checkpoint"]
