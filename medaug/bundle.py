"""A trained generator as a MONAI bundle: a folder anyone with MONAI and medaug can sample from, check and share.

``medaug export_bundle`` (:func:`write_bundle`) writes::

    <bundle>/
      configs/metadata.json   versions, network_data_format (the denoiser's inputs and outputs with shapes), class
                              names, intensity window, intended use, evaluation and privacy verdict summary
      configs/inference.json  a MONAI bundle config that samples images by class with medaug's sampler
      models/model.pt         the network's state dict (EMA weights by default): a plain ``{name: tensor}`` file
      models/model.ts         the denoiser as TorchScript (``monai.bundle.ckpt_export``; see :class:`PackedInputUNet`)
      docs/README.md          model card: evaluation, privacy verdict, how to run, limits
      docs/license.txt, LICENSE   the licence text (``export_bundle.license``)

Sampling from it::

    cd <bundle> && python -m monai.bundle run --config_file configs/inference.json
    # eval/<class>_<seed>_<i>.npy: (C, *spatial) float32 in [-1, 1]; HU = lo + (x + 1) / 2 * (hi - lo)
    # (lo, hi: metadata.json intensity_window); more images: --requests '[{"class": "healthy", "count": 8, "seed": 3}]'

MONAI's ``DiffusionModelUNet`` cannot be scripted (``torch.jit.script`` stops at its attention block's
``x.reshape(*shape[:2], -1)``: "cannot statically infer the expected size of a list") and ``ckpt_export`` traces
with one random input while the UNet takes three (image, timesteps, class labels), so the TorchScript file is of
:class:`PackedInputUNet`: the same network and weights with the three inputs packed as channels of one tensor
(:func:`pack_inputs`).

A bundle's configs are code to MONAI (``_target_`` and ``$`` expressions run when parsed): run bundles you trust.
``models/model.pt`` itself is data (tensors only) and :class:`BundleGenerator` reads it with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet

import medaug
from medaug.atomic import atomic_folder, is_complete
from medaug.conditioning import SPEC_KEYS, Conditioning
from medaug.dp import describe
from medaug.export import ExportError, metrics_table
from medaug.model import Checkpoint, check_target
from medaug.registry import Generator, predict_table

log = logging.getLogger("medaug")

# The schema a MONAI bundle names; verify_metadata downloads it unless the file is already where it is told to look.
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
TENSOR_KEYS = (
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)
_TENSOR = {
    "type": "object",
    "required": list(TENSOR_KEYS),
    "properties": {
        "type": {"type": "string"},
        "format": {"type": "string"},
        "modality": {"type": "string"},
        "num_channels": {"type": "integer", "minimum": 1},
        "spatial_shape": {"type": "array", "items": {"type": ["integer", "string"]}},
        "dtype": {"type": "string"},
        "value_range": {"type": "array", "items": {"type": "number"}, "maxItems": 2},
        "is_patch_data": {"type": "boolean"},
        "channel_def": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
# MONAI's schema file cannot be had offline (it is a release download, in no package). This one encodes the keys the
# MONAI Bundle Specification (docs/source/mb_specification.rst) calls mandatory, the tensor keys it says every input
# and output "must contain at least", `schema` (verify_metadata refuses metadata without it) and `name` (the model
# zoo's CI requires it); the spec's `optional_packages_version` under its MONAI 1.6 name `required_packages_version`
# (MONAI's parser renames the old key, replacing a new one that is there too). verify_metadata validates against it
# when it lies at `filepath` (no download then).
METADATA_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "MONAI bundle metadata (the mandatory keys of the MONAI Bundle Specification), written by medaug",
    "type": "object",
    "required": [
        "schema",
        "name",
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ],
    "properties": {
        "schema": {"type": "string"},
        "name": {"type": "string", "minLength": 1},
        "version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+"},
        "monai_version": {"type": "string"},
        "pytorch_version": {"type": "string"},
        "numpy_version": {"type": "string"},
        "required_packages_version": {"type": "object", "additionalProperties": {"type": "string"}},
        "changelog": {"type": "object", "additionalProperties": {"type": "string"}},
        "task": {"type": "string"},
        "description": {"type": "string"},
        "authors": {"type": ["string", "array"]},
        "copyright": {"type": "string"},
        "intended_use": {"type": "string"},
        "network_data_format": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                "inputs": {"type": "object", "minProperties": 1, "additionalProperties": _TENSOR},
                "outputs": {"type": "object", "minProperties": 1, "additionalProperties": _TENSOR},
            },
        },
    },
}


class PackedInputUNet(DiffusionModelUNet):
    """``DiffusionModelUNet`` with its three inputs packed in one tensor, so that ``monai.bundle.ckpt_export``
    (which traces the network with one input) can export it: ``packed`` is ``(N, C + 2, *spatial)``: the noisy
    image ``x_t`` in channels ``[:C]``, the timestep in channel ``C`` and the class label in channel ``C + 1``
    (each constant over the image; :func:`pack_inputs`). Same arguments and state dict as the UNet."""

    def forward(self, packed: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        c = packed.shape[1] - 2
        timesteps = packed[:, c].flatten(1)[:, 0].round().long()
        labels = packed[:, c + 1].flatten(1)[:, 0].round().long()
        return super().forward(packed[:, :c], timesteps, class_labels=labels)


def pack_inputs(x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
    """The input of :class:`PackedInputUNet` (and ``models/model.ts``): ``x`` ``(N, C, *spatial)``, ``timesteps`` and
    ``class_labels`` ``(N,)`` → ``(N, C + 2, *spatial)``."""
    shape = (x.shape[0], 1, *x.shape[2:])
    planes = [v.to(x.dtype).view(-1, *[1] * (x.ndim - 1)).expand(shape) for v in (timesteps, class_labels)]
    return torch.cat([x, *planes], dim=1)


class BundleGenerator(Generator):
    """:class:`medaug.registry.Generator` built from a bundle's parts: ``network`` (the config's ``network_def``),
    its state dict file ``weights`` (read with ``weights_only=True``), the training ``scheduler`` spec (its class
    under ``target``), ``class_names`` and ``image_shape``. Pixel-space models only."""

    def __init__(
        self,
        network: torch.nn.Module,
        weights: str | Path,
        scheduler: Mapping,
        class_names: Sequence[str],
        image_shape: Sequence[int],
        device: str = "cpu",
    ):
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net = network.to(device).eval()
        self.space = None
        self.class_names = list(class_names)
        spec = dict(scheduler)
        self.scheduler_spec = {"_target_": spec.pop("target"), **spec}
        self.image_shape = list(image_shape)


def sample_classes(generator: Generator, requests: Sequence[Mapping], output_dir: str | Path | None = None):
    """The images ``requests`` ask for (rows with ``class``, ``count``, ``seed`` and optionally ``guidance``,
    ``sampler``, ``steps``; image ``i`` of a row from ``seed + i``, as ``medaug sample``), one row per image in a
    DataFrame (see :func:`medaug.registry.predict_table`), also saved as ``<class>_<seed>_<i>.npy`` in
    ``output_dir``."""
    import pandas as pd

    return predict_table(generator, pd.DataFrame(list(requests)), output_dir)


def evaluation_summary(eval_dir: str | Path, checkpoint_id: str, samples_dir: str | Path) -> dict:
    """What a bundle says of its evaluation: the headline metrics of ``eval_dir/metrics.json`` and the privacy
    verdict of ``privacy.json``. Refuses an evaluation that is incomplete or of samples of another checkpoint
    (``samples_dir`` must hold the evaluated samples, made from checkpoint ``checkpoint_id``)."""
    from medaug.release import read_evaluation

    eval_dir, samples_dir = Path(eval_dir), Path(samples_dir)
    if not is_complete(eval_dir):
        raise ExportError(f"export_bundle.eval_dir={eval_dir}: no complete evaluation there; run `medaug evaluate`")
    ev = read_evaluation(eval_dir, samples_dir)
    made_by = json.loads((samples_dir / "info.json").read_text()).get("checkpoint_id")
    if made_by != checkpoint_id:
        raise ExportError(
            f"export_bundle.eval_dir={eval_dir} evaluated samples of checkpoint {made_by}, not of the exported "
            f"{checkpoint_id}; sample and evaluate this checkpoint, or leave export_bundle.eval_dir=null"
        )
    headline = {
        k: v
        for k, v in ev.metrics.items()
        if isinstance(v, (int, float))
        and k.count("/") == 1
        and not k.endswith(("_std", "_code"))
        and "threshold" not in k
    }
    privacy = json.loads((eval_dir / "privacy.json").read_text())
    return {"metrics": headline, "verdict": str(privacy.get("verdict") or "not audited"), "summary": ev.verdict}


def _tensor(kind: str, fmt: str, channels: int, shape, dtype: str, value_range, channel_def, modality="n/a") -> dict:
    return dict(
        type=kind,
        format=fmt,
        modality=modality,
        num_channels=channels,
        spatial_shape=list(shape),
        dtype=dtype,
        value_range=list(value_range),
        is_patch_data=False,
        channel_def={str(k): v for k, v in channel_def.items()},
    )


def bundle_metadata(ckpt: Checkpoint, settings: Mapping, evaluation: Mapping | None, deid: str) -> dict:
    """``configs/metadata.json`` of :func:`write_bundle` (nothing from the run's config: no path can get in)."""
    import pandas

    meta, model = ckpt.meta, ckpt.config["model"]
    names, shape, window = list(meta["class_names"]), list(meta["image_shape"]), meta["window"]
    channels, modality = int(model.get("in_channels", 1)), str(meta.get("modality") or "n/a")
    total = int(ckpt.config["scheduler"].get("num_train_timesteps", 1000))
    prediction = ckpt.config["scheduler"].get("prediction_type", "velocity (rectified flow)")
    spacing = np.linalg.norm(np.asarray(meta["affine"])[:3, :3], axis=0)[: meta["spatial_dims"]]
    task = f"Class-conditional synthesis of {meta['spatial_dims']}D {modality} images ({', '.join(names)})"
    evaluation = evaluation or {}
    return {
        "schema": SCHEMA_URL,
        "name": settings["name"],
        "version": str(settings["version"]),
        "changelog": {str(settings["version"]): f"exported by medaug {medaug.__version__} from checkpoint {ckpt.id}"},
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"medaug": medaug.__version__, "pandas": pandas.__version__},
        "task": task,
        "description": (
            f"A class-conditional diffusion UNet (MONAI DiffusionModelUNet) trained with medaug for {ckpt.step} "
            f"steps on a prepared dataset (its de-identification: see privacy). configs/inference.json samples "
            f"images of each class with classifier-free guidance; the network predicts the {prediction} of a noisy "
            "image."
        ),
        "authors": str(settings["authors"]),
        "copyright": str(settings["copyright"]),
        "intended_use": str(settings["intended_use"]),
        "data_source": f"medaug prepared dataset, fingerprint {meta.get('dataset') or 'unknown'}",
        "class_names": names,
        "image_shape": shape,
        "spacing_mm": [round(float(s), 4) for s in spacing],
        "intensity_window": {"lo": window["lo"], "hi": window["hi"], "unit": window["unit"]},
        "checkpoint": {"id": ckpt.id, "step": int(ckpt.step), "weights": settings["weights"]},
        "eval_metrics": evaluation.get("metrics", {}),
        "privacy": {
            "verdict": evaluation.get("verdict", "not audited"),
            "summary": evaluation.get("summary", "not audited: no evaluation was given (export_bundle.eval_dir)"),
            "differential_privacy": describe(meta.get("dp")),
            "deidentification": deid,
        },
        "network_data_format": {
            "inputs": {
                "image": _tensor(
                    "image",
                    "magnitude",
                    channels,
                    shape,
                    "float32",
                    [],
                    {i: "noisy image x_t (model space [-1, 1] plus noise)" for i in range(channels)},
                    modality,
                ),
                "timesteps": _tensor("series", "indices", 1, [], "int64", [0, total - 1], {0: "diffusion timestep"}),
                "class_labels": _tensor(
                    "series",
                    "indices",
                    1,
                    [],
                    "int64",
                    [0, len(names)],
                    {**dict(enumerate(names)), len(names): "null class (unconditional, for guidance)"},
                ),
            },
            "outputs": {
                "pred": _tensor(
                    "image", "magnitude", channels, shape, "float32", [], {i: str(prediction) for i in range(channels)}
                )
            },
        },
    }


