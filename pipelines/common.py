"""What every stage's entry point shares: the Hydra main, errors, the config's device and tracker.

A stage module defines ``run(cfg) -> dict`` and ``main = stage_main("<stage>", run)``.
Errors caused by the input (bad files, missing folders, bad values, a tracking server
that does not answer) end the process with a one-line message and exit code 2 instead of
a traceback (``MEDAUG_DEBUG=1`` shows the traceback). SIGTERM during training saves the
checkpoint and ends with exit code 143 (128 + 15, as if killed) and one line.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from medaug import runtime, tracking
from medaug.data import DatasetError
from medaug.export import ExportError
from medaug.io import ImageReadError
from medaug.model import last_checkpoint
from medaug.registry import checkpoint_file, is_registry_uri
from medaug.tracking import TrackingUnavailable
from medaug.training import Terminated

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
INPUT_ERRORS = (DatasetError, ExportError, ImageReadError, FileNotFoundError, ValueError, TrackingUnavailable)
log = logging.getLogger("medaug")


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    log.warning("%s", message)


def stage_main(stage: str, run: Callable[[DictConfig], dict]) -> Callable[[], None]:
    """The ``main`` of a stage: Hydra parses the command line, ``run`` does the work."""

    @hydra.main(config_path=str(CONF_DIR), config_name=stage, version_base="1.3")
    def main(cfg: DictConfig) -> None:
        warnings.showwarning = _log_warning  # one log line per warning, not Python's file:line and source line
        try:
            run(cfg)
        except (*INPUT_ERRORS, MissingMandatoryValue) as err:
            if os.environ.get("MEDAUG_DEBUG"):
                raise
            if isinstance(err, MissingMandatoryValue):
                err = f"{err.full_key} has no value; give one on the command line ({err.full_key}=...)"
            print(f"medaug {stage}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except Terminated as err:  # the training loop saved its checkpoint first
            print(f"medaug {stage}: {err}; checkpoint saved, run the same command again to resume", file=sys.stderr)
            raise SystemExit(143) from None

    return main


def container(cfg: DictConfig) -> dict:
    """The resolved config as plain dicts and lists (for checkpoints and MLflow)."""
    return OmegaConf.to_container(cfg, resolve=True)


def path(cfg_value: str) -> Path:
    return Path(str(cfg_value)).expanduser().resolve()


def device_of(cfg: DictConfig) -> torch.device:
    """The stage's device from ``training.device`` (see :func:`medaug.runtime.device_of`)."""
    return runtime.device_of(str(cfg.training.device))


def amp_dtype_of(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    """The stage's autocast dtype from ``training.precision`` (see :func:`medaug.runtime.amp_dtype_of`)."""
    return runtime.amp_dtype_of(str(cfg.training.precision), device)


def tracking_uri(cfg: DictConfig) -> str:
    return tracking.tracking_uri(cfg.tracking.uri, path(cfg.paths.output_dir))


def make_tracker(cfg: DictConfig, any_rank: bool = False):
    """The tracker the config asks for (see :func:`medaug.tracking.make_tracker`). Under torchrun only rank 0
    logs unless ``any_rank``: for work that one rank, whichever it is, finishes alone."""
    t = cfg.tracking
    return tracking.make_tracker(
        t.backend,
        t.uri,
        t.experiment,
        path(cfg.paths.output_dir),
        on_error=t.get("on_error", "fail"),
        logs=any_rank or runtime.distributed()[0] == 0,
    )


def training_ckpt(cfg: DictConfig) -> Path:
    """The checkpoint train resumes from: ``ckpt_path`` when it names one, else the job's last; best_private
    names a checkpoint to sample from, so training goes on from the last."""
    return last_checkpoint(path(cfg.paths.train_dir)) if cfg.get("ckpt_path") == "best_private" else default_ckpt(cfg)


def default_ckpt(cfg: DictConfig) -> Path:
    if cfg.get("ckpt_path") == "best_private":  # the best probed checkpoint that passes the privacy flags
        from medaug.privacy import PrivacyFlags
        from medaug.probe import best_private

        return best_private(path(cfg.paths.train_dir) / "checkpoints", PrivacyFlags.from_dict(cfg.evaluate.privacy))
    if is_registry_uri(cfg.get("ckpt_path")):  # models:/<name>/<version or @alias>: downloaded once
        return checkpoint_file(cfg.ckpt_path, tracking_uri(cfg), path(cfg.paths.output_dir) / "registry")
    return path(cfg.ckpt_path) if cfg.get("ckpt_path") else last_checkpoint(path(cfg.paths.train_dir))
