"""A whole job in one process (``medaug run``): the stages in order, skipping what is complete.

What is skipped:

- a stage with neither a ``key`` nor a ``complete`` check (prepare) always runs; when its output folder is
  unchanged afterwards it reused what was there, and counts as skipped;
- a stage with a ``complete`` check (train: its checkpoint reached ``training.max_steps`` on this dataset)
  is skipped when the check returns its result;
- a stage with a ``key`` (a hash of its settings, the versions of its inputs and its output folder; sample,
  evaluate, export) is skipped when ``run.json`` records that it made its output folder with that key and
  the folder is unchanged since (its ``DONE`` marker). A stage whose input was rewritten, or whose
  settings changed, runs again.

Example::

    stages = [JobStage("prepare", run_prepare, prepared_dir), ...]
    result = run_stages(stages, Record(output_dir / "run.json"))
    result["ran"], result["skipped"]   # stage names
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

from medaug.atomic import atomic_file
from medaug.data import load_info
from medaug.model import load_checkpoint

log = logging.getLogger("medaug")


def stamp(target: Path) -> str | None:
    """Which version of a file, or of a folder finished by ``atomic_folder`` (its ``DONE`` marker), is
    there: inode, size and mtime, which every rewrite changes; None when there is none."""
    target = target / "DONE" if target.is_dir() else target
    if not target.is_file():
        return None
    st = target.stat()
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def stage_key(settings: Mapping, inputs: Mapping[str, Path], output: Path) -> str:
    """A hash of what a stage reads (its plain ``settings``, the versions of its ``inputs``) and where it writes."""
    what = {
        "settings": dict(settings),
        "inputs": {name: [str(p), stamp(p)] for name, p in inputs.items()},
        "output": str(output),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trained(ckpt_path: Path, prepared_dir: Path, max_steps: int, trust: bool = False) -> dict | None:
    """train's result when its checkpoint has reached ``max_steps`` on the dataset prepared in ``prepared_dir``."""
    if not ckpt_path.is_file():
        return None
    ckpt = load_checkpoint(ckpt_path, trust)
    if ckpt.step < max_steps or ckpt.meta.get("dataset") != load_info(prepared_dir).fingerprint:
        return None
    return {"train/step": ckpt.step, "checkpoint": str(ckpt_path)}


class Record:
    """``run.json``: per stage, the key it ran with, the stamp of the folder it wrote and its result
    (hashes, paths under the job's folder and counts; no settings, no patient data)."""

    def __init__(self, file: Path):
        self.file = Path(file)
        self.stages = json.loads(self.file.read_text()) if self.file.is_file() else {}

    def done(self, stage: str, key: str, output: Path) -> dict | None:
        """The recorded result when ``stage`` made ``output`` with ``key`` and the folder is unchanged."""
        entry, now = self.stages.get(stage), stamp(output)
        return entry["result"] if entry and now is not None and (entry["key"], entry["output"]) == (key, now) else None

    def save(self, stage: str, key: str, output: Path, result: dict) -> None:
        self.stages[stage] = {"key": key, "output": stamp(output), "result": result}
        with atomic_file(self.file) as tmp:
            tmp.write_text(json.dumps(self.stages, indent=2, default=str))


class JobStage(NamedTuple):
    """One stage of a job: ``run()`` does it and returns its result; ``output`` is the folder (or file) it
    writes; ``key()`` (computed when its turn comes, after the stages before it ran) or ``complete()`` say
    when it may be skipped (see the module's docstring); ``summary(result)`` prints, when it is skipped, what
    it prints at its end (its ``run`` prints it otherwise)."""

    name: str
    run: Callable[[], dict]
    output: Path
    key: Callable[[], str] | None = None
    complete: Callable[[], dict | None] | None = None
    summary: Callable[[dict], None] | None = None


def run_stages(stages: Sequence[JobStage], record: Record) -> dict:
    """Run ``stages`` in order; returns ``{"ran": [...], "skipped": [...], "results": {stage: result}}``
    (a skipped stage's result is the one recorded when it ran). The first stage that fails stops the job."""
    ran, skipped, results = [], [], {}
    for stage in stages:
        started = time.perf_counter()
        key = stage.key() if stage.key else None
        before = stamp(stage.output) if key is None and stage.complete is None else None
        result = stage.complete() if stage.complete else record.done(stage.name, key, stage.output) if key else None
        if result is not None:
            skipped.append(stage.name)
            log.info("run: %s is complete for these settings; skipped", stage.name)
            if stage.summary:
                stage.summary(result)
        else:
            log.info("run: %s", stage.name)
            result = stage.run()
            if before is not None and stamp(stage.output) == before:
                skipped.append(stage.name)  # the stage found its output complete and reused it
                log.info("run: %s reused %s (same files and settings)", stage.name, stage.output)
            else:
                ran.append(stage.name)
                if stage.summary is None:  # a stage's summary stays the last thing it printed
                    log.info("run: %s took %.0f s", stage.name, time.perf_counter() - started)
            if key:
                record.save(stage.name, key, stage.output, result)
        results[stage.name] = result
    return {"ran": ran, "skipped": skipped, "results": results}


def job_summary(result: Mapping, experiment: str, uri: str) -> str:
    """What a job ends with (``make demo``, ``medaug run``): where export's ``result`` put the synthetic
    dataset, its data card and sharing bundle, and the MLflow run (in ``experiment`` at ``uri``, unless the
    result names the store it fell back to) that tracked it."""
    out = Path(result["export_dir"])
    lines = [
        f"\nSynthetic dataset : {out}  ({result['samples']} images)",
        f"Data card         : {out / 'DATA_CARD.md'}",
    ]
    if result.get("archive"):
        lines.append(f"Sharing bundle    : {result['archive']}  (checksum in {result['archive']}.sha256)")
    if result.get("mlflow_run_id"):
        uri = result.get("mlflow_uri") or uri
        lines.append(f"MLflow run        : {result['mlflow_run_id']} in experiment '{experiment}' at {uri}")
        lines.append(f"Open the UI with  : mlflow ui --backend-store-uri {uri}")
    return "\n".join(lines)
