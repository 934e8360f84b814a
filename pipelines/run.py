"""run: a whole job in one process, prepare → train → sample → evaluate → export, skipping what is complete.

    python -m pipelines.run experiment=demo_2d                     # what `make demo` runs
    medaug run experiment=demo_3d sample.num_per_class=32 'export.format=[nifti,png]'

Every stage composes the same config tree (``conf/base.yaml``), so one override line drives them all,
and each stage gets exactly the config ``medaug <stage>`` with the same overrides would. What is skipped:

- prepare always runs; it reuses a complete prepared dataset made from the same files and settings;
- train is skipped when its checkpoint (``ckpt_path``, default ``paths.train_dir/checkpoints/last.pt``)
  has reached ``training.max_steps`` on this prepared dataset (train would resume it and do nothing);
- sample, evaluate and export are skipped when ``<paths.output_dir>/run.json`` records that this command
  made their folder with the same settings from the same inputs, and the folder is unchanged since (its
  ``DONE`` marker). A stage whose input was rewritten, or whose settings changed, runs again.

Ends with export's summary: the synthetic dataset, its data card and the MLflow run.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from medaug.data import load_info
from medaug.atomic import atomic_file
from medaug.model import load_checkpoint
from medaug.runtime import distributed
from pipelines.common import default_ckpt, log, path, stage_main

JOB = ("prepare", "train", "sample", "evaluate", "export")
# What sample, evaluate and export read: config keys, and the files or folders of the stages before them
# ("ckpt": the checkpoint; a folder by its DONE marker). A change in any of them runs the stage again.
READS = {
    "sample": (("sample", "ckpt_path", "training.device", "training.precision"), ("ckpt",)),
    "evaluate": (("evaluate", "training.device"), ("paths.prepared_dir", "paths.samples_dir")),
    "export": (("export", "name", "tracking"), ("paths.prepared_dir", "paths.samples_dir", "paths.eval_dir", "ckpt")),
}
WRITES = {"prepare": "paths.prepared_dir", "sample": "paths.samples_dir", "evaluate": "paths.eval_dir",
          "export": "paths.export_dir"}


def stamp(target: Path) -> str | None:
    """Which version of a file, or of a folder finished by ``atomic_folder`` (its ``DONE`` marker), is
    there: inode, size and mtime, which every rewrite changes; None when there is none."""
    target = target / "DONE" if target.is_dir() else target
    if not target.is_file():
        return None
    st = target.stat()
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _target(cfg: DictConfig, name: str) -> Path:
    return default_ckpt(cfg) if name == "ckpt" else path(OmegaConf.select(cfg, name))


def _resolved(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def stage_key(cfg: DictConfig, stage: str) -> str:
    """A hash of what ``stage`` reads (its settings, the versions of its inputs) and where it writes."""
    keys, inputs = READS[stage]
    what = {"settings": {k: _resolved(cfg, k) for k in keys},
            "inputs": {name: [str(_target(cfg, name)), stamp(_target(cfg, name))] for name in inputs},
            "output": str(_target(cfg, WRITES[stage]))}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trained(cfg: DictConfig) -> dict | None:
    """train's result when its checkpoint has reached ``training.max_steps`` on this prepared dataset."""
    ckpt_path = default_ckpt(cfg)
    if not ckpt_path.is_file():
        return None
    ckpt = load_checkpoint(ckpt_path, cfg.trust_checkpoint)
    dataset = load_info(path(cfg.paths.prepared_dir)).fingerprint
    if ckpt.step < cfg.training.max_steps or ckpt.meta.get("dataset") != dataset:
        return None
    return {"train/step": ckpt.step, "checkpoint": str(ckpt_path)}


class Record:
    """``<paths.output_dir>/run.json``: per stage, the key it ran with, the stamp of the folder it wrote
    and its result (hashes, paths under the job's folder and counts; no settings, no patient data)."""

    def __init__(self, cfg: DictConfig):
        self.file = path(cfg.paths.output_dir) / "run.json"
        self.stages = json.loads(self.file.read_text()) if self.file.is_file() else {}

    def done(self, cfg: DictConfig, stage: str, key: str) -> dict | None:
        """The recorded result when ``stage`` made its folder with ``key`` and the folder is unchanged."""
        entry = self.stages.get(stage)
        now = stamp(_target(cfg, WRITES[stage]))
        return entry["result"] if entry and now is not None and (entry["key"], entry["output"]) == (key, now) else None

    def save(self, cfg: DictConfig, stage: str, key: str, result: dict) -> None:
        self.stages[stage] = {"key": key, "output": stamp(_target(cfg, WRITES[stage])), "result": result}
        with atomic_file(self.file) as tmp:
            tmp.write_text(json.dumps(self.stages, indent=2, default=str))


def run(cfg: DictConfig) -> dict:
    """Run the job's stages in order; returns ``{"ran": [...], "skipped": [...], "results": {stage: result}}``
    (a skipped stage's result is the one recorded when it ran). The first stage that fails stops the job."""
    if distributed()[2] > 1:
        raise ValueError("medaug run runs a job in one process; under torchrun run the stages one by one "
                         "(torchrun ... -m pipelines.train ..., then pipelines.sample ...)")
    record = Record(cfg)
    ran, skipped, results = [], [], {}
    for stage in JOB:
        started = time.perf_counter()
        module = importlib.import_module(f"pipelines.{stage}")
        key = stage_key(cfg, stage) if stage in READS else None
        before = stamp(_target(cfg, WRITES[stage])) if stage == "prepare" else None
        # prepare always runs (it reuses its dataset itself); the others are skipped when complete
        result = trained(cfg) if stage == "train" else record.done(cfg, stage, key) if key else None
        if result is not None:
            skipped.append(stage)
            log.info("run: %s is complete for these settings; skipped", stage)
            if stage == "export":
                module.print_summary(cfg, result)
        else:
            log.info("run: %s", stage)
            result = module.run(cfg)
            if stage == "prepare" and before is not None and stamp(_target(cfg, WRITES[stage])) == before:
                skipped.append(stage)  # prepare found its dataset complete and reused it
                log.info("run: prepare reused %s (same files and settings)", cfg.paths.prepared_dir)
            else:
                ran.append(stage)
                if stage != JOB[-1]:  # export's summary stays the last thing printed
                    log.info("run: %s took %.0f s", stage, time.perf_counter() - started)
            if key:
                record.save(cfg, stage, key, result)
        results[stage] = result
    return {"ran": ran, "skipped": skipped, "results": results}


main = stage_main("run", run)

if __name__ == "__main__":
    main()
