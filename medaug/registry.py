"""The generator in the MLflow model registry, dataset lineage, and training previews.

``tracking.register=<name>``: ``train`` logs the checkpoint (and, for latent models, its autoencoder)
as an MLflow pyfunc model and registers it as ``<name>``. Its ``predict`` takes a table with one row
per request (columns ``class``, ``count``, ``seed``, ``guidance``, ``sampler``, ``steps``) and returns
one row per image (``class``, ``seed``, ``index``, ``image``: ``(C, *spatial)`` float32 in [-1, 1]);
the param ``output_dir`` also writes them as ``<class>_<seed>_<index>.npy`` there. The checkpoints stay
data: the pyfunc loads them with ``torch.load(weights_only=True)`` and builds only allow-listed networks.

Example::

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/demo-generator/1")
    out = model.predict(pd.DataFrame([{"class": "healthy", "count": 4, "seed": 0, "guidance": 2.0,
                                       "sampler": "ddim", "steps": 20}]))   # 4 rows, out.image[0].shape (1, H, W)

``medaug sample ckpt_path=models:/<name>/<version or @alias>`` samples from the registry
(:func:`checkpoint_file` downloads the model and gives its checkpoint file).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

log = logging.getLogger("medaug")

REGISTRY_PREFIX = "models:/"
ARTIFACT_PATH = "generator"
CHECKPOINT = "generator.pt"
AUTOENCODER = "autoencoder.pt"
COLUMNS = ("class", "count", "seed", "guidance", "sampler", "steps")


def is_registry_uri(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(REGISTRY_PREFIX)


@contextmanager
def _tracking_uri(uri: str):
    """MLflow's fluent API pointed at ``uri`` for a block (the trackers use explicit clients); what was set
    before (often nothing: the environment's default) is put back after it."""
    import mlflow
    from mlflow.tracking import _model_registry, _tracking_service

    before = _tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}  # set_tracking_uri sets them
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow
    finally:
        _tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri = before
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Generator:
    """A loaded checkpoint ready to sample; shared by the pyfunc and tests. ``autoencoder``: the latent
    model's autoencoder file (None: the path its meta records, or pixel space)."""

    def __init__(self, checkpoint: str | Path, autoencoder: str | Path | None = None, device: str = "cpu"):
        from medaug.latent import latent_space_of
        from medaug.model import load_checkpoint
        from medaug.sampling import sampling_network

        self.ckpt = load_checkpoint(checkpoint, trust=False)  # data only, allow-listed networks
        meta = dict(self.ckpt.meta)
        if meta.get("latent") and autoencoder is not None:
            meta["latent"] = {**meta["latent"], "autoencoder_path": str(autoencoder)}
        self.space = latent_space_of(meta, device, trust=False)
        self.net = sampling_network(self.ckpt, device, use_ema=True)
        self.class_names = list(self.ckpt.meta["class_names"])
        self.scheduler_spec, self.image_shape = self.ckpt.config["scheduler"], self.ckpt.meta["image_shape"]

    def sample(
        self,
        class_name: str,
        count: int,
        seed: int,
        guidance: float = 2.0,
        sampler: str = "ddim",
        steps: int = 20,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """``count`` images ``(count, C, *spatial)`` in [-1, 1] of ``class_name``; image ``i`` from ``seed + i``
        exactly as ``medaug sample`` makes them (same seeds, same batch size)."""
        from medaug.sampling import generate_sharded, inference_scheduler, sample_images

        if class_name not in self.class_names:
            raise ValueError(f"class {class_name!r} unknown; the model knows {self.class_names}")
        if int(count) < 1:
            raise ValueError(f"count={count} for class {class_name!r}; give 1 or more")
        scheduler = inference_scheduler(self.scheduler_spec, sampler, int(steps))
        labels = torch.full((int(count),), self.class_names.index(class_name), dtype=torch.long)
        kwargs = dict(guidance_scale=float(guidance), null_class=len(self.class_names), batch_size=batch_size)

        def generate(chunk, chunk_seed: int):
            if self.space is None:
                return sample_images(
                    self.net, scheduler, chunk, self.image_shape, seed=chunk_seed, progress=False, **kwargs
                )
            return self.space.sample(self.net, scheduler, chunk, seed=chunk_seed, progress=False, **kwargs)

        return generate_sharded(generate, labels, batch_size, int(seed))


def _pyfunc_class():
    import mlflow.pyfunc

    class MedaugGeneratorModel(mlflow.pyfunc.PythonModel):
        """The pyfunc around :class:`Generator` (see the module docstring for the table in and out)."""

        def load_context(self, context):
            arts = context.artifacts
            self.generator = Generator(arts["checkpoint"], arts.get("autoencoder"))

        def predict(self, context, model_input, params=None):
            return predict_table(self.generator, model_input, (params or {}).get("output_dir") or None)

    return MedaugGeneratorModel


def predict_table(generator: Generator, table, output_dir: str | Path | None = None):
    """The pyfunc's ``predict``: a DataFrame of requests → a DataFrame with one row per image."""
    import pandas as pd

    missing = [c for c in ("class", "count") if c not in table.columns]
    if missing:
        raise ValueError(f"predict input lacks column(s) {missing}; give {list(COLUMNS)}")
    out = []
    for req in table.to_dict(orient="records"):
        seed = int(req.get("seed", 0))
        images = generator.sample(
            str(req["class"]),
            int(req["count"]),
            seed,
            guidance=float(req.get("guidance", 2.0)),
            sampler=str(req.get("sampler", "ddim")),
            steps=int(req.get("steps", 20)),
        )
        for i, img in enumerate(images.numpy().astype(np.float32)):
            out.append({"class": str(req["class"]), "seed": seed, "index": i, "image": img})
            if output_dir:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                np.save(Path(output_dir) / f"{req['class']}_{seed}_{i}.npy", img)
    return pd.DataFrame(out, columns=["class", "seed", "index", "image"])


def signature_and_example(class_names):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    import pandas as pd

    inputs = Schema(
        [
            ColSpec("string", "class"),
            ColSpec("long", "count"),
            ColSpec("long", "seed"),
            ColSpec("double", "guidance"),
            ColSpec("string", "sampler"),
            ColSpec("long", "steps"),
        ]
    )
    outputs = Schema([ColSpec("string", "class"), ColSpec("long", "seed"), ColSpec("long", "index")])
    params = ParamSchema([ParamSpec("output_dir", "string", "")])
    example = pd.DataFrame(
        [{"class": class_names[0], "count": 1, "seed": 0, "guidance": 2.0, "sampler": "ddim", "steps": 2}]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params), example


def register_generator(uri: str, run_id: str | None, name: str, checkpoint: str | Path) -> str:
    """Log ``checkpoint`` (and the autoencoder its meta names) as a pyfunc model in run ``run_id`` of the
    store ``uri`` and register it as ``name``; returns the new version (a string, e.g. ``"1"``)."""
    from medaug.model import load_checkpoint

    meta = load_checkpoint(checkpoint).meta
    with tempfile.TemporaryDirectory() as tmp, _tracking_uri(uri) as mlflow:
        artifacts = {"checkpoint": str(shutil.copy(checkpoint, Path(tmp) / CHECKPOINT))}
        if meta.get("latent"):
            artifacts["autoencoder"] = str(shutil.copy(meta["latent"]["autoencoder_path"], Path(tmp) / AUTOENCODER))
        signature, example = signature_and_example(meta["class_names"])
        with mlflow.start_run(run_id=run_id):  # the run stays open: the stage ends it
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT_PATH,
                python_model=_pyfunc_class()(),
                artifacts=artifacts,
                signature=signature,
                input_example=example,
                registered_model_name=name,
                pip_requirements=["medaug", "mlflow", "torch"],
                tags={"medaug.dataset": meta.get("dataset", "")},
            )
        version = str(info.registered_model_version)
    log.info("registered the generator as models:/%s/%s", name, version)
    return version


