"""The seeded denoising loop with classifier-free guidance, and sample grids.

MONAI's ``DiffusionInferer`` cannot pass class labels and its ``sample()`` takes no
generator, so the loop is written out here, step by step:

1. draw the starting noise ``x_T`` per sample from ``seed + index`` (a sample does not
   depend on which batch it lands in);
2. for each timestep ``t``: predict ``eps`` for the label and (if guided) for the null
   class, combine ``eps_u + w (eps_c - eps_u)``;
3. clip the prediction's clean image ``x0 = (x_t - sigma_t eps) / alpha_t`` to the data range [-1, 1]
   (static thresholding; images only, ``clip_x0``), so that no sampler steps towards values that no
   image has: guidance ``x0_u + w (x0_c - x0_u)`` leaves [-1, 1] wherever the two predictions differ,
   and a multistep sampler (PNDM) extrapolates the unclipped values further;
4. let the scheduler take the step ``x_t → x_{t-1}``; its stochastic noise (DDPM, DPM-Solver++
   2M SDE, or DDIM with ``eta > 0``) comes from a generator seeded from ``(seed, first index of
   the batch)``, a stream apart from every starting noise.

Example::

    sch = inference_scheduler(ckpt.config["scheduler"], sampler="ddim", steps=50)
    x = sample_images(net, sch, labels, image_shape=(32, 32), guidance_scale=2.0, null_class=3, seed=0)
"""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler
from PIL import Image
from torch import nn

from .dpm_solver import DPMSolverPP2M, DPMSolverPP2MSDE
from .io import atomic_folder, is_complete
from .model import file_id
from .progress import progress_bar


class DDIM(DDIMScheduler):
    """MONAI's DDIM with its timesteps on the grid its ``step`` follows.

    MONAI's ``step`` goes from t to ``t - T // steps``, while its ``set_timesteps`` spaces the
    timesteps by ``(T - 1) / (steps - 1)``: at 10 of 1000 steps the network would be told t = 888 for
    a sample at 899. Here the timesteps are ``round(k T / steps) - 1`` for k = steps, ..., 1
    (trailing: the first step starts from pure noise, the last ends at the clean image), so every
    step lands on the next timestep, within one when ``steps`` does not divide T.
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        k = torch.arange(num_inference_steps, 0, -1, dtype=torch.float64, device=device)
        self.timesteps = (k * self.num_train_timesteps / num_inference_steps).round().long() - 1


SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIM, "pndm": PNDMScheduler,
            "dpmpp_2m": DPMSolverPP2M, "dpmpp_2m_sde": DPMSolverPP2MSDE}
SCHEDULE_ARGS = {"beta_start", "beta_end", "sig_range"}  # passed through to MONAI's noise schedule functions


def inference_scheduler(spec: Mapping, sampler: str = "ddim", steps: int = 50):
    """A scheduler for sampling with the noise schedule of the training ``spec``.

    ``sampler`` is ``ddpm`` (ancestral, every training timestep), ``ddim`` (deterministic with
    ``eta=0``), ``pndm`` (pseudo linear multistep, PLMS), or the few-step DPM-Solver++ 2M
    samplers ``dpmpp_2m`` (ODE) and ``dpmpp_2m_sde`` (stochastic; see
    :mod:`medaug.dpm_solver`), none needing retraining; ``steps`` ≤ the training timesteps
    (``pndm`` is for epsilon-predicting networks only).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} unknown; choose one of {sorted(SAMPLERS)}")
    cls = SAMPLERS[sampler]
    accepted = set(inspect.signature(cls.__init__).parameters) | SCHEDULE_ARGS
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_") and k in accepted}
    if sampler == "pndm":  # PLMS steps only; the last step lands on the clean image (alpha = 1), not on timestep 0's noise
        kwargs.update(skip_prk_steps=True, set_alpha_to_one=True)
    scheduler = cls(**kwargs)
    total = scheduler.num_train_timesteps
    if not 1 <= steps <= total:
        raise ValueError(f"steps={steps} must be between 1 and {total}")
    if sampler == "ddpm" and steps != total:  # MONAI's DDPM step always goes from t to t - 1
        raise ValueError(f"sampler=ddpm takes every one of the {total} training timesteps, not steps={steps}; set "
                         f"steps={total}, or for fewer steps use ddim with eta=1 (ancestral) or dpmpp_2m_sde")
    if sampler == "pndm" and scheduler.prediction_type == "v_prediction":
        raise ValueError("sampler=pndm extrapolates the network's outputs over timesteps, which is only right for "
                         "noise (epsilon) predictions, not for this v_prediction model; use dpmpp_2m_sde, dpmpp_2m "
                         "or ddim")
    scheduler.set_timesteps(steps)
    return scheduler


