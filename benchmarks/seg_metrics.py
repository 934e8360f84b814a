"""Do the segmentation metrics of ``medaug evaluate`` tell good image/mask pairs from bad ones? Planted sets.

    PYTHONPATH=. python benchmarks/seg_metrics.py     # writes benchmarks/results/seg-metrics-demo_2d.json

The real data: the 2D demo phantoms (32 x 32, 40 per class), prepared, each item given the mask of its lesions
(model-space value > 0.35: the lesions, about 150 HU, in the [-160, 240] HU window). The held-out real set is the
``test`` split (``evaluate.real_split=test``); three planted "synthetic" sets, every mask marked ``generated``:

* ``matched``: the ``val`` images, each with its own mask (a perfect mask-conditioned generator);
* ``mismatched``: the ``val`` images, each with another image's mask (a generator that ignores the mask);
* ``copied``: the training images with their masks (a generator that memorised; images and masks are copies).

For each: mask fidelity (``segmentation/fidelity_dice`` vs its real floor), segmentation utility (Dice of
segmenters trained on real, synthetic, both; tested on held-out real) and the masks' copy rate.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medaug.data import load_info, load_split, prepare_dataset
from medaug.evaluation import EvalSettings, evaluate
from medaug.phantoms import make_demo_dataset
from medaug.preprocessing import IntensityWindow
from medaug.sampling import save_samples

LESION = 0.35
KEYS = (
    "segmentation/fidelity_dice",
    "segmentation/fidelity_dice_real",
    "segmentation/dice/real",
    "segmentation/dice/synthetic",
    "segmentation/dice/mixed",
    "segmentation/dice_gain",
    "segmentation/hd95/real",
    "segmentation/hd95/synthetic",
    "segmentation/hd95/mixed",
    "privacy/mask_copy_rate",
    "privacy/copy_rate",
)


def add_masks(prepared: Path) -> None:
    """The contract's prepared dataset: a ``mask`` column (one uint8 NIfTI per item) and ``labels``."""
    rows = list(csv.DictReader(open(prepared / "manifest.csv", newline="")))
    (prepared / "masks").mkdir()
    for r in rows:
        img = nib.load(prepared / r["path"])
        r["mask"] = f"masks/{r['item_id']}.nii.gz"
        nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > LESION).astype(np.uint8), img.affine), prepared / r["mask"])
    with open(prepared / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = json.loads((prepared / "dataset.json").read_text())
    (prepared / "dataset.json").write_text(json.dumps(meta | {"labels": {"background": 0, "lesion": 1}}))


def planted(prepared: Path, out: Path, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor) -> None:
    names = load_info(prepared).class_names
    rows = [dict(index=i, label=int(v), class_name=names[int(v)], mask_source="generated") for i, v in enumerate(y)]
    info = dict(
        class_names=names, checkpoint_id="planted", mlflow_run_id=None, mask_labels={"background": 0, "lesion": 1}
    )
    save_samples(out, x, rows, info, names)
    data = torch.load(out / "samples.pt")
    torch.save(data | {"masks": masks}, out / "samples.pt")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="medaug-seg-"))
    labels = make_demo_dataset(root / "raw", spatial_dims=2, n_per_class=40, size=32, seed=0)
    prepare_dataset(
        labels, root / "prepared", IntensityWindow(-160.0, 240.0), spatial_size=[32, 32, -1], spatial_dims=2
    )
    prepared = root / "prepared"
    add_masks(prepared)
    hx, hy = load_split(prepared, "val")
    hm = (hx > LESION).long()
    tx, ty = load_split(prepared, "train")
    shift = torch.roll(torch.arange(len(hm)), 1)
    sets = {
        "matched": (hx, hy, hm),
        "mismatched": (hx, hy, hm[shift]),
        "copied": (tx, ty, (tx > LESION).long()),
    }
    settings = EvalSettings.from_dict(
        {
            "real_split": "test",
            "classifier_steps": 50,
            "utility": {"seeds": []},
            "segmentation": {"steps": 100, "seeds": [0]},
        }
    )
    results = {}
    for name, (x, y, m) in sets.items():
        start = time.time()
        planted(prepared, root / f"s_{name}", x, y, m)
        r = evaluate(root / f"s_{name}", prepared, root / f"eval_{name}", settings, torch.device("cpu"), root / "cache")
        results[name] = {k: r.metrics.get(k) for k in KEYS} | {"verdict": r.verdict, "seconds": time.time() - start}
        print(name, json.dumps(results[name], indent=1))
    out = Path(__file__).parent / "results" / "seg-metrics-demo_2d.json"
    sizes = {"train": len(tx), "val": len(hx), "test": len(load_split(prepared, "test")[0])}
    sizes["lesion_share_train"] = float((tx > LESION).float().mean())
    how = "real_split=test, classifier_steps=50, segmentation.steps=100, seeds=[0] (2 shared CPU cores)"
    out.write_text(json.dumps({"settings": how, **sizes, "sets": results}, indent=2))
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
