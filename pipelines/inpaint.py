"""inpaint: real image(s) + region mask + class -> the image with the region regenerated (lesion insertion).

    medaug inpaint experiment=demo_2d 'sample.inpaint.images=[img.nii.gz]' 'sample.inpaint.masks=[roi.nii.gz]' \
        sample.inpaint.class_name=multi_lesion
The output folder (paths.inpaint_dir) is a samples folder that `medaug export paths.samples_dir=...` reads, plus
nifti/ with each input's geometry, picture.png (input | mask | output) and DATA_CARD.md. It holds real patients'
images outside the region (contains_real_patient=true): the export share profile refuses it.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from medaug.inpaint import default_inpaint_sampler, inpaint, read_inpaint_inputs, save_inpainted
from medaug.latent import latent_space_of
from medaug.model import load_checkpoint
from medaug.preprocessing import IntensityWindow
from medaug.sampling import inference_scheduler, sampling_network
from medaug.tracking import tracked
from pipelines.common import container, default_ckpt, device_of, log, make_tracker, path, stage_main


def run(cfg: DictConfig) -> dict:
    s, p = cfg.sample, container(cfg.sample.inpaint)
    tracker = make_tracker(cfg)
    ckpt = load_checkpoint(default_ckpt(cfg), cfg.trust_checkpoint)
    device, names = device_of(cfg), ckpt.meta["class_names"]
    if p["class_name"] not in names:
        raise ValueError(f"sample.inpaint.class_name={p['class_name']!r}; choose one of {names}")
    window = IntensityWindow(**ckpt.meta["window"])
    images, masks, volumes = read_inpaint_inputs(p["images"], p["masks"], ckpt.meta["image_shape"], window)
    labels = torch.full((len(images),), names.index(p["class_name"]), dtype=torch.long)
    p["sampler"] = default_inpaint_sampler(ckpt.config["scheduler"], p["sampler"])
    space = latent_space_of(ckpt.meta, device, cfg.trust_checkpoint)  # None: pixel space
    outputs = inpaint(
        sampling_network(ckpt, device, use_ema=s.use_ema),
        inference_scheduler(ckpt.config["scheduler"], p["sampler"], p["steps"]),
        images,
        masks,
        labels,
        space=space,
        **{k: p[k] for k in ("jumps", "resample", "guidance_scale")},
        **{k: s[k] for k in ("seed", "batch_size", "clip_x0", "decode_tile")},
        null_class=len(names),
    )
    settings = {**{k: v for k, v in container(s).items() if k != "inpaint"}, **p}
    out = save_inpainted(path(cfg.paths.inpaint_dir), ckpt, images, masks, outputs, labels, volumes, settings, space)
    with tracked(tracker, run_name=f"{cfg.name}-inpaint", tags={"medaug.job": cfg.name}):
        tracker.log_artifact(out / "picture.png", "inpaint")
    log.info("inpainted %d images as %s into %s", len(outputs), p["class_name"], out)
    return {"inpainted": len(outputs), "inpaint_dir": str(out)}


main = stage_main("inpaint", run)

if __name__ == "__main__":
    main()
