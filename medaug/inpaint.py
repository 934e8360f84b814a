"""Lesion insertion by inpainting: a real image, a region and a class -> the image with the region regenerated.

RePaint (Lugmayr et al. 2022, arXiv:2201.09865, algorithm 1) with any class-conditional checkpoint, unchanged: at
every step the known part (outside the region) is the real image noised to the next timestep, the unknown part (the
region) is the model's step, and the two are joined by the mask. Every ``jumps`` steps the joined image is noised
back up by ``jumps`` steps and those steps are redone, ``resample`` times in all, so that the region learns to fit
its surroundings. Both noising and stepping are written in the form ``x_t = a_t x0 + b_t noise`` that a DDPM (``a =
sqrt(abar_t)``, ``b = sqrt(1 - abar_t)``) and a rectified flow (``a = 1 - s``, ``b = s``) share; noising from
``t'`` up to ``t`` is ``x_t = (a_t / a_t') x_t' + sqrt(b_t^2 - (a_t / a_t')^2 b_t'^2) z``.

The output is ``where(mask, generated, input)``: every voxel outside the region is the input's, bit for bit
(latent models: the region is regenerated on the latent grid, decoded, and only the image region is taken).
Such an output contains a real patient's image outside the region: its manifest says
``contains_real_patient=true`` and the export share profile refuses it.

Example::

    sch = inference_scheduler(ckpt.config["scheduler"], "ddim", 50)
    out = inpaint_images(net, sch, images, masks, labels, jumps=10, resample=5, guidance_scale=2.0, null_class=2,
                         seed=0)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from PIL import Image
from torch import nn

from .flow import is_flow
from .io import Volume, read_nifti, write_nifti
from .model import Checkpoint
from .preprocessing import IntensityWindow
from .progress import progress_bar
from .pictures import views
from .sampling import clip_x0_of, guided_eps, sample_records, save_samples, step_noise_seed

INPAINT_SAMPLERS = ("ddim", "ddpm", "rflow")  # single-step schedulers: multistep ones keep a history jumps break


def check_inpaint_sampler(sampler: str) -> None:
    """Refuse samplers that keep a history of steps (PNDM, DPM-Solver++ 2M): RePaint's jumps back invalidate it."""
    if sampler not in INPAINT_SAMPLERS:
        raise ValueError(
            f"inpaint.sampler={sampler} keeps a history of past steps, which RePaint's jumps back in time "
            f"invalidate; choose one of {list(INPAINT_SAMPLERS)} (ddim for DDPM-trained models, rflow "
            "for scheduler=rflow)"
        )


