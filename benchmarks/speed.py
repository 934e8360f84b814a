"""Training and sampling throughput of medaug's own path, on the demo configs.

Run by hand (not a test):

    python benchmarks/speed.py                      # CPU: demo_2d and demo_3d, before/after the speed switches
    python benchmarks/speed.py --device cuda        # the same on a GPU

"before" is the plain eager fp32 path with MONAI's default attention; "after" is what
`medaug train` / `medaug sample` use on that device (fused SDPA attention, and on CUDA
bf16 autocast, channels_last in 2D and torch.compile). Both run in this one process, so
their ratio is meaningful; absolute numbers depend on the machine and its load.
Results are printed and written to benchmarks/results/speed-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from monai.networks.schedulers import DDPMScheduler
from omegaconf import OmegaConf

from medaug.model import EMA, network_from_spec
from medaug.sampling import inference_scheduler, sample_images
from medaug.training import TrainSettings, fit, prepare_for_speed

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train(spec: dict, shape, batch: int, steps: int, warmup: int, device: torch.device,
               amp_dtype=None, channels_last=False, compile_mode=None, activation_checkpointing=False,
               ema_every: int = 1) -> dict:
    """Images/s of medaug's fit loop (loss, backward, clip, AdamW, EMA) on random data held on ``device``."""
    torch.manual_seed(0)
    net = network_from_spec(spec).to(device)
    ema = EMA(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    model = prepare_for_speed(net, channels_last=channels_last and len(shape) == 3, compile_mode=compile_mode,
                              activation_checkpointing=activation_checkpointing)
    images = torch.rand(max(batch, 64), *shape, device=device) * 2 - 1
    labels = torch.randint(0, spec["num_class_embeds"] - 1, (images.shape[0],), device=device)
    settings = dict(batch_size=batch, log_every=10**9, ckpt_every=0, amp_dtype=amp_dtype, ema_every=ema_every,
                    channels_last=channels_last)
    sch = DDPMScheduler(num_train_timesteps=1000)
    kw = dict(null_class=spec["num_class_embeds"] - 1)
    t0 = time.perf_counter()
    fit(model, ema, opt, sch, images, labels, TrainSettings(max_steps=warmup, **settings), **kw)
    sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fit(model, ema, opt, sch, images, labels, TrainSettings(max_steps=warmup + steps, **settings), start_step=warmup,
        **kw)
    sync(device)
    dt = time.perf_counter() - t0
    out = dict(img_per_s=batch * steps / dt, step_ms=1000 * dt / steps, warmup_s=warm_s)
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def time_sample(spec: dict, shape, batch: int, steps: int, device: torch.device, amp_dtype=None,
                compile_mode=None, channels_last=False, sampler="ddim", guidance_scale=1.0) -> dict:
    """Images/s of medaug's sampling loop (``steps`` denoising steps), after one warm-up batch."""
    torch.manual_seed(0)
    net = network_from_spec(spec).to(device).eval()
    model = prepare_for_speed(net, channels_last=channels_last and len(shape) == 3, compile_mode=compile_mode)
    sch = inference_scheduler({"num_train_timesteps": 1000}, sampler, steps)
    labels = torch.arange(batch) % (spec["num_class_embeds"] - 1)
    kw = dict(guidance_scale=guidance_scale, null_class=spec["num_class_embeds"] - 1, seed=0, batch_size=batch,
              amp_dtype=amp_dtype, progress=False)
    t0 = time.perf_counter()
    sample_images(model, sch, labels, shape[1:], **kw)
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sample_images(model, sch, labels, shape[1:], **kw)
    sync(device)
    dt = time.perf_counter() - t0
    return dict(img_per_s=batch / dt, s_per_batch=dt, warmup_s=warm_s, steps=steps)


def demo_setup(experiment: str) -> tuple[dict, tuple, int, int]:
    """Model spec, image shape (C, *spatial), training batch and sampling batch of an experiment config."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"experiment={experiment}", "paths.output_dir=/tmp/medaug-bench"])
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    spec["num_class_embeds"] = 4
    return spec, (1, *cfg.data.image_size), cfg.training.batch_size, cfg.sample.batch_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experiments", default="demo_2d,demo_3d")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sample-steps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    results = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    for exp in args.experiments.split(","):
        spec, shape, batch, sample_batch = demo_setup(exp)
        plain = {**spec, "use_flash_attention": False}
        fast = {**spec, "use_flash_attention": True}
        after = dict(amp_dtype=torch.bfloat16 if cuda else None, channels_last=cuda,
                     compile_mode="default" if cuda else None)
        res = {
            "train_before": time_train(plain, shape, batch, args.steps, 3, device),
            "train_after": time_train(fast, shape, batch, args.steps, 3, device, **after),
            "sample_before": time_sample(plain, shape, sample_batch, args.sample_steps, device),
            "sample_after": time_sample(fast, shape, sample_batch, args.sample_steps, device, **after),
        }
        res["train_ratio"] = res["train_after"]["img_per_s"] / res["train_before"]["img_per_s"]
        res["sample_ratio"] = res["sample_after"]["img_per_s"] / res["sample_before"]["img_per_s"]
        results[exp] = res
        print(exp, json.dumps(res, indent=1), flush=True)
    out = ROOT / "benchmarks" / "results" / f"speed-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("written to", out)


if __name__ == "__main__":
    main()
