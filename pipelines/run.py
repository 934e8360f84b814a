"""run: a whole job in one process, prepare → train → sample → evaluate → export, skipping what is complete.

    python -m pipelines.run experiment=demo_2d                     # what `make demo` runs
    medaug run experiment=demo_3d sample.num_per_class=32 'export.format=[nifti,png]'

Every stage composes the same config tree (``conf/base.yaml``), so one override line drives them all, and
each stage gets exactly the config ``medaug <stage>`` with the same overrides would. What is skipped (see
:mod:`medaug.job`): train when its checkpoint has reached ``training.max_steps`` on this prepared dataset;
sample, evaluate and export when ``<paths.output_dir>/run.json`` records that this command made their
folder with the same settings from the same inputs and the folder is unchanged since. Ends with export's
summary: the synthetic dataset, its data card and the MLflow run.
"""

from __future__ import annotations

import importlib

from omegaconf import DictConfig, OmegaConf

from medaug.masks import mask_checkpoint
from medaug.job import JobStage, Record, job_summary, run_stages, stage_key, trained
from medaug.runtime import distributed
from pipelines.common import default_ckpt, path, stage_main, tracking_uri, training_ckpt

# What sample, evaluate and export read: config keys, and the files or folders of the stages before them
# ("ckpt": the checkpoint; a folder by its DONE marker). A change in any of them runs the stage again.
READS = {
    "sample": (("sample", "ckpt_path", "training.device", "training.precision"), ("ckpt",)),
    "evaluate": (("evaluate", "training.device"), ("paths.prepared_dir", "paths.samples_dir")),
    "export": (("export", "name", "tracking"), ("paths.prepared_dir", "paths.samples_dir", "paths.eval_dir", "ckpt")),
}
WRITES = {
    "prepare": "paths.prepared_dir",
    "train": "trained",  # the job's last checkpoint (with ckpt_path=best_private, sample takes an earlier one)
    "sample": "paths.samples_dir",
    "evaluate": "paths.eval_dir",
    "export": "paths.export_dir",
}


def run(cfg: DictConfig) -> dict:
    """Run the job's stages in order; returns ``{"ran": [...], "skipped": [...], "results": {stage: result}}``."""
    if distributed()[2] > 1:
        raise ValueError(
            "medaug run runs a job in one process; under torchrun run the stages one by one "
            "(torchrun ... -m pipelines.train ..., then pipelines.sample ...)"
        )

    def target(name: str):
        if name in ("ckpt", "trained"):
            return default_ckpt(cfg) if name == "ckpt" else training_ckpt(cfg)
        return path(OmegaConf.select(cfg, name))

    def key(stage: str) -> str:
        keys, inputs = READS[stage]
        settings = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v := OmegaConf.select(cfg, k)) else v
            for k in keys
        }
        return stage_key(settings, {name: target(name) for name in inputs}, target(WRITES[stage]))

    stages = [
        JobStage(
            name,
            lambda name=name: importlib.import_module(f"pipelines.{name}").run(cfg),
            target(WRITES[name]),
            key=(lambda name=name: key(name)) if name in READS else None,
        )
        for name in WRITES
    ]

    def train_complete():  # the image model, and the mask model when the job trains one (training.mask_model)
        ckpts = [training_ckpt(cfg)]
        if cfg.training.get("mask_model"):
            ckpts.append(mask_checkpoint(path(cfg.paths.train_dir)))
        done = [trained(c, path(cfg.paths.prepared_dir), cfg.training.max_steps, cfg.trust_checkpoint) for c in ckpts]
        return done[0] if all(done) else None

    stages[1] = stages[1]._replace(complete=train_complete)
    stages[4] = stages[4]._replace(
        summary=lambda result: print(job_summary(result, cfg.tracking.experiment, tracking_uri(cfg)))
    )
    return run_stages(stages, Record(path(cfg.paths.output_dir) / "run.json"))


main = stage_main("run", run)

if __name__ == "__main__":
    main()