def _next_timesteps(scheduler) -> list[int]:
    """Where the scheduler's ``step`` goes from each of its timesteps (-1: the clean image)."""
    ts = [int(t) for t in scheduler.timesteps]
    if is_flow(scheduler):
        return [int(t) for t in scheduler.next_timesteps]
    if isinstance(scheduler, DDIMScheduler):
        return [t - scheduler.num_train_timesteps // scheduler.num_inference_steps for t in ts]
    return [t - 1 for t in ts]


def _coefficients(scheduler, t: int) -> tuple[float, float]:
    """``(a_t, b_t)`` with ``x_t = a_t x0 + b_t noise``; t < 0 (DDIM/DDPM) or t = 0 (flow): the clean image."""
    if is_flow(scheduler):
        s = t / scheduler.num_train_timesteps
        return 1.0 - s, s
    abar = float(scheduler.alphas_cumprod[t]) if t >= 0 else 1.0
    return math.sqrt(abar), math.sqrt(1.0 - abar)


def renoise(scheduler, x: torch.Tensor, t_from: int, t_to: int, generator: torch.Generator) -> torch.Tensor:
    """``x`` at timestep ``t_from`` noised forward to ``t_to`` (later, noisier), ``(N, C, *spatial)``."""
    (a0, b0), (a1, b1) = _coefficients(scheduler, t_from), _coefficients(scheduler, t_to)
    r = a1 / a0
    z = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    return r * x + math.sqrt(max(b1**2 - (r * b0) ** 2, 0.0)) * z


def repaint_schedule(n_steps: int, jumps: int, resample: int) -> list[tuple[str, int]]:
    """The order of work: ``("step", i)`` takes inference step ``i``; ``("back", i)`` noises from after step ``i``
    back to before step ``i - jumps + 1``. Each block of ``jumps`` steps is run ``resample`` times."""
    plan = []
    for start in range(0, n_steps, jumps):
        block = list(range(start, min(start + jumps, n_steps)))
        for r in range(resample):
            plan += [("step", i) for i in block]
            if r < resample - 1:
                plan.append(("back", block[-1]))
    return plan


@torch.no_grad()
def inpaint_images(
    model: nn.Module,
    scheduler,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    *,
    jumps: int,
    resample: int,
    guidance_scale: float,
    null_class: int,
    seed: int,
    batch_size: int = 16,
    clip: bool = True,
    clip_x0: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """The ``images`` with their ``masks`` region regenerated under ``labels``, on the CPU.

    Args:
        model: the class-conditional network (eval mode); ``scheduler`` its sampling scheduler
            (:func:`medaug.sampling.inference_scheduler` with a sampler of :data:`INPAINT_SAMPLERS`).
        images: ``(N, C, *spatial)`` in model space ([-1, 1], or scaled latents with ``clip=False``).
        masks: ``(N, 1, *spatial)`` bool, True where the image is regenerated.
        labels: ``(N,)`` the class to generate in each region.
        jumps, resample: RePaint's jump length and number of resamplings (``resample=1``: none).
        guidance_scale, null_class: classifier-free guidance as in :func:`medaug.sampling.sample_images`.
        seed: image ``i`` of the call starts from ``seed + i``; the same seed gives the same output.

    Returns:
        ``(N, C, *spatial)``: ``torch.where(masks, generated, images)``.
    """
    if images.shape[0] != masks.shape[0] or masks.shape[1] != 1 or masks.shape[2:] != images.shape[2:]:
        raise ValueError(f"masks {tuple(masks.shape)} must be (N, 1, *spatial) of images {tuple(images.shape)}")
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images; give one class per image")
    if jumps < 1 or resample < 1:
        raise ValueError(f"inpaint.jumps={jumps} and inpaint.resample={resample} must be >= 1")
    if not (is_flow(scheduler) or isinstance(scheduler, (DDIMScheduler, DDPMScheduler))):
        check_inpaint_sampler(type(scheduler).__name__)
    masks = masks.bool()
    device = next(model.parameters()).device
    steps = scheduler.num_inference_steps
    out = []
    for start in range(0, len(images), batch_size):
        x0, m, y = (v[start : start + batch_size].to(device) for v in (images.float(), masks, labels))
        x = torch.stack(
            [
                torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed + start + j))
                for j in range(len(x0))
            ]
        ).to(device)
        size = {"input_img_size_numel": math.prod(x0.shape[2:])} if is_flow(scheduler) else {}
        scheduler.set_timesteps(steps, **size)
        ts, nxt = [int(t) for t in scheduler.timesteps], _next_timesteps(scheduler)
        gen = torch.Generator(device=device).manual_seed(step_noise_seed(seed, start))
        step_kwargs = {} if is_flow(scheduler) else {"generator": gen}
        plan = repaint_schedule(len(ts), jumps, resample)
        bar = progress_bar(total=len(plan), desc="inpaint", unit="step", disable=not progress)
        for what, i in plan:
            if what == "back":
                x = renoise(scheduler, x, nxt[i], ts[i - (i % jumps)], gen)
            else:
                v = guided_eps(model, x, ts[i], y, guidance_scale, null_class).float()
                if clip and clip_x0:
                    v = clip_x0_of(scheduler, v, ts[i], x)
                unknown, _ = scheduler.step(v, ts[i], x, **step_kwargs)
                a, b = _coefficients(scheduler, nxt[i])
                known = a * x0 + b * torch.randn(x0.shape, generator=gen, device=gen.device).to(device)
                x = torch.where(m, unknown, known)
            bar.update(1)
        bar.close()
        x = x.clamp(-1, 1) if clip else x
        out.append(torch.where(m, x, x0).cpu())
    return torch.cat(out)


def latent_mask(masks: torch.Tensor, latent_shape: Sequence[int]) -> torch.Tensor:
    """The region on the latent grid ``(N, 1, *latent_shape)`` bool: a latent cell is in it when any of its
    image voxels is (adaptive max pooling of the ``(N, 1, *spatial)`` image mask)."""
    pool = F.adaptive_max_pool2d if masks.ndim == 4 else F.adaptive_max_pool3d
    return pool(masks.float(), tuple(latent_shape)) > 0


