"""Training and sampling throughput of medaug's own path, on the demo configs.

Run by hand (not a test):

    python benchmarks/speed.py                      # CPU: demo_2d and demo_3d, before/after the speed switches
    python benchmarks/speed.py --device cuda        # the same on a GPU

"before" is the plain eager fp32 path with MONAI's default attention (sampling: DDIM, 50
steps); "after" is what `medaug train` / `medaug sample` use on that device (fused SDPA
attention, the experiment's sampler and steps, and on CUDA bf16 autocast, channels_last in 2D
and torch.compile). Both run in this one process, so
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
from medaug.training import DiffusionStep, TrainSettings, fit, prepare_for_speed

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA; a no-op elsewhere)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak device memory since :func:`reset_peak`, GiB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_train(
    spec: dict,
    shape,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    amp_dtype=None,
    channels_last=False,
    compile_mode=None,
    activation_checkpointing=False,
    ema_every: int = 1,
    grad_clip: float | None = 1.0,
    data_on_device: bool = True,
    profile: Path | None = None,
) -> dict:
    """Images/s of medaug's fit loop (loss, backward, clip, AdamW, EMA) on random data, held on
    ``device`` or (``data_on_device=False``) in host memory, each batch copied over as training does.

    ``enqueue_ms`` is the host's time per step until the last step is queued: close to ``step_ms``
    means the host (launches, Python, syncs) sets the pace, not the device. ``profile`` (a file)
    profiles a few more steps there and adds the device's busy time per step and the host syncs seen.
    """
    torch.manual_seed(0)
    net = network_from_spec(spec).to(device)
    ema = EMA(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    model = prepare_for_speed(
        net, channels_last=channels_last, compile_mode=compile_mode, activation_checkpointing=activation_checkpointing
    )
    images = torch.rand(max(batch, 64), *shape, device=device if data_on_device else "cpu") * 2 - 1
    labels = torch.randint(0, spec["num_class_embeds"] - 1, (images.shape[0],), device=images.device)
    settings = dict(batch_size=batch, log_every=10**9, ckpt_every=0, ema_every=ema_every, grad_clip=grad_clip)
    sch = DDPMScheduler(num_train_timesteps=1000)
    step = DiffusionStep(
        model,
        sch,
        images,
        labels,
        null_class=spec["num_class_embeds"] - 1,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
    )

    def run(start: int, n: int) -> None:
        fit(model, ema, opt, step, TrainSettings(max_steps=start + n, **settings), start_step=start)

    t0 = time.perf_counter()
    run(0, warmup)
    sync(device)
    warm_s = time.perf_counter() - t0
    reset_peak(device)
    t0 = time.perf_counter()
    run(warmup, steps)
    queued = time.perf_counter() - t0
    sync(device)
    dt = time.perf_counter() - t0
    out = dict(
        img_per_s=batch * steps / dt, step_ms=1000 * dt / steps, enqueue_ms=1000 * queued / steps, warmup_s=warm_s
    )
    if device.type == "cuda":
        out["peak_gib"] = peak_gib(device)
    if profile is not None:
        out.update(profile_steps(lambda: run(warmup + steps, 5), 5, device, profile))
    return out


def profile_steps(work, steps: int, device: torch.device, path: Path) -> dict:
    """Run ``work`` (``steps`` steps) under the torch profiler: the device's busy time per step and
    the host-blocking calls seen (synchronisations, blocking copies); the op tables go to ``path``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        work()
        sync(device)
    events = prof.key_averages()

    def device_us(e) -> float:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    busy = sum(device_us(e) for e in events if e.device_type == DeviceType.CUDA)
    blocking = {
        e.key: e.count
        for e in events
        if "Synchronize" in e.key or e.key in ("cudaMemcpy", "aten::item", "aten::_local_scalar_dense")
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        events.table(sort_by="self_cpu_time_total", row_limit=30)
        + "\n\n"
        + (events.table(sort_by="self_device_time_total", row_limit=30) if device.type == "cuda" else "")
    )
    return dict(device_busy_ms=busy / 1000 / steps, host_blocking_calls=blocking)


def time_sample(
    spec: dict,
    shape,
    batch: int,
    steps: int,
    device: torch.device,
    amp_dtype=None,
    compile_mode=None,
    channels_last=False,
    sampler="ddim",
    guidance_scale=1.0,
) -> dict:
    """Images/s of medaug's sampling loop (``steps`` denoising steps), after one warm-up batch."""
    torch.manual_seed(0)
    net = network_from_spec(spec).to(device).eval()
    model = prepare_for_speed(net, channels_last=channels_last, compile_mode=compile_mode)
    sch = inference_scheduler({"num_train_timesteps": 1000}, sampler, steps)
    labels = torch.arange(batch) % (spec["num_class_embeds"] - 1)
    kw = dict(
        guidance_scale=guidance_scale,
        null_class=spec["num_class_embeds"] - 1,
        seed=0,
        batch_size=batch,
        amp_dtype=amp_dtype,
        progress=False,
    )
    t0 = time.perf_counter()
    sample_images(model, sch, labels, shape[1:], **kw)
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sample_images(model, sch, labels, shape[1:], **kw)
    sync(device)
    dt = time.perf_counter() - t0
    return dict(img_per_s=batch / dt, s_per_batch=dt, warmup_s=warm_s, steps=steps)


def sample_config(experiment: str, *overrides: str):
    """The sample stage's config of ``experiment`` (it holds every section: model, data, training, sample...)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "sample", overrides=[f"experiment={experiment}", "paths.output_dir=/tmp/medaug-bench", *overrides]
        )


def demo_setup(experiment: str) -> tuple[dict, tuple, int, int, str, int]:
    """Model spec, image shape (C, *spatial), training batch, sampling batch, sampler and its steps
    of an experiment config."""
    cfg = sample_config(experiment)
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    spec["num_class_embeds"] = 4
    s = cfg.sample
    return spec, (1, *cfg.data.image_size), cfg.training.batch_size, s.batch_size, s.sampler, s.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experiments", default="demo_2d,demo_3d")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the 'before' sampling loop")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    results = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for exp in args.experiments.split(","):
        spec, shape, batch, sample_batch, sampler, steps = demo_setup(exp)
        plain = {**spec, "use_flash_attention": False}
        fast = {**spec, "use_flash_attention": True}
        after = dict(
            amp_dtype=torch.bfloat16 if cuda else None,
            channels_last=cuda and len(shape) == 3,
            compile_mode="default" if cuda else None,
        )
        res = {
            "train_before": time_train(plain, shape, batch, args.steps, 3, device),
            "train_after": time_train(fast, shape, batch, args.steps, 3, device, **after),
            "sample_before": time_sample(plain, shape, sample_batch, args.sample_steps, device),
            "sample_after": {
                **time_sample(fast, shape, sample_batch, steps, device, sampler=sampler, **after),
                "sampler": sampler,
            },
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
