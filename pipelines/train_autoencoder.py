"""train_autoencoder: prepared dataset → AutoencoderKL checkpoint, latent scale factor, cached latents.

The first phase of latent diffusion (README "Latent diffusion for 3D"); `train` then learns the
latents. Resumes latent.autoencoder_ckpt when it exists; `train` with latent.train_if_missing=true
runs this same recipe when the checkpoint is missing.

    python -m pipelines.train_autoencoder experiment=ldm_3d_demo
    medaug train_autoencoder experiment=demo_2d autoencoder=kl_small
    torchrun --nproc_per_node=4 -m pipelines.train_autoencoder experiment=ldm_3d_ct128   # data-parallel
"""

from __future__ import annotations

import random

import numpy as np
import torch
from omegaconf import DictConfig

from medaug.latent import train_autoencoder
from medaug.runtime import process_group
from pipelines.common import amp_dtype_of, container, device_of, make_tracker, path, stage_main


def run(cfg: DictConfig) -> dict:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    device = device_of(cfg)
    with process_group(device):
        result = train_autoencoder(
            container(cfg).get("autoencoder"),
            path(cfg.paths.prepared_dir),
            path(cfg.latent.autoencoder_ckpt),
            path(cfg.latent.cache_dir),
            device=device,
            amp_dtype=amp_dtype_of(cfg, device),
            tracker=make_tracker(cfg),
            run_name=f"{cfg.name}-autoencoder",
            trust=cfg.trust_checkpoint,
        )
    return {
        "autoencoder/step": result.step,
        "autoencoder/scale_factor": result.scale_factor,
        "checkpoint": str(result.path),
        **result.metrics,
    }


main = stage_main("train_autoencoder", run)

if __name__ == "__main__":
    main()