def inpaint(
    model: nn.Module,
    scheduler,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    *,
    space=None,
    decode_tile: Sequence[int] | None = None,
    decode_overlap: float = 0.25,
    **kwargs,
) -> torch.Tensor:
    """:func:`inpaint_images` on images ``(N, 1, *spatial)`` in [-1, 1], in pixel space (``space`` None) or on the
    latents of a :class:`medaug.latent.LatentSpace` (the region on the latent grid, :func:`latent_mask`; the
    decoded region pasted into the input). ``kwargs`` as :func:`inpaint_images`. Returns ``(N, 1, *spatial)``
    in [-1, 1], equal to ``images`` outside ``masks``."""
    masks = masks.bool()
    if space is None:
        return inpaint_images(model, scheduler, images, masks, labels, **kwargs)
    device = next(space.autoencoder.parameters()).device
    z = space.encode(images.to(device)).cpu()
    z = inpaint_images(model, scheduler, z, latent_mask(masks, z.shape[2:]), labels, clip=False, **kwargs)
    decoded = space.decode(z.to(device), tile=decode_tile, overlap=decode_overlap).clamp(-1, 1).cpu()
    return torch.where(masks, decoded, images.float())


def read_inpaint_inputs(
    image_paths: Sequence[str | Path],
    mask_paths: Sequence[str | Path],
    image_shape: Sequence[int],
    window: IntensityWindow,
) -> tuple[torch.Tensor, torch.Tensor, list[Volume]]:
    """Real NIfTI images (source units, e.g. HU) and their region masks (nonzero: regenerate), one mask per image.

    Returns ``(images (N, 1, *image_shape) in [-1, 1] by window, masks (N, 1, *image_shape) bool, volumes)``, the
    volumes as read (source units, their own array shape and affine).
    Raises ``ValueError`` naming the file when counts, shapes or an empty mask do not fit: the model only knows
    images of its training shape (prepare them as its training data was prepared)."""
    if not image_paths or len(image_paths) != len(mask_paths):
        raise ValueError(
            f"{len(image_paths)} images and {len(mask_paths)} masks: give one region mask per image "
            "(sample.inpaint.images, sample.inpaint.masks)"
        )
    images, masks, volumes = [], [], []
    for ip, mp in zip(image_paths, mask_paths):
        vol, mask = read_nifti(ip), read_nifti(mp).array
        arr = (
            vol.array.reshape(vol.array.shape[: len(image_shape)])
            if vol.array.size == math.prod(image_shape)
            else vol.array
        )
        if list(arr.shape) != list(image_shape):
            raise ValueError(
                f"{ip}: shape {list(vol.array.shape)}, but the checkpoint's images are "
                f"{list(image_shape)}; prepare the image as the training data was (medaug prepare) "
                "and inpaint the prepared one"
            )
        if mask.size != arr.size:
            raise ValueError(f"{mp}: mask shape {list(mask.shape)} differs from its image {ip} {list(arr.shape)}")
        if not mask.any():
            raise ValueError(f"{mp}: the region mask is empty; mark the region to regenerate with nonzero voxels")
        images.append(torch.from_numpy(window.to_model(arr))[None])
        masks.append(torch.from_numpy(mask.reshape(arr.shape) != 0)[None])
        volumes.append(vol)
    return torch.stack(images), torch.stack(masks), volumes


def inpaint_records(
    ckpt: Checkpoint,
    labels: torch.Tensor,
    masks: torch.Tensor,
    settings: Mapping,
    affines: Sequence[np.ndarray],
    space=None,
) -> tuple[list[dict], dict]:
    """:func:`medaug.sampling.sample_records` of inpainted images, saying that they are not synthetic: each row
    has ``contains_real_patient=True`` and its region's voxel count, ``info`` the same flag and the inputs'
    geometry (the first input's affine as ``affine``; every one in ``affines``). No file names (they may name a
    patient)."""
    rows, info = sample_records(ckpt, labels, settings, space)
    for row, m in zip(rows, masks):
        row.update(contains_real_patient=True, region_voxels=int(m.sum()))
    info.update(
        contains_real_patient=True,
        affine=np.asarray(affines[0]).tolist(),
        affines=[np.asarray(a).tolist() for a in affines],
        kind="inpainted",
        note="real patient images with a region regenerated by the model (RePaint); everything outside "
        "the region is the patient's image: not for sharing outside the institution",
    )
    return rows, info