def inference_config(ckpt: Checkpoint, settings: Mapping) -> dict:
    """``configs/inference.json``: medaug's sampler (:class:`BundleGenerator`, :func:`sample_classes`) on the
    network ``network_def`` with ``models/model.pt``; ``requests`` asks for ``num_per_class`` images per class."""
    spec = {k: v for k, v in ckpt.config["model"].items() if not k.startswith("_") and k not in SPEC_KEYS}
    scheduler = {k: v for k, v in ckpt.config["scheduler"].items() if not k.startswith("_")}
    names = list(ckpt.meta["class_names"])
    sampling = {k: settings[k] for k in ("guidance", "sampler", "steps")}
    return {
        "bundle_root": ".",
        "device": "cpu",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "output_dir": "$@bundle_root + '/eval'",
        "class_names": names,
        "image_shape": list(ckpt.meta["image_shape"]),
        "scheduler": {"target": ckpt.config["scheduler"]["_target_"], **scheduler},
        "network_def": {"_target_": ckpt.config["model"]["_target_"], **spec},
        "torchscript_def": {"_target_": f"{__name__}.PackedInputUNet", **spec},
        "generator": {
            "_target_": f"{__name__}.BundleGenerator",
            "network": "@network_def",
            "weights": "@ckpt_path",
            "scheduler": "@scheduler",
            "class_names": "@class_names",
            "image_shape": "@image_shape",
            "device": "@device",
        },
        "requests": [
            {"class": n, "count": int(settings["num_per_class"]), "seed": int(settings["seed"]), **sampling}
            for n in names
        ],
        "sample": {
            "_target_": f"{__name__}.sample_classes",
            "generator": "@generator",
            "requests": "@requests",
            "output_dir": "@output_dir",
        },
        "run": ["@sample"],
    }


