"""Check a medaug export of image/label pairs with nnU-Net v2's own ``verify_dataset_integrity``.

nnU-Net is no dependency of medaug; install it beside, without its dependencies (the check needs none of them
beyond what medaug has; the few modules it imports but never calls are stubbed here)::

    python -m pip install --no-deps --target /tmp/nnu_pkgs nnunetv2==2.8.1 batchgenerators acvl-utils SimpleITK
    PYTHONPATH=. python benchmarks/nnunet_check.py --nnunet /tmp/nnu_pkgs    # "2D OK", "3D OK" or nnU-Net's error

It exports 4 tiny 2D and 4 tiny 3D samples with two-label masks (``medaug.export.export_dataset``, NIfTI) into
``--out`` and runs the verification (file pairing, dataset.json keys and labels, label values, image/label
geometry) on each.
"""

from __future__ import annotations

import argparse
import importlib.abc
import shutil
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path
from unittest.mock import MagicMock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
UNUSED = ("blosc2", "dynamic_network_architectures", "cc3d", "tifffile", "imagecodecs", "yaml", "seaborn", "skimage")


class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for what nnU-Net imports at module level but the verification never calls."""

    def find_spec(self, name, path, target=None):
        return ModuleSpec(name, self, is_package=True) if name.split(".")[0] in UNUSED else None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: MagicMock()
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_Stub())  # at import: nnU-Net's worker processes (spawned) import this file too


def export_pairs(out: Path, spatial_dims: int, n: int = 4, size: int = 16) -> Path:
    from medaug.export import export_dataset
    from medaug.preprocessing import IntensityWindow

    g = torch.Generator().manual_seed(spatial_dims)
    images = torch.rand(n, 1, *([size] * spatial_dims), generator=g) * 2 - 1
    masks = torch.zeros(n, 1, *([size] * spatial_dims), dtype=torch.long)
    for i in range(n):
        masks[(i, 0, *[slice(2 + i, 7 + i)] * spatial_dims)] = 1
        masks[(i, 0, *[slice(10, 13)] * spatial_dims)] = 2
    rows = [dict(index=i, label=0, class_name="a", mask_source="generated") for i in range(n)]
    card = {k: "x" for k in ("created", "medaug_version", "checkpoint_id", "training_steps", "model", "sampler")}
    card |= {k: "x" for k in ("guidance_scale", "seed", "image_shape", "spacing", "intensity", "class_counts")}
    card |= {k: "x" for k in ("metrics", "privacy", "deid", "differential_privacy", "dataset_fingerprint")}
    card |= dict(name=out.name, spatial_dims=spatial_dims, mlflow_run_id="x")
    affine = np.array([[0.8, 0, 0, -40.0], [0, 0.7, 0, 12.5], [0, 0, 2.5, 30.25], [0, 0, 0, 1]])
    return export_dataset(
        images,
        rows,
        out,
        window=IntensityWindow(-160, 240),
        affine=affine,
        card_fields=card,
        template=ROOT / "data_cards" / "TEMPLATE.md",
        masks=masks,
        mask_labels={"background": 0, "lesion": 1, "organ": 2},
        overwrite=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnunet", default="/tmp/nnu_pkgs", help="where nnunetv2 was pip-installed (--target)")
    parser.add_argument("--out", default="/tmp/medaug_nnunet_check", type=Path)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    sys.path.insert(0, args.nnunet)
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    for spatial_dims in (2, 3):
        folder = export_pairs(args.out / f"Dataset00{spatial_dims}_medaug", spatial_dims)
        verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem
        print(f"nnU-Net v2 verify_dataset_integrity: {spatial_dims}D OK ({folder})")


if __name__ == "__main__":
    main()
