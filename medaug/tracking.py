"""Experiment tracking: an MLflow tracker (imported lazily) and a no-op tracker.

All stages of one job log into one MLflow run: ``train`` creates it and stores its id
in the checkpoint; ``sample``, ``evaluate`` and ``export`` reopen it when it exists in
the same tracking store, and start a fresh run otherwise.

Local default: ``sqlite:///<output_dir>/mlflow.db`` with artifacts in
``<output_dir>/mlartifacts``; a server is used by setting ``MLFLOW_TRACKING_URI`` or
``tracking.uri``. Parameters never carry file paths (they can hold patient names).

Example::

    tracker = MLflowTracker("sqlite:////tmp/mlflow.db", "medaug-demo", artifact_dir="/tmp/mlartifacts")
    with tracked(tracker, run_name="train") as t:    # FINISHED at the end, KILLED on an error
        t.log_metrics({"train/loss": 0.1}, step=10)
"""

from __future__ import annotations

import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

log = logging.getLogger("medaug")
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the MLflow 3 UI: model training, not GenAI

PATH_KEYS = ("path", "dir", "root", "labels", "uri", "file")
MAX_PARAM_LEN = 500


class Tracker(Protocol):
    run_id: str | None

    def start(
        self, run_name: str | None = None, run_id: str | None = None, tags: Mapping | None = None
    ) -> str | None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_image(self, path: str | Path, key: str, step: int) -> None: ...
    def log_dataset(self, dataset: Any, context: str) -> None: ...
    def register_model(self, name: str, checkpoint: str | Path) -> str | None: ...
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

    def log_image(self, path, key, step):
        pass

    def log_dataset(self, dataset, context):
        pass

    def register_model(self, name, checkpoint):
        return None

    def end(self, status="FINISHED"):
        pass


class TrackingUnavailable(ConnectionError):
    """The tracking server does not answer."""


def redacted(uri: str) -> str:
    """``uri`` without a user name or password (``http://user:pw@host`` → ``http://host``)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urllib.parse.urlunsplit(parts)


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailable` within about ``timeout`` seconds when the MLflow server at an
    ``http(s)://`` ``uri`` does not answer; any HTTP answer (even an error status) means it is up.
    Other URIs (sqlite, file, databricks) are not checked."""
    if not uri.startswith(("http://", "https://")):
        return
    # without the user:password of the URI (urllib would take it for the host name); a server that wants
    # them still answers (401), which is all this asks
    probe = redacted(uri).rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=medaug-probe"
    try:
        with urllib.request.urlopen(probe, timeout=timeout):
            pass
    except urllib.error.HTTPError:  # the server answered
        pass
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLError):  # it answered in TLS; certificates are MLflow's business
            return
        raise TrackingUnavailable(
            f"tracking server {redacted(uri)} does not answer ({reason}); start it, fix "
            "tracking.uri / MLFLOW_TRACKING_URI, or pass tracking.on_error=continue to "
            "track to a local store"
        ) from None