def checkpoint_file(model_uri: str, tracking_uri: str, cache_dir: str | Path) -> Path:
    """The checkpoint file of a registered generator (``models:/<name>/<version>`` or ``models:/<name>@<alias>``,
    also ``models:/<name>/@<alias>``), downloaded once into ``cache_dir``."""
    from mlflow.exceptions import MlflowException

    uri = model_uri.replace("/@", "@")
    target = Path(cache_dir) / uri[len(REGISTRY_PREFIX) :].replace("/", "_").replace("@", "_at_")
    with _tracking_uri(tracking_uri) as mlflow:
        try:
            if not (target / "artifacts" / CHECKPOINT).is_file():  # an alias may move: always ask for it
                target.mkdir(parents=True, exist_ok=True)
                mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target))
            elif "@" in uri:
                shutil.rmtree(target)
                target.mkdir(parents=True)
                mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target))
        except MlflowException as err:
            raise ValueError(
                f"ckpt_path={model_uri}: not found in the model registry at {tracking_uri} "
                f"({str(err).splitlines()[0][:200]})"
            ) from None
    found = target / "artifacts" / CHECKPOINT
    if not found.is_file():
        raise ValueError(
            f"ckpt_path={model_uri}: the registered model holds no {CHECKPOINT}; register a medaug "
            "generator (tracking.register=<name>)"
        )
    autoencoder = target / "artifacts" / AUTOENCODER
    return _with_autoencoder(found, autoencoder) if autoencoder.is_file() else found


