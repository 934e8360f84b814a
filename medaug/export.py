"""Write a synthetic dataset folder: images, manifest and data card, atomically.

The folder is assembled under a temporary name and renamed into place only when every
file is written, with ``DONE`` last; an interrupted export leaves nothing that looks
complete. Samples go back to source units (HU for CT) through the dataset's intensity
window and carry the training data's affine, so a viewer shows the right spacing and
orientation.

Layout::

    images/synth_00000_<class>.nii.gz   one file per sample
    manifest.csv, manifest.json         path, class_name, label, seed, checkpoint_id
    DATA_CARD.md                        provenance and metrics, from data_cards/TEMPLATE.md
    DONE

Example::

    out = export_dataset(images, rows, "export", window=window, affine=affine, card_fields={...}, template=tpl)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from string import Template
from typing import Mapping, Sequence

import numpy as np
import torch

from .io import atomic_folder, write_nifti
from .preprocessing import IntensityWindow


class ExportError(ValueError):
    """The export cannot be written as asked; the message says why and what to do."""


def metrics_table(metrics: Mapping[str, float]) -> str:
    """A Markdown table of metrics, sorted by name."""
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| `{k}` | {v:.4g} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines)


def render_card(template: str | Path, fields: Mapping[str, object]) -> str:
    """Fill ``${name}`` placeholders of a data card template; every placeholder must be given."""
    try:
        return Template(Path(template).read_text()).substitute({k: str(v) for k, v in fields.items()})
    except KeyError as err:
        raise ExportError(f"{template}: placeholder ${{{err.args[0]}}} has no value") from err


def export_dataset(
    images: torch.Tensor,
    rows: Sequence[Mapping],
    out_dir: str | Path,
    *,
    window: IntensityWindow,
    affine: np.ndarray,
    card_fields: Mapping[str, object],
    template: str | Path,
    overwrite: bool = False,
) -> Path:
    """Export ``images`` (N, 1, *spatial) in [-1, 1] with one manifest row per image.

    ``rows`` give at least ``class_name``, ``label``, ``seed``, ``checkpoint_id`` per sample.
    Refuses to replace an existing export unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    if len(images) != len(rows):
        raise ExportError(f"{len(images)} images but {len(rows)} manifest rows")
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir}: already exists; pass export.overwrite=true or choose another paths.export_dir")
    with atomic_folder(out_dir) as tmp:
        (tmp / "images").mkdir()
        manifest = []
        for i, (image, row) in enumerate(zip(images, rows)):
            array = window.to_source(image[0].numpy())
            if array.ndim == 2:
                array = array[:, :, None]
            rel = f"images/synth_{i:05d}_{row['class_name']}.nii.gz"
            write_nifti(tmp / rel, array, affine, descrip=f"SYNTHETIC medaug {row['class_name']}")
            manifest.append({"path": rel, **row, "synthetic": True})
        fields = list(manifest[0].keys()) if manifest else ["path"]
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (tmp / "DATA_CARD.md").write_text(render_card(template, {**card_fields, "num_samples": len(manifest)}))
    return out_dir