class GuardedTracker:
    """A tracker whose failures never stop the work it tracks: the first error is logged as one
    warning and the tracker is switched off after it (a server that went away is not waited for
    again at every step). ``KeyboardInterrupt`` and other non-``Exception`` errors pass through."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.failed: str | None = None

    @property
    def run_id(self):
        return self.tracker.run_id

    @property
    def uri(self):
        return getattr(self.tracker, "uri", None)

    def _call(self, name: str, *args, **kwargs):
        if self.failed:
            return None
        try:
            return getattr(self.tracker, name)(*args, **kwargs)
        except Exception as err:
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            log.warning(
                "tracking failed in %s (%s); the work goes on and its files are written, but nothing "
                "more is tracked in this run",
                name,
                self.failed,
            )
            return None

    def start(self, run_name=None, run_id=None, tags=None):
        return self._call("start", run_name=run_name, run_id=run_id, tags=tags)

    def log_params(self, params):
        self._call("log_params", params)

    def log_metrics(self, metrics, step=None):
        self._call("log_metrics", metrics, step=step)

    def log_artifact(self, path, artifact_path=None):
        self._call("log_artifact", path, artifact_path)

    def set_tags(self, tags):
        self._call("set_tags", tags)

    def log_image(self, path, key, step):
        self._call("log_image", path, key, step)

    def log_dataset(self, dataset, context):
        self._call("log_dataset", dataset, context)

    def register_model(self, name, checkpoint):
        return self._call("register_model", name, checkpoint)

    def end(self, status="FINISHED"):
        self._call("end", status)


def guarded(tracker) -> GuardedTracker:
    """``tracker`` (None: a :class:`NullTracker`) wrapped in a :class:`GuardedTracker`, once."""
    if isinstance(tracker, GuardedTracker):
        return tracker
    return GuardedTracker(tracker if tracker is not None else NullTracker())


@contextmanager
def tracked(
    tracker: Tracker, run_name: str | None = None, run_id: str | None = None, tags: Mapping | None = None
) -> Iterator[Tracker]:
    """The run of ``tracker`` around a block: started (``run_id`` reopened when the store has it), ended
    FINISHED when the block finishes and KILLED when anything escapes it (an error, Ctrl-C, SIGTERM's
    :class:`~medaug.training.Terminated`), which is raised on. A tracker that fails to end a killed run
    only logs a warning: the error that killed it is the one the user sees."""
    tracker.start(run_name=run_name, run_id=run_id, tags=tags)
    try:
        yield tracker
    except BaseException:
        try:
            tracker.end("KILLED")
        except Exception as err:
            log.warning(
                "tracking could not end the run as KILLED (%s: %s)",
                type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "",
            )
        raise
    tracker.end()


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
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND])
            )
        else:
            self.experiment_id = found.experiment_id
            if found.tags.get(EXPERIMENT_KIND[0]) is None:
                self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
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

    def log_image(self, path, key, step):
        """A PNG at ``step`` under ``key``: the UI's image panel shows them in step order."""
        from PIL import Image

        with Image.open(path) as image:
            self.client.log_image(self.run_id, image.copy(), key=key, step=int(step))

    def log_dataset(self, dataset, context):
        """``dataset`` (an ``mlflow.entities.Dataset``, see :func:`medaug.registry.dataset_entity`) as an input of
        this run, tagged with its ``context`` (``training``, ``export``, ...)."""
        from mlflow.entities import DatasetInput, InputTag

        self.client.log_inputs(
            self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        )

    def register_model(self, name, checkpoint):
        """Register ``checkpoint`` as the pyfunc generator ``name`` (see :mod:`medaug.registry`); its version."""
        from medaug.registry import register_generator

        return register_generator(self.uri, self.run_id, name, checkpoint)

    def end(self, status="FINISHED"):
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    def ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {self.uri}"


# MLflow's own HTTP defaults (7 retries with backoff, 120 s timeout) wait minutes on a server gone away;
# a user's environment variables win
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def local_tracking_uri(output_dir: str | Path) -> str:
    """The job's own sqlite store, ``sqlite:///<output_dir>/mlflow.db``."""
    return f"sqlite:///{Path(output_dir) / 'mlflow.db'}"


def tracking_uri(uri: str | None, output_dir: str | Path) -> str:
    """Where a job tracks: ``uri`` (``tracking.uri``), else ``MLFLOW_TRACKING_URI``, else the local store."""
    import os

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(output_dir)


def make_tracker(
    backend: str, uri: str | None, experiment: str, output_dir: str | Path, *, on_error: str = "fail", logs: bool = True
):
    """The tracker of ``backend`` (``mlflow`` or ``none``; a :class:`NullTracker` when ``logs`` is False,
    e.g. on a rank other than 0); a local MLflow store keeps artifacts in ``<output_dir>/mlartifacts``.

    A tracking server is asked first, with a few seconds' timeout: when it does not answer,
    ``on_error=fail`` raises :class:`TrackingUnavailable` naming the URI, and ``continue`` tracks to
    the job's local sqlite store instead, saying so."""
    import os

    if backend == "none" or not logs:
        return NullTracker()
    if backend != "mlflow":
        raise ValueError(f"tracking.backend={backend!r}; choose mlflow or none")
    if on_error not in ("fail", "continue"):
        raise ValueError(f"tracking.on_error={on_error!r}; choose fail or continue")
    uri = tracking_uri(uri, output_dir)
    if uri.startswith(("http://", "https://")):
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        try:
            check_server(uri)
        except TrackingUnavailable as err:
            if on_error == "fail":
                raise
            uri = local_tracking_uri(output_dir)
            log.warning("%s; tracking to %s instead (tracking.on_error=continue)", str(err).split(";")[0], uri)
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    return MLflowTracker(uri, experiment, artifact_dir=Path(output_dir) / "mlartifacts" if local else None)
