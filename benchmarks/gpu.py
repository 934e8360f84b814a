"""medaug's training and sampling path against the MONAI-tutorial baseline, on one GPU.

Run by hand on a CUDA machine (not a test). All sections, each in its own process under a time
limit, then the summary (benchmarks/gpu_all.sh does this):

    bash benchmarks/gpu_all.sh ../shared/bench/monai_baseline.py benchmarks/results

One section, or the summary of what a results folder holds:

    python benchmarks/gpu.py --baseline ../shared/bench/monai_baseline.py --section train2d --out DIR
    python benchmarks/gpu.py --section summary --out DIR

The baseline script (the project's anchor) is loaded from the given path and run in the same
process on the same card as medaug's path on the same networks, so ratios are meaningful:

- ``train2d``  2D 64² tutorial network, batch 64: baseline fp16 autocast and bf16+flash+compile;
  ``medaug.training.fit`` as ``train`` runs it on a GPU (bf16, SDPA, channels_last, fused AdamW,
  torch.compile, EMA, gradient clipping; profiled), then one lever at a time for attribution,
  and the data path alone (an upper bound of the time a step can wait for data).
- ``sample2d`` DDIM 50 steps at batch 64 (and 256, reported apart): baseline fp32 eager loop
  against ``medaug.sampling.sample_images`` with CUDA graphs; the default DPM-Solver++ 2M SDE
  at 20 steps.
- ``train3d`` / ``sample3d``  the same on the 3D 64³ network (batch 4), channels_last_3d or not.
- ``memory3d`` 3D 128³ (channels 64/128/256/256) at batch 2: peak memory with and without
  activation checkpointing (bf16).
- ``ldm128``   the latent diffusion model of ``experiment=ldm_3d_ct128``: autoencoder and latent
  UNet training steps, time and peak memory per 128³ sample (the sample stage's sampler and
  steps, guidance, tiled decode), beside the pixel-space baseline network at 128³ (DDIM) where
  it fits.

Every section writes ``gpu-<card>-<section>.json`` in ``--out`` after each measurement (a run
cut short keeps what it measured); ``summary`` merges them into ``gpu-<card>.json`` and prints
the ratios. ``--tiny`` shrinks every network, shape and step count so that the whole script can
be checked on a CPU in a minute (the baseline, CUDA-only, is then skipped).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import peak_gib, reset_peak, sample_config, sync, time_sample, time_train  # noqa: E402

from medaug.latent import (  # noqa: E402
    AutoencoderSettings,
    AutoencoderStep,
    LatentSpace,
    Optimizers,
    check_shape,
    decode_latents,
    encode_mean,
)
from medaug.model import EMA, network_from_spec  # noqa: E402
from medaug.sampling import inference_scheduler, labels_for_counts  # noqa: E402
from medaug.training import draw_batch, fit, memory_format_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16
# the baseline's networks (monai_baseline.CONFIGS) and the 128³ one; --tiny swaps in small ones
NET_128 = dict(
    spatial_dims=3,
    shape=(1, 128, 128, 128),
    batch=2,
    channels=(64, 128, 256, 256),
    attention_levels=(False, False, False, True),
    num_res_blocks=1,
    num_head_channels=64,
)
TINY = {
    "2d_tutorial_64": dict(
        spatial_dims=2,
        shape=(1, 16, 16),
        batch=4,
        channels=(32, 32, 64),
        attention_levels=(False, True, True),
        num_res_blocks=1,
        num_head_channels=32,
    ),
    "3d_64": dict(
        spatial_dims=3,
        shape=(1, 8, 8, 8),
        batch=2,
        channels=(32, 32, 64),
        attention_levels=(False, False, True),
        num_res_blocks=1,
        num_head_channels=32,
    ),
    "3d_128": dict(NET_128, shape=(1, 16, 16, 16), channels=(32, 32, 32, 32), num_head_channels=32),
}


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("monai_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unet_spec(cfg: dict, **extra) -> dict:
    """medaug's spec of a baseline network (same layers; 4 classes + the null class, as the baseline's 5)."""
    return {
        "_target_": "monai.networks.nets.DiffusionModelUNet",
        "spatial_dims": cfg["spatial_dims"],
        "in_channels": 1,
        "out_channels": 1,
        "channels": list(cfg["channels"]),
        "attention_levels": list(cfg["attention_levels"]),
        "num_res_blocks": cfg["num_res_blocks"],
        "num_head_channels": cfg["num_head_channels"],
        "num_class_embeds": 5,
        "use_flash_attention": True,
        **extra,
    }


def ratio(res: dict, num: str, den: str, key: str = "img_per_s") -> float | None:
    a, b = res.get(num, {}).get(key), res.get(den, {}).get(key)
    return a / b if a and b else None


class Bench:
    """One section's measurements: each guarded (an error such as out-of-memory is recorded, the
    rest goes on), printed, and saved at once."""

    def __init__(self, section: str, out: Path, tiny: bool, baseline_path: str | None):
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.tiny = tiny
        name = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.card = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() + ("-tiny" if tiny else "")
        self.path = out / f"gpu-{self.card}-{section}.json"
        self.res: dict = {"section": section, "device": name, "torch": torch.__version__, "tiny": tiny}
        self.base = load_baseline(baseline_path) if baseline_path and self.cuda else None
        self.steps, self.warmup, self.ddim = (2, 1, 3) if tiny else (20, 5, 50)
        self.t0 = time.perf_counter()
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

    def config(self, name: str) -> dict:
        if self.tiny:
            return TINY[name]
        return NET_128 if name == "3d_128" else self.base.CONFIGS[name] if self.base else {}

    def measure(self, key: str, fn, *args, **kwargs) -> dict:
        try:
            value = fn(*args, **kwargs)
        except Exception as err:  # keep the rest of the section
            value = {"error": repr(err)[:300]}
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
        self.res[key] = value
        print(f"[{time.perf_counter() - self.t0:6.0f}s] {key}: {value}", flush=True)
        self.save()
        return value

    def baseline(self, key: str, fn_name: str, *args) -> dict:
        if self.base is None:
            self.res[key] = {"skipped": "the baseline script needs CUDA" if not self.cuda else "no --baseline"}
            return self.res[key]
        return self.measure(key, getattr(self.base, fn_name), *args)

    def ratios(self, **pairs) -> None:
        """``name=(numerator key, denominator key[, value key])``: ratios of measured values."""
        got = {name: ratio(self.res, *pair) for name, pair in pairs.items()}
        self.res.setdefault("ratios", {}).update({k: v for k, v in got.items() if v is not None})
        print("ratios:", {k: round(v, 3) for k, v in self.res["ratios"].items()}, flush=True)
        self.save()

    def save(self) -> None:
        self.res["wall_s"] = time.perf_counter() - self.t0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.res, indent=1))


def time_data_path(images_shape, n_steps: int, batch: int, device: torch.device, on_device: bool) -> dict:
    """ms per step of the training data path alone (permutation, gather, copy, layout), run back to
    back: an upper bound of what a step can wait for data, which in training overlaps compute."""
    n = max(batch * 4, 256)
    where = device if on_device else torch.device("cpu")
    images = torch.rand(n, *images_shape, device=where)
    labels = torch.randint(0, 4, (n,), device=where)
    gen = torch.Generator(device=where)
    layout = memory_format_of(len(images_shape) + 1)
    for step in range(n_steps + 3):
        if step == 3:
            sync(device)
            t0 = time.perf_counter()
        gen.manual_seed(step)
        draw_batch(images, labels, gen, slice(0, batch), device, layout)
    sync(device)
    return dict(data_ms=1000 * (time.perf_counter() - t0) / n_steps)


def train_section(b: Bench, name: str, layouts: tuple[bool, ...]) -> None:
    cfg = b.config(name)
    spec, shape, batch = unet_spec(cfg), cfg["shape"], cfg["batch"]
    s, w = b.steps, b.warmup
    b.baseline("baseline_fp16_amp", "train_rate", cfg, "fp16_amp", s, w)
    if name.startswith("2d"):  # also warms the compile cache for medaug's identical graph
        b.baseline("baseline_bf16_flash_compile", "train_rate", cfg, "bf16_flash_compile", s, w)
    fast = dict(amp_dtype=BF16 if b.cuda else None)
    best = layouts[0]
    if len(layouts) > 1:  # eager, each layout: the faster one is compiled
        for cl in layouts:
            b.measure(
                f"medaug_eager_cl{int(cl)}", time_train, spec, shape, batch, s, w, b.device, channels_last=cl, **fast
            )
        best = max(layouts, key=lambda cl: b.res[f"medaug_eager_cl{int(cl)}"].get("img_per_s", 0))
    default = dict(fast, channels_last=best, compile_mode="default" if b.cuda else None)
    b.measure(
        "medaug",
        time_train,
        spec,
        shape,
        batch,
        s,
        w,
        b.device,
        profile=b.path.with_name(f"profile-{b.card}-{name}.txt"),
        **default,
    )
    for on_device in (True, False):  # cheap, and what the data-wait share needs: before the variants
        b.measure(
            f"data_path_{'device' if on_device else 'host'}", time_data_path, shape, 50, batch, b.device, on_device
        )
    b.measure(
        "medaug_no_clip_no_ema",
        time_train,
        spec,
        shape,
        batch,
        s,
        w,
        b.device,
        grad_clip=None,
        ema_every=10**9,
        **default,
    )
    b.measure("medaug_data_on_host", time_train, spec, shape, batch, s, w, b.device, data_on_device=False, **default)
    if b.cuda:
        b.measure(
            "medaug_reduce_overhead",
            time_train,
            spec,
            shape,
            batch,
            s,
            w,
            b.device,
            **dict(default, compile_mode="reduce-overhead"),
        )
    step_ms = b.res["medaug"].get("step_ms")
    if step_ms:
        b.res["data_wait_share_upper_bound"] = {
            where: b.res[f"data_path_{where}"].get("data_ms", float("nan")) / step_ms for where in ("device", "host")
        }
    b.ratios(
        **{
            f"train_{k}_vs_fp16_amp": (k, "baseline_fp16_amp")
            for k in (
                "medaug",
                "medaug_no_clip_no_ema",
                "medaug_data_on_host",
                "medaug_reduce_overhead",
                "baseline_bf16_flash_compile",
            )
        },
        train_medaug_vs_bf16_flash_compile=("medaug", "baseline_bf16_flash_compile"),
        data_on_host_vs_device=("medaug_data_on_host", "medaug"),
    )


def sample_section(b: Bench, name: str, channels_last: bool, batches: tuple[int, ...]) -> None:
    cfg = b.config(name)
    spec, shape = unet_spec(cfg), cfg["shape"]
    mode = "reduce-overhead" if b.cuda else None
    for batch in batches:
        b.baseline(f"baseline_ddim_fp32_b{batch}", "sample_rate", dict(cfg, batch=batch), "fp32", b.ddim)
        b.measure(
            f"medaug_ddim_b{batch}",
            time_sample,
            spec,
            shape,
            batch,
            b.ddim,
            b.device,
            amp_dtype=BF16 if b.cuda else None,
            compile_mode=mode,
            channels_last=channels_last,
        )
        b.ratios(**{f"ddim_b{batch}_vs_fp32": (f"medaug_ddim_b{batch}", f"baseline_ddim_fp32_b{batch}")})
    batch = batches[0]
    few = 4 if b.tiny else 20  # the default sampler: as good at 20 steps as DDPM at 1000 on the demo
    b.measure(
        f"medaug_dpmpp_2m_sde_{few}_b{batch}",
        time_sample,
        spec,
        shape,
        batch,
        few,
        b.device,
        amp_dtype=BF16 if b.cuda else None,
        compile_mode=mode,
        channels_last=channels_last,
        sampler="dpmpp_2m_sde",
    )
    b.ratios(
        **{
            f"dpmpp_2m_sde_{few}_vs_fp32_ddim_{b.ddim}": (
                f"medaug_dpmpp_2m_sde_{few}_b{batch}",
                f"baseline_ddim_fp32_b{batch}",
            )
        }
    )


def memory_section(b: Bench) -> None:
    cfg = b.config("3d_128")
    spec = unet_spec(cfg, norm_num_groups=32)
    for ckpt in (False, True):
        b.measure(
            f"batch{cfg['batch']}_actckpt_{ckpt}",
            time_train,
            spec,
            cfg["shape"],
            cfg["batch"],
            2 if b.tiny else 4,
            1,
            b.device,
            amp_dtype=BF16 if b.cuda else None,
            activation_checkpointing=ckpt,
        )


def ldm_config(b: Bench) -> dict:
    experiment, extra = ("ldm_3d_demo", ["data.image_size=[16,16,16]"]) if b.tiny else ("ldm_3d_ct128", [])
    return OmegaConf.to_container(sample_config(experiment, *extra), resolve=True)


def latent_unet(config: dict) -> tuple[dict, tuple[int, ...]]:
    """The diffusion UNet spec of an LDM config on its latents, and the latent shape (C, *spatial)."""
    ae_spec = config["autoencoder"]["network"]
    channels = int(ae_spec["latent_channels"])
    spec = {
        **config["model"],
        "spatial_dims": 3,
        "in_channels": channels,
        "out_channels": channels,
        "num_class_embeds": 5,
    }
    return spec, (channels, *check_shape(config["data"]["image_size"], ae_spec))


def time_autoencoder_train(
    config: dict,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    amp_dtype,
    patch_size: list[int] | None = None,
) -> dict:
    """s/step and peak memory of ``fit`` with the ``AutoencoderStep`` (adversarial loss on: the costliest phase),
    on whole images or on random crops of ``patch_size``."""
    section, shape = config["autoencoder"], config["data"]["image_size"]
    torch.manual_seed(0)
    ae = network_from_spec(section["network"]).to(device)
    disc = network_from_spec(section["discriminator"]).to(device) if section.get("discriminator") else None
    opts = Optimizers(
        network_from_spec(section["optimizer"], params=ae.parameters()),
        disc,
        network_from_spec(section["disc_optimizer"], params=disc.parameters()) if disc else None,
    )
    settings = replace(
        AutoencoderSettings.from_section(section),
        batch_size=batch,
        adv_start=0,
        ckpt_every=0,
        log_every=10**9,
        val_every=0,
        amp_dtype=amp_dtype,
        patch_size=patch_size,
    )
    images = torch.rand(batch * 2, 1, *shape) * 2 - 1
    ema = EMA(ae)
    step = AutoencoderStep(ae, images, settings, opts)
    fit(ae, ema, opts, step, replace(settings, max_steps=warmup).train_settings())
    reset_peak(device)
    t0 = time.perf_counter()
    fit(ae, ema, opts, step, replace(settings, max_steps=warmup + steps).train_settings(), start_step=warmup)
    sync(device)
    return dict(
        s_per_step=(time.perf_counter() - t0) / steps,
        batch=batch,
        shape=list(shape),
        patch_size=patch_size,
        peak_gib=peak_gib(device),
        adversarial=disc is not None,
    )


def time_encode(config: dict, n: int, tile: list[int] | None, device: torch.device) -> dict:
    """Seconds and peak memory per image of encoding the latent cache (fp32, as ``train`` does it),
    whole volumes or in overlapping tiles of ``tile`` image voxels."""
    torch.manual_seed(0)
    ae = network_from_spec(config["autoencoder"]["network"]).to(device).eval()
    images = torch.rand(n, 1, *config["data"]["image_size"]) * 2 - 1
    encode_mean(ae, images[:1], tile=tile)  # warm-up (cuDNN autotuning)
    reset_peak(device)
    t0 = time.perf_counter()
    encode_mean(ae, images, batch_size=n, tile=tile)
    sync(device)
    return dict(s_per_image=(time.perf_counter() - t0) / n, batch=n, tile=tile, peak_gib=peak_gib(device))


def time_ldm_sample(config: dict, n: int, steps: int, device: torch.device, amp_dtype) -> dict:
    """Seconds and peak memory per image of ``LatentSpace.sample`` as the sample stage runs it: its
    sampler with guidance on latents, then the tiled decode (random weights: the cost does not depend
    on them)."""
    s = config["sample"]
    spec, (channels, *latent_shape) = latent_unet(config)
    torch.manual_seed(0)
    ae = network_from_spec(config["autoencoder"]["network"]).to(device).eval()
    unet = network_from_spec(spec).to(device).eval()
    space = LatentSpace(ae, 1.0, channels, latent_shape, Path("bench"), "bench")
    sch = inference_scheduler(config["scheduler"], s["sampler"], steps)
    labels = labels_for_counts({0: n})
    kw = dict(
        tile=s.get("decode_tile"),
        guidance_scale=float(s["guidance_scale"]),
        null_class=4,
        seed=0,
        batch_size=n,
        amp_dtype=amp_dtype,
        progress=False,
    )
    space.sample(unet, sch, labels[:1], **kw)  # warm-up (cuDNN autotuning)
    reset_peak(device)
    t0 = time.perf_counter()
    images = space.sample(unet, sch, labels, **kw)
    sync(device)
    total = time.perf_counter() - t0
    z = torch.randn(n, channels, *latent_shape)
    t1 = time.perf_counter()
    decode_latents(ae, z, tile=s.get("decode_tile"), batch_size=n)
    sync(device)
    return dict(
        s_per_image=total / n,
        decode_s_per_image=(time.perf_counter() - t1) / n,
        batch=n,
        sampler=s["sampler"],
        steps=steps,
        guidance_scale=kw["guidance_scale"],
        image_shape=list(images.shape[1:]),
        peak_gib=peak_gib(device),
    )


def ldm_section(b: Bench) -> None:
    config = ldm_config(b)
    amp = BF16 if b.cuda else None
    steps = 2 if b.tiny else 5
    b.measure(
        "autoencoder_train",
        time_autoencoder_train,
        config,
        config["autoencoder"]["batch_size"],
        steps,
        1,
        b.device,
        amp,
    )
    unet, latent_shape = latent_unet(config)
    b.measure(
        "latent_unet_train",
        time_train,
        unet,
        latent_shape,
        config["training"]["batch_size"],
        steps,
        2,
        b.device,
        amp_dtype=amp,
    )
    sample_steps = 3 if b.tiny else config["sample"]["steps"]
    b.measure("ldm_sample", time_ldm_sample, config, config["sample"]["batch_size"], sample_steps, b.device, amp)
    pixel = dict(b.config("3d_64"), shape=(1, *config["data"]["image_size"]), batch=1)
    b.res["pixel_baseline_network"] = {k: list(v) if isinstance(v, tuple) else v for k, v in pixel.items()}
    b.baseline("pixel_baseline_train_fp16_amp", "train_rate", pixel, "fp16_amp", 3, 1)
    ref = b.baseline("pixel_baseline_ddim10_fp32", "sample_rate", pixel, "fp32", 10)
    pixel_key = f"pixel_baseline_ddim{sample_steps}_fp32_s_per_image"
    if "s_per_batch" in ref:  # the LDM's step count: each step is the same network call, so time scales with it
        b.res[pixel_key] = ref["s_per_batch"] * sample_steps / 10
    ldm = b.res["ldm_sample"].get("s_per_image")
    if ldm and pixel_key in b.res:
        b.res.setdefault("ratios", {})["pixel_s_per_image_vs_ldm"] = b.res[pixel_key] / ldm
    b.save()
    patch = [12, 12, 12] if b.tiny else [64, 64, 64]  # volumes larger than the card: patch training, tiled encoding
    b.measure(
        "autoencoder_train_patch",
        time_autoencoder_train,
        config,
        config["autoencoder"]["batch_size"],
        steps,
        1,
        b.device,
        amp,
        patch,
    )
    for name, tile in (("encode_whole", None), ("encode_tiled", patch)):
        b.measure(name, time_encode, config, 2, tile, b.device)


SECTIONS = {
    "train2d": lambda b: train_section(b, "2d_tutorial_64", (True,)),
    "sample2d": lambda b: sample_section(b, "2d_tutorial_64", True, (4,) if b.tiny else (64, 256)),
    "train3d": lambda b: train_section(b, "3d_64", (False, True)),
    "sample3d": lambda b: sample_section(b, "3d_64", False, (2,) if b.tiny else (4,)),
    "memory3d": memory_section,
    "ldm128": ldm_section,
}


def summary(out: Path) -> None:
    """Merge the sections' files of each card in ``out`` into ``gpu-<card>.json``; print the ratios."""
    parts = sorted(p for p in out.glob("gpu-*-*.json") if p.stem.rsplit("-", 1)[-1] in SECTIONS)
    cards: dict[str, dict] = {}
    for p in parts:
        card, section = p.stem[len("gpu-") :].rsplit("-", 1)
        cards.setdefault(card, {})[section] = json.loads(p.read_text())
    for card, sections in cards.items():
        merged = out / f"gpu-{card}.json"
        merged.write_text(json.dumps(sections, indent=1))
        print(f"== {card}: {', '.join(sections)} -> {merged}")
        for section, res in sections.items():
            for k, v in res.get("ratios", {}).items():
                print(f"  {section:9} {k:45} {v:7.2f}x")
            for k, v in res.items():
                if isinstance(v, dict) and "error" in v:
                    print(f"  {section:9} {k:45} error: {v['error'][:80]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", required=True, choices=[*SECTIONS, "summary"])
    ap.add_argument("--baseline", help="path to monai_baseline.py (../shared/bench/monai_baseline.py)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tiny", action="store_true", help="tiny networks and steps: check the script (CPU is fine)")
    args = ap.parse_args()
    if args.section == "summary":
        return summary(args.out)
    bench = Bench(args.section, args.out, args.tiny, args.baseline)
    if not bench.cuda and not args.tiny:
        sys.exit("no CUDA device: run on a GPU machine, or pass --tiny to check the script on this CPU")
    SECTIONS[args.section](bench)
    bench.save()
    print("written to", bench.path)


if __name__ == "__main__":
    main()