def bundle_readme(metadata: Mapping, settings: Mapping) -> str:
    """``docs/README.md``: the model card (what it makes, how well, how private, how to run it)."""
    m, p = metadata, metadata["privacy"]
    shape = " × ".join(map(str, m["image_shape"]))
    nd = m["network_data_format"]["inputs"]["image"]["num_channels"] + 2
    metrics = metrics_table(m["eval_metrics"]) if m["eval_metrics"] else "_not evaluated_ (export_bundle.eval_dir)"
    w = m["intensity_window"]
    return f"""# {m["name"]} {m["version"]}

{m["task"]}. **Every image it makes is synthetic; not for diagnosis.**

{m["description"]}

| | |
| --- | --- |
| classes | {", ".join(f"`{n}`" for n in m["class_names"])} |
| image | {shape} voxels, spacing {" × ".join(f"{s:g}" for s in m["spacing_mm"])} mm, values in [-1, 1] |
| intensities | lo + (x + 1) / 2 × (hi − lo) with lo = {w["lo"]:g}, hi = {w["hi"]:g} {w["unit"]} (the training window) |
| checkpoint | `{m["checkpoint"]["id"]}` after {m["checkpoint"]["step"]} steps, {m["checkpoint"]["weights"]} weights |
| training data | {m["data_source"]} |
| versions | MONAI {m["monai_version"]}, PyTorch {m["pytorch_version"]}, medaug {medaug.__version__} |

## Evaluation (synthetic vs held-out real data)

{metrics}

## Privacy

| | |
| --- | --- |
| memorisation audit | {p["summary"]} |
| differential privacy | {p["differential_privacy"]} |
| de-identification of the training data | {p["deidentification"]} |

## Intended use

{m["intended_use"]}

## Run it

Needs `pip install medaug` (which brings MONAI and PyTorch). From this folder:

```bash
python -m monai.bundle run --config_file configs/inference.json        # {settings["num_per_class"]} images per class
python -m monai.bundle run --config_file configs/inference.json \\
    --requests '[{{"class": "{m["class_names"][0]}", "count": 8, "seed": 3}}]'   # image i from seed + i
```

Images land in `eval/<class>_<seed>_<i>.npy` (`(C, *spatial)` float32 in [-1, 1]); the same seed gives the same
images as `medaug sample` from the checkpoint. In Python:

```python
from monai.bundle import ConfigParser
parser = ConfigParser(); parser.read_config("configs/inference.json"); parser["bundle_root"] = "."
images = parser.get_parsed_content("sample")          # a table: class, seed, index, image
```

`models/model.ts` is the denoiser as TorchScript (no Python classes needed). MONAI's DiffusionModelUNet cannot be
scripted and `ckpt_export` traces one input, so it takes the noisy image, the timestep and the class label packed as
channels: `(N, C + 2, *spatial)` → `(N, C, *spatial)` (`medaug.bundle.pack_inputs`); its input has {nd} channels here.
Rebuild it with

```bash
python -m monai.bundle ckpt_export torchscript_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json --bundle_root . \\
    --use_trace True --input_shape "[1, {nd}, {", ".join(map(str, m["image_shape"]))}]"
```

The configs are code to MONAI (`_target_` and `$` run when parsed): run bundles from people you trust. `models/model.pt`
holds tensors only.

## Limits

- Realism is measured with a small classifier trained on the same real data; it is not a clinical validation.
- The model reproduces the acquisition and population of its training data and its biases.
- Share these weights only under the data-use terms of the training data (`docs/license.txt`).
"""


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def write_bundle(
    ckpt: Checkpoint,
    out_dir: str | Path,
    settings: Mapping,
    evaluation: Mapping | None = None,
    deid: str = "not recorded",
) -> Path:
    """Write the MONAI bundle of the generator ``ckpt`` to ``out_dir`` (atomically; see the module docstring),
    export ``models/model.ts`` when ``settings["torchscript"]`` and check the metadata against
    :data:`METADATA_SCHEMA` (:func:`verify_bundle`).

    Args:
        ckpt: a loaded pixel-space diffusion checkpoint (:func:`medaug.model.load_checkpoint`).
        settings: the ``export_bundle`` section: ``name``, ``version``, ``weights`` (``ema`` | ``model``),
            ``authors``, ``copyright``, ``intended_use``, ``license``, ``torchscript``, and the inference config's
            ``num_per_class``, ``seed``, ``guidance``, ``sampler``, ``steps``.
        evaluation: :func:`evaluation_summary` of the checkpoint's evaluation, or None ("not audited").
        deid: one line on how the training data was de-identified.
    """
    if ckpt.meta.get("latent"):
        raise ExportError(
            f"{ckpt.path}: a latent diffusion checkpoint; export_bundle writes pixel-space generators only "
            "(share a latent model through the registry: tracking.register=<name>)"
        )
    if Conditioning.from_meta(ckpt.meta) != Conditioning():
        raise ExportError(
            f"{ckpt.path}: a model conditioned on masks or generating masks; export_bundle writes class -> image "
            "generators only"
        )
    if settings["weights"] not in ("ema", "model"):
        raise ExportError(f"export_bundle.weights={settings['weights']!r}; choose ema or model")
    if not ckpt.trusted:
        check_target(ckpt.config["model"].get("_target_"), ckpt.path)
    metadata = bundle_metadata(ckpt, settings, evaluation, deid)
    licence = settings.get("license") or (
        "No licence was chosen for these weights (export_bundle.license). They were trained on patient data: "
        "share them only under the data-use agreement of the training data."
    )
    with atomic_folder(out_dir) as tmp:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        (tmp / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        (tmp / "configs" / "inference.json").write_text(json.dumps(inference_config(ckpt, settings), indent=2) + "\n")
        state = ckpt.ema["model"] if settings["weights"] == "ema" else ckpt.model
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp / "models" / "model.pt")
        (tmp / "docs" / "README.md").write_text(bundle_readme(metadata, settings))
        (tmp / "docs" / "license.txt").write_text(licence.strip() + "\n")
        (tmp / "LICENSE").write_text(licence.strip() + "\n")
        verify_bundle(tmp)
        if settings.get("torchscript", True):
            export_torchscript(tmp)
    log.info("wrote the MONAI bundle %s of checkpoint %s to %s", metadata["name"], ckpt.id, out_dir)
    return Path(out_dir)


