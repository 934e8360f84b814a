"""Experiment tracking: an MLflow tracker (imported lazily) and a no-op tracker.

All stages of one job log into one MLflow run: ``train`` creates it and stores its id
in the checkpoint; ``sample``, ``evaluate`` and ``export`` reopen it when it exists in
the same tracking store, and start a fresh run otherwise.

Local default: ``sqlite:///<output_dir>/mlflow.db`` with artifacts in
``<output_dir>/mlartifacts``; a server is used by setting ``MLFLOW_TRACKING_URI`` or
``tracking.uri``. Parameters never carry file paths (they can hold patient names).

Example::

    tracker = MLflowTracker("sqlite:////tmp/mlflow.db", "medaug-demo", artifact_dir="/tmp/mlartifacts")
    tracker.start(run_name="train")
    tracker.log_metrics({"train/loss": 0.1}, step=10)
    tracker.end()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol

PATH_KEYS = ("path", "dir", "root", "labels", "uri", "file")
MAX_PARAM_LEN = 500


class Tracker(Protocol):
    run_id: str | None

    def start(self, run_name: str | None = None, run_id: str | None = None, tags: Mapping | None = None) -> str | None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracks nothing; for tests and ``tracking=none``."""

    run_id = None
    uri = None

    def start(self, run_name=None, run_id=None, tags=None):
        return None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass

    def end(self, status="FINISHED"):
        pass


def flatten(config: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config → ``{"training.lr": "0.0002", ...}``; values that name files or folders
    are replaced by ``<path>`` so no local path (which may hold a patient's name) leaves."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif any(k in str(key).lower() for k in PATH_KEYS) and isinstance(value, str):
            flat[name] = "<path>"
        else:
            flat[name] = str(value)[:MAX_PARAM_LEN]
    return flat


class MLflowTracker:
    """Logs to one MLflow run through ``MlflowClient`` (explicit run ids, no global state)."""

    def __init__(self, uri: str, experiment: str, artifact_dir: str | Path | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = Path(artifact_dir).resolve().as_uri() if artifact_dir else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        self.run_id: str | None = None

    def start(self, run_name=None, run_id=None, tags=None):
        """Reopen ``run_id`` if this store has it, else create a run; returns the run id."""
        if run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.experiment_id == self.experiment_id:
                    self.run_id = run_id
                    self.client.update_run(run_id, status="RUNNING")
                    return run_id
            except Exception:  # unknown id in this store: fall through to a new run
                pass
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics, step=None):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path, artifact_path=None):
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags):
        """Settings that may change between reruns of a stage (params may not)."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:MAX_PARAM_LEN]) for k, v in tags.items()])

    def end(self, status="FINISHED"):
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    def ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {self.uri}"