def inpaint_picture(
    images: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor, path: str | Path, min_tile: int = 96
) -> Path:
    """A PNG with one row per image: input | mask | output (3D: three mid-planes each)."""
    rows = [
        np.concatenate([np.concatenate(views(v), axis=1) for v in (x, m.float() * 2 - 1, y)], axis=1)
        for x, m, y in zip(images, masks, outputs)
    ]
    grid = np.concatenate([np.pad(r, 1) for r in rows], axis=0)
    scale = max(1, -(-min_tile // min(images.shape[2:])))
    path = Path(path)
    Image.fromarray(grid.repeat(scale, axis=0).repeat(scale, axis=1)).save(path)
    return path


def write_inpainted_nifti(
    folder: Path, outputs: torch.Tensor, masks: torch.Tensor, volumes: Sequence[Volume], window: IntensityWindow
) -> None:
    """``folder/nifti/inpaint-NNNN.nii.gz`` per output: its input volume (source units, array shape, affine) with
    the region replaced by the output mapped back through ``window``; outside the region the input's values."""
    (folder / "nifti").mkdir()
    for i, (y, m, vol) in enumerate(zip(outputs, masks, volumes)):
        region = m[0].numpy().reshape(vol.array.shape)
        array = np.where(region, window.to_source(y[0].numpy()).reshape(vol.array.shape), vol.array)
        write_nifti(
            folder / "nifti" / f"inpaint-{i:04d}.nii.gz",
            array,
            vol.affine,
            descrip="medaug inpainted: real image outside the region",
        )


CARD = """# Inpainted images (medaug inpaint): NOT synthetic

These {n} images are real patients' images in which a region ({voxels} voxels in all) was regenerated by a
class-conditional diffusion model (checkpoint {ckpt}, RePaint: sampler {sampler}, {steps} steps, jumps {jumps},
resample {resample}, guidance {guidance}) as class(es) {classes}. Everything outside the region is the patient's
image, voxel for voxel: **they contain a real patient's image** (`contains_real_patient=true` in manifest.csv and
info.json). Treat them as the source images are treated: the export share profile refuses them.

Geometry: each file in nifti/ has the affine of its input image. Model space: samples.pt, in [-1, 1] by the
checkpoint's intensity window {window}.
"""


def inpaint_card(info: Mapping, rows: Sequence[Mapping]) -> str:
    """The data card (DATA_CARD.md) of an inpainting output folder."""
    s = info["sample"]
    return CARD.format(
        n=len(rows),
        voxels=sum(r["region_voxels"] for r in rows),
        ckpt=info["checkpoint_id"],
        sampler=s["sampler"],
        steps=s["steps"],
        jumps=s["jumps"],
        resample=s["resample"],
        guidance=s["guidance_scale"],
        classes=sorted({r["class_name"] for r in rows}),
        window=info["window"],
    )


def save_inpainted(
    out_dir: str | Path,
    ckpt: Checkpoint,
    images: torch.Tensor,
    masks: torch.Tensor,
    outputs: torch.Tensor,
    labels: torch.Tensor,
    volumes: Sequence[Volume],
    settings: Mapping,
    space=None,
) -> Path:
    """Write the inpainting output folder (a samples folder, :func:`medaug.sampling.save_samples`) atomically:
    :func:`inpaint_records`, ``nifti/`` in each input's geometry (:func:`write_inpainted_nifti`), ``picture.png``
    (input | mask | output) and ``DATA_CARD.md``. ``settings``: the sampling and inpainting settings, with the
    input lists (file names, which may name a patient) kept only as their lengths."""
    settings = {k: len(v) if k in ("images", "masks") else v for k, v in settings.items()}
    rows, info = inpaint_records(ckpt, labels, masks, settings, [v.affine for v in volumes], space)
    window = IntensityWindow(**ckpt.meta["window"])

    def extra(folder: Path) -> None:
        write_inpainted_nifti(folder, outputs, masks, volumes, window)
        inpaint_picture(images, masks, outputs, folder / "picture.png")
        (folder / "DATA_CARD.md").write_text(inpaint_card(info, rows))

    return save_samples(out_dir, outputs, rows, info, ckpt.meta["class_names"], extra=extra)


def default_inpaint_sampler(spec: Mapping, sampler: str | None) -> str:
    """``sampler``, or for None the one that fits the checkpoint's scheduler ``spec``: rflow for a flow, else ddim."""
    sampler = sampler or ("rflow" if is_flow(spec) else "ddim")
    check_inpaint_sampler(sampler)
    return sampler
