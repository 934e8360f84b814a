"""Background residual of every sampler with a reference denoiser whose posterior mean is exact.

    python benchmarks/clean_endings.py --label after      # appends to benchmarks/results/clean-endings.json

The data: 4 classes x 6 templates of 32x32 images, a disc of foreground (class intensity plus Gaussian
texture, std 0.15) on a background of exactly -1. E[x0 | x_t, class] is a closed-form mixture of
Gaussians; the null class (classifier-free guidance) mixes all templates. ``eps_error`` adds a fixed
per-sample error field of that std to the noise prediction (a network that is not exact, the same at
every timestep), ``null_error`` a larger one to the null-class branch (trained on 10 % of the labels).
Per sampler at its default settings, 20 steps (DDPM: 1000), guidance 1 and 2: mean |x + 1| and std of
the output over each sample's background pixels, and the share of samples whose mean exceeds 0.05.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from medaug.dpm_solver import DPMSolverPP2M
from medaug.sampling import inference_scheduler, labels_for_counts, sample_images

RESULTS = Path(__file__).resolve().parent / "results" / "clean-endings.json"
SCHED = {
    "_target_": "monai.networks.schedulers.DDPMScheduler",
    "num_train_timesteps": 1000,
    "schedule": "linear_beta",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "clip_sample": True,
}


def templates(classes=4, per_class=6, size=32, seed=0):
    """``(T, M, Y)``: template images (K, 1, size, size), foreground masks, class of each template."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    images, masks, labels = [], [], []
    for c in range(classes):
        for _ in range(per_class):
            cy, cx = (size / 2 + (torch.rand(2, generator=g, dtype=torch.float64) - 0.5) * size * 0.3).tolist()
            r = size * (0.2 + 0.15 * torch.rand((), generator=g, dtype=torch.float64).item())
            m = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).double()
            images.append(torch.where(m > 0, -0.2 + 0.25 * c, -1.0)[None])
            masks.append(m[None])
            labels.append(c)
    return torch.stack(images), torch.stack(masks), torch.tensor(labels)


class ReferenceDenoiser(torch.nn.Module):
    """Exact eps prediction for the template mixture (plus an optional fixed error field)."""

    def __init__(self, T, M, Y, texture=0.15, eps_error=0.0, null_error=None):
        super().__init__()
        self.T, self.M, self.Y, self.s = T, M, Y, texture
        self.null = int(Y.max()) + 1
        self.err, self.null_err = eps_error, eps_error if null_error is None else null_error
        abar = DPMSolverPP2M(1000).alphas_cumprod.double()
        self.alpha, self.sigma = abar.sqrt(), (1 - abar).sqrt()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, class_labels):
        t, x = timesteps.long(), x.double()
        a, sg = self.alpha[t].view(-1, 1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1, 1)
        var = a**2 * self.s**2 * self.M[None] + sg**2
        d = x[:, None] - a * self.T[None]
        logp = (-0.5 * d**2 / var - 0.5 * var.log()).flatten(2).sum(-1)
        allowed = (self.Y[None] == class_labels[:, None]) | (class_labels[:, None] == self.null)
        w = torch.softmax(logp.masked_fill(~allowed, -math.inf), dim=1)
        x0 = (w[..., None, None, None] * (self.T[None] + self.M[None] * (a * self.s**2 / var) * d)).sum(1)
        eps = (x - a[:, 0] * x0) / sg[:, 0]
        field = torch.stack(
            [
                torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(100 + i), dtype=x.dtype)
                for i in range(len(x))
            ]
        )
        err = torch.where(class_labels == self.null, self.null_err, self.err).view(-1, 1, 1, 1)
        return (eps + err * field).float()


def background(out, labels, T, M, Y) -> dict:
    """Residual over the background of the nearest template of each sample's class."""
    rows = []
    for x, c in zip(out.double(), labels):
        idx = (Y == c).nonzero().flatten()
        k = idx[((x[None] - T[idx]) * (1 - M[idx])).flatten(1).pow(2).sum(1).argmin()]
        v = x[M[k] == 0]
        rows.append(((v + 1).abs().mean().item(), v.std().item()))
    r = torch.tensor(rows)
    return {
        "bg_mean_abs": round(r[:, 0].mean().item(), 5),
        "bg_std": round(r[:, 1].mean().item(), 5),
        "grey_share": round((r[:, 0] > 0.05).double().mean().item(), 3),
        "out_min": round(out.min().item(), 4),
        "out_max": round(out.max().item(), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="key of this run in the results file (e.g. before, after)")
    args = ap.parse_args()
    T, M, Y = templates()
    labels = labels_for_counts({c: 8 for c in range(4)})
    rows = {}
    for name, err, null_err in [("exact", 0.0, 0.0), ("eps_error_0.1", 0.1, 0.1), ("null_error_0.3", 0.1, 0.3)]:
        for w in (1.0, 2.0):
            for sampler, steps in [("dpmpp_2m_sde", 20), ("dpmpp_2m", 20), ("ddim", 20), ("pndm", 20), ("ddpm", 1000)]:
                if sampler == "ddpm" and name != "exact":
                    continue
                out = sample_images(
                    ReferenceDenoiser(T, M, Y, eps_error=err, null_error=null_err),
                    inference_scheduler(SCHED, sampler, steps),
                    labels,
                    (32, 32),
                    guidance_scale=w,
                    null_class=4,
                    seed=0,
                    progress=False,
                    clip=False,
                )  # unclamped output
                key = f"{name}/w{w:g}/{sampler}-{steps}"
                rows[key] = background(out, labels, T, M, Y)
                print(f"{key:36s} {rows[key]}", flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[args.label] = rows
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