def verify_bundle(bundle: str | Path) -> None:
    """``monai.bundle.verify_metadata`` of ``bundle/configs/metadata.json`` against :data:`METADATA_SCHEMA`,
    offline (the schema file is put where verify_metadata looks, so it downloads nothing)."""
    from monai.bundle import verify_metadata

    with tempfile.TemporaryDirectory() as tmp:
        schema = Path(tmp) / "schema.json"
        schema.write_text(json.dumps(METADATA_SCHEMA))
        md5 = hashlib.md5(schema.read_bytes()).hexdigest()
        try:
            verify_metadata(
                meta_file=str(Path(bundle) / "configs" / "metadata.json"), filepath=str(schema), hash_val=md5
            )
        except ValueError as err:
            raise ExportError(f"{bundle}: the bundle metadata does not pass verify_metadata ({err})") from None


def export_torchscript(bundle: str | Path) -> Path:
    """``bundle/models/model.ts`` with ``monai.bundle.ckpt_export``: :class:`PackedInputUNet` (the
    ``torchscript_def`` of the inference config) traced with ``models/model.pt``. The TorchScript debug records
    (source file paths of this machine) are left out."""
    from monai.bundle import ckpt_export

    bundle = Path(bundle)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    channels = meta["network_data_format"]["inputs"]["image"]["num_channels"]
    target = bundle / "models" / "model.ts"
    ckpt_export(
        net_id="torchscript_def",
        filepath=str(target),
        ckpt_file=str(bundle / "models" / "model.pt"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        use_trace=True,
        input_shape=[1, channels + 2, *meta["image_shape"]],
    )
    _strip_debug_records(target)
    return target


def _strip_debug_records(path: Path) -> None:
    """Rewrite the TorchScript zip ``path`` without its ``*.debug_pkl`` records (they hold source file paths)."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            if not item.filename.endswith(".debug_pkl"):
                dst.writestr(item, src.read(item.filename))
    tmp.replace(path)
