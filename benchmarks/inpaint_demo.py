"""Lesion insertion on the demo: healthy held-out phantoms with a lesion inpainted, scored.

Run by hand after a finished train stage of `experiment=demo_2d` (either scheduler):

    python benchmarks/inpaint_demo.py --job outputs/demo_2d [--class-name single_lesion --sampler ddim --steps 50]

Every healthy val/test image gets a central disc (radius ``--radius`` of the half-width) regenerated as
``--class-name`` (RePaint, ``--jumps``, ``--resample``). Reported: the share of inpainted images that a classifier
trained on the real train split labels as that class (label fidelity; its accuracy on real held-out images beside
it), and the seam: the mean absolute image gradient in a two-voxel band across the region's boundary, inpainted
over the same band of the real inputs (1 = no visible seam). Writes benchmarks/results/inpaint-<job>.json and
inpaint-<job>.png (input | mask | output rows).

The defaults (w = 3, a region of radius 0.5) come from the sweep in benchmarks/results/inpaint-demo_2d-sweep.md:
the single lesion's radius is 0.24 (± 15 %), and a region hardly larger than it (0.28, 0.35) puts the lesion's
edge on the region's boundary, where it counts as seam; w = 2 often drew no lesion or several small ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medaug.data import load_info, load_split
from medaug.inpaint import inpaint, inpaint_picture
from medaug.metrics import train_classifier
from medaug.model import ema_network, load_checkpoint
from medaug.sampling import inference_scheduler

ROOT = Path(__file__).resolve().parents[1]


def seam_band(masks: torch.Tensor) -> torch.Tensor:
    """Voxels within one voxel of the region's boundary, inside or outside: ``(N, 1, *spatial)`` bool."""
    m = masks.float()
    grown = F.max_pool2d(m, 3, 1, 1) > 0
    shrunk = -F.max_pool2d(-m, 3, 1, 1) > 0
    return grown & ~shrunk


def gradient(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute forward difference along both axes at every voxel (last row/column repeated)."""
    gx = (x[..., 1:, :] - x[..., :-1, :]).abs()
    gy = (x[..., :, 1:] - x[..., :, :-1]).abs()
    return (F.pad(gx, (0, 0, 0, 1), mode="replicate") + F.pad(gy, (0, 1, 0, 0), mode="replicate")) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="outputs/demo_2d")
    ap.add_argument("--class-name", default="single_lesion")
    ap.add_argument("--sampler", default=None, help="default: rflow for a flow checkpoint, else ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--jumps", type=int, default=10)
    ap.add_argument("--resample", type=int, default=5)
    ap.add_argument("--radius", type=float, default=0.5)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="results file stem inpaint-<name> (default: the job folder's name)")
    args = ap.parse_args()
    job = Path(args.job)
    ckpt = load_checkpoint(job / "train" / "checkpoints" / "last.pt")
    info = load_info(job / "prepared")
    spec = ckpt.config["scheduler"]
    sampler = args.sampler or ("rflow" if spec["_target_"].endswith("RFlowScheduler") else "ddim")
    train_x, train_y = load_split(info.root, "train")
    held = [load_split(info.root, split) for split in ("val", "test")]
    test_x, test_y = torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])
    healthy = test_x[test_y == info.class_names.index("healthy")]
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in healthy.shape[2:]], indexing="ij")
    disc = torch.from_numpy(np.sqrt(sum(g**2 for g in grid)) <= args.radius)
    masks = disc.expand(len(healthy), 1, *disc.shape).clone()
    target = info.class_names.index(args.class_name)
    t0 = time.perf_counter()
    out = inpaint(
        ema_network(ckpt),
        inference_scheduler(spec, sampler, args.steps),
        healthy,
        masks,
        torch.full((len(healthy),), target),
        jumps=args.jumps,
        resample=args.resample,
        guidance_scale=args.guidance,
        null_class=info.num_classes,
        seed=args.seed,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    clf = train_classifier(train_x, train_y, info.num_classes, steps=400, seed=0, progress=False)
    with torch.no_grad():
        predicted = clf(out).argmax(1)
        as_target = float((predicted == target).float().mean())
        real_acc = float((clf(test_x).argmax(1) == test_y).float().mean())
    band = seam_band(masks)
    seam = float(gradient(out)[band].mean() / gradient(healthy)[band].mean())
    result = dict(
        checkpoint=ckpt.id,
        training_steps=ckpt.step,
        sampler=sampler,
        steps=args.steps,
        jumps=args.jumps,
        resample=args.resample,
        class_name=args.class_name,
        n=len(healthy),
        radius=args.radius,
        guidance=args.guidance,
        seed=args.seed,
        labelled_as_class=as_target,
        labelled={c: float((predicted == i).float().mean()) for i, c in enumerate(info.class_names)},
        classifier_real_acc=real_acc,
        seam_ratio=seam,
        outside_identical=bool(torch.equal(out[~masks], healthy[~masks])),
        s_per_image=seconds / len(healthy),
    )
    print(json.dumps(result, indent=1))
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    stem = f"inpaint-{args.name or job.name}"
    (res / f"{stem}.json").write_text(json.dumps(result, indent=1))
    inpaint_picture(healthy[:8], masks[:8], out[:8], res / f"{stem}.png")


if __name__ == "__main__":
    main()