def labels_for_counts(counts: Mapping[int, int]) -> torch.Tensor:
    """``{class index: count}`` → the label of every sample, class by class."""
    return torch.tensor([c for c, k in sorted(counts.items()) for _ in range(int(k))], dtype=torch.long)


def guided_eps(model: nn.Module, x: torch.Tensor, t: int, labels: torch.Tensor, scale: float, null_class: int):
    """Classifier-free guided noise prediction; ``scale=1`` is the plain conditional model."""
    timesteps = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    if scale == 1.0:
        return model(x, timesteps=timesteps, class_labels=labels)
    null = torch.full_like(labels, null_class)
    eps_c, eps_u = model(
        torch.cat([x, x]), timesteps=torch.cat([timesteps, timesteps]), class_labels=torch.cat([labels, null])
    ).chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def clip_x0_of(scheduler, output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
    """The network ``output`` at timestep ``t`` (of the scheduler's ``prediction_type``) changed so that the
    clean image it predicts, ``x0 = (x - sigma eps) / alpha``, lies in [-1, 1] (static thresholding).

    ``x`` and ``output``: ``(N, C, *spatial)``; the returned prediction has the same type and shape."""
    abar = float(scheduler.alphas_cumprod[int(t)])
    alpha, sigma = abar**0.5, (1 - abar) ** 0.5
    kind = scheduler.prediction_type
    if kind == "sample":
        return output.clamp(-1, 1)
    x0 = (x - sigma * output) / alpha if kind == "epsilon" else alpha * x - sigma * output
    x0 = x0.clamp(-1, 1)
    eps = (x - alpha * x0) / sigma
    return eps if kind == "epsilon" else alpha * eps - sigma * x0


def step_noise_seed(seed: int, start: int) -> int:
    """Seed of the step noise of the batch that starts at sample ``start``: derived from both, so
    that it is not the seed of any sample's starting noise (``seed + i``)."""
    return int(np.random.SeedSequence([seed, start, 1]).generate_state(1, np.uint64)[0] >> 1)


@torch.no_grad()
def sample_images(
    model: nn.Module,
    scheduler,
    labels: torch.Tensor,
    image_shape: Sequence[int],
    *,
    guidance_scale: float,
    null_class: int,
    seed: int,
    batch_size: int = 64,
    channels: int = 1,
    eta: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    clip: bool = True,
    clip_x0: bool = True,
) -> torch.Tensor:
    """Generate ``len(labels)`` images ``(N, C, *image_shape)`` in [-1, 1], on the CPU
    (``clip=False`` for latents, which are not bounded). ``clip_x0``: clip the predicted clean image
    to [-1, 1] at every step (images only; see the module docstring).

    The same ``seed``, labels and batch size give identical samples.
    """
    device = next(model.parameters()).device
    steps = scheduler.num_inference_steps
    out = []
    n = len(labels)
    bar = progress_bar(total=n * len(scheduler.timesteps), desc="sample", unit="step", disable=not progress)
    for start in range(0, n, batch_size):
        y = labels[start : start + batch_size].to(device)
        x = torch.stack(
            [torch.randn(channels, *image_shape, generator=torch.Generator().manual_seed(seed + start + j))
             for j in range(len(y))]
        ).to(device)
        # multistep samplers (PNDM) keep history: reset it; timesteps stay on the CPU so that
        # reading them never waits for the GPU
        scheduler.set_timesteps(steps)
        step_kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
        if not isinstance(scheduler, PNDMScheduler):  # PNDM is deterministic and takes no generator
            step_kwargs["generator"] = torch.Generator(device=device).manual_seed(step_noise_seed(seed, start))
        for t in scheduler.timesteps:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                eps = guided_eps(model, x, t, y, guidance_scale, null_class).float()
            if clip and clip_x0:
                eps = clip_x0_of(scheduler, eps, int(t), x)
            x, _ = scheduler.step(eps, int(t), x, **step_kwargs)
            bar.update(len(y))
        out.append((x.clamp(-1, 1) if clip else x).float().cpu())
    bar.close()
    return torch.cat(out) if out else torch.empty(0, channels, *image_shape)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


def views(image: torch.Tensor) -> list[np.ndarray]:
    """What a person looks at for one image (C, *spatial): the 2D image, or the three
    mid-slices (axial, coronal, sagittal) of a 3D volume, as uint8, display-oriented."""
    x = image[0]
    if x.ndim == 2:
        return [np.flipud(_to_uint8(x).T)]
    cx, cy, cz = (s // 2 for s in x.shape)
    return [np.flipud(_to_uint8(v).T) for v in (x[:, :, cz], x[:, cy, :], x[cx, :, :])]


def save_grid(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], path: str | Path,
              per_class: int = 8, min_tile: int = 96) -> Path:
    """A PNG with one row per class (up to ``per_class`` samples each; 3D: three planes side by side),
    small images enlarged (nearest neighbour) to at least ``min_tile`` pixels."""
    rows = []
    for c in range(len(class_names)):
        tiles = [np.concatenate(views(img), axis=1) for img in images[labels == c][:per_class]]
        if not tiles:
            continue
        pad = np.zeros_like(tiles[0])
        tiles += [pad] * (per_class - len(tiles))
        rows.append(np.concatenate([np.pad(t, 1) for t in tiles], axis=1))
    if not rows:
        raise ValueError("no images to draw")
    grid = np.concatenate(rows, axis=0)
    scale = max(1, -(-min_tile // min(images.shape[2:])))
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def save_samples(out_dir: str | Path, images: torch.Tensor, rows: Sequence[Mapping], info: Mapping,
                 class_names: Sequence[str]) -> Path:
    """Write a samples folder atomically: ``samples.pt`` (images in [-1, 1], labels),
    ``manifest.csv`` (one row per sample), ``info.json`` (provenance) and ``grid.png``."""
    labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
    with atomic_folder(out_dir) as tmp:
        torch.save({"images": images.float(), "labels": labels}, tmp / "samples.pt")
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "info.json").write_text(json.dumps(dict(info), indent=2))
        save_grid(images, labels, class_names, tmp / "grid.png")
    return Path(out_dir)


def samples_id(samples_dir: str | Path) -> str:
    """The id of a complete samples folder (its images, manifest and provenance): what an evaluation
    records, so that an export can tell whether that evaluation is of these samples."""
    samples_dir = Path(samples_dir)
    return file_id(*(samples_dir / name for name in ("samples.pt", "manifest.csv", "info.json")))


def load_samples(samples_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[dict], dict]:
    """``(images, labels, manifest rows, info)`` of a complete samples folder."""
    samples_dir = Path(samples_dir)
    if not is_complete(samples_dir):
        raise FileNotFoundError(f"{samples_dir}: no complete samples folder (no DONE marker); run `medaug sample` first")
    data = torch.load(samples_dir / "samples.pt", map_location="cpu")
    with open(samples_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return data["images"], data["labels"], rows, json.loads((samples_dir / "info.json").read_text())