def _with_autoencoder(checkpoint: Path, autoencoder: Path) -> Path:
    """A latent generator's checkpoint whose meta names the autoencoder downloaded beside it (the path it was
    trained with is on another machine); written once as ``local.pt`` next to it, read as data."""
    local = checkpoint.with_name("local.pt")
    if not local.is_file():
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
        meta = json.loads(payload["meta"]) if isinstance(payload["meta"], str) else dict(payload["meta"])
        meta["latent"] = {**meta["latent"], "autoencoder_path": str(autoencoder.resolve())}
        payload["meta"] = json.dumps(meta)
        torch.save(payload, local)
    return local


# --- lineage


def dataset_entity(info, origin: str):
    """The prepared dataset ``info`` (:class:`medaug.data.PreparedInfo`) as an MLflow dataset record: digest
    its fingerprint, source :func:`dataset_source` (never a path), profile its per-split counts."""
    from mlflow.entities import Dataset

    source = dataset_source(info, origin)
    return Dataset(
        name=f"prepared-{origin}-{source['modality'].lower()}-{source['spatial_dims']}d",
        digest=str(info.fingerprint)[:36],
        source_type="medaug",
        source=json.dumps(source, sort_keys=True),
        profile=json.dumps({"counts": info.counts}, sort_keys=True),
    )


def dataset_source(info, origin: str) -> dict:
    """What may be said of where a prepared dataset (:class:`medaug.data.PreparedInfo`) came from: ``origin``
    (the config's ``data.source``: demo, labels, dicomweb), the file format, modality, dimensions; no path."""
    summary = info.summary or {}
    return {
        "origin": str(origin),
        "format": "dicom" if summary.get("series") else "nifti",
        "modality": str(info.modality or "unknown"),
        "spatial_dims": int(info.spatial_dims),
        "classes": list(info.class_names),
    }


def synthetic_entity(samples_digest: str, info: Mapping, count: int):
    """An exported synthetic set as an MLflow dataset record linked to what made it: the prepared dataset's
    fingerprint (``info["dataset"]``, the samples' info) and the checkpoint id; ``count`` images."""
    from mlflow.entities import Dataset

    source = {
        "origin": "synthetic",
        "trained_on": str(info.get("dataset") or "unknown"),
        "checkpoint_id": str(info.get("checkpoint_id", "")),
        "images": int(count),
    }
    return Dataset(
        name=f"synthetic-{str(info.get('modality') or 'unknown').lower()}-{info.get('spatial_dims')}d",
        digest=str(samples_digest)[:36],
        source_type="medaug",
        source=json.dumps(source, sort_keys=True),
    )


# --- previews


def preview_callback(
    tracker,
    ema,
    scheduler_spec: Mapping,
    meta: Mapping,
    every: int,
    *,
    space=None,
    per_class: int = 2,
    steps: int = 10,
    seed: int = 0,
) -> Callable[[int], None] | None:
    """``callback(step)`` for :func:`medaug.training.fit`: every ``every`` steps a grid of ``per_class`` EMA samples
    per class (fixed seeds: the previews show the same noise being learnt) logged with ``log_image`` at ``step``
    under the key ``preview`` (``training.preview_every``; 0 or None: no previews, returns None)."""
    if not every:
        return None
    from medaug.conditioning import Conditioning

    cond = Conditioning.from_meta(meta)
    if cond != Conditioning():  # previews are of class -> image models only (a mask model's, a mask's inputs)
        log.info("no training previews for a model conditioned on %s that generates %s", cond.kind, cond.generates)
        return None
    from medaug.sampling import preview_samples
    from medaug.pictures import save_grid

    names = list(meta["class_names"])
    labels = torch.arange(len(names)).repeat_interleave(per_class)

    def callback(step: int) -> None:
        if step % every:
            return
        images = preview_samples(
            ema.model,
            scheduler_spec,
            labels,
            meta["image_shape"],
            null_class=len(names),
            space=space,
            steps=steps,
            seed=seed,
        )
        with tempfile.TemporaryDirectory() as tmp:
            grid = save_grid(images, labels, names, Path(tmp) / "preview.png", per_class=per_class)
            tracker.log_image(grid, key="preview", step=step)

    return callback
