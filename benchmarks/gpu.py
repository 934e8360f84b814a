"""medaug's training and sampling path against the MONAI-tutorial baseline, on one GPU.

Run by hand on a CUDA machine (not a test):

    python benchmarks/gpu.py --baseline ../shared/bench/monai_baseline.py [--quick]

The baseline script (the project's anchor, ../shared/bench/monai_baseline.py) is loaded
from the given path and run in this same process on the same card, then medaug's path
on the same networks: `medaug.training.fit` (class-conditional loss in fp32, bf16
autocast, SDPA attention, channels_last in 2D, fused AdamW, torch.compile, EMA and
gradient clipping included) and `medaug.sampling.sample_images` (50 DDIM steps).
Ratios are printed and the results written to benchmarks/results/gpu-<card>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import time_sample, time_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("monai_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unet_spec(cfg: dict) -> dict:
    return {"_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": cfg["spatial_dims"],
            "in_channels": 1, "out_channels": 1, "channels": list(cfg["channels"]),
            "attention_levels": list(cfg["attention_levels"]), "num_res_blocks": cfg["num_res_blocks"],
            "num_head_channels": cfg["num_head_channels"], "num_class_embeds": 5, "use_flash_attention": True}


def guarded(fn, *args, **kwargs) -> dict:
    """Run one measurement; an error (e.g. out of memory) is recorded, not fatal."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # keep the rest of the run
        return {"error": repr(err)[:300]}
    finally:
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="path to monai_baseline.py")
    ap.add_argument("--configs", default="2d_tutorial_64,3d_64")
    ap.add_argument("--quick", action="store_true", help="few steps, to check the script")
    ap.add_argument("--train-modes", default="fp16_amp,bf16_flash_compile")
    ap.add_argument("--sample-compile", default="default,reduce-overhead")
    ap.add_argument("--memory-3d", action="store_true", help="3D 128³ peak memory with/without checkpointing")
    args = ap.parse_args()
    base = load_baseline(args.baseline)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    steps, warm, ddim = (3, 2, 5) if args.quick else (20, 5, 50)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": steps}
    t_start = time.perf_counter()
    card = re.sub(r"[^A-Za-z0-9]+", "-", out["device"]).strip("-").lower()
    path = ROOT / "benchmarks" / "results" / f"gpu-{card}{'-quick' if args.quick else ''}.json"

    def save() -> None:  # after every measurement, so a run cut short keeps what it measured
        out["wall_s"] = time.perf_counter() - t_start
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))

    for name in args.configs.split(","):
        cfg = base.CONFIGS[name]
        spec, shape, batch = unet_spec(cfg), cfg["shape"], cfg["batch"]
        res = {}
        for mode in args.train_modes.split(","):
            res[f"baseline_train_{mode}"] = guarded(base.train_rate, cfg, mode, steps, warm)
            print(name, mode, res[f"baseline_train_{mode}"], flush=True)
        res["medaug_train"] = guarded(time_train, spec, shape, batch, steps, warm, dev, amp_dtype=torch.bfloat16,
                                      channels_last=True, compile_mode="default")
        print(name, "medaug train", res["medaug_train"], flush=True)
        res["baseline_ddim_fp32"] = guarded(base.sample_rate, cfg, "fp32", ddim)
        print(name, "baseline ddim fp32", res["baseline_ddim_fp32"], flush=True)
        for mode in args.sample_compile.split(","):
            res[f"medaug_ddim_{mode}"] = guarded(time_sample, spec, shape, batch, ddim, dev, amp_dtype=torch.bfloat16,
                                                 compile_mode=mode, channels_last=True)
            print(name, "medaug ddim", mode, res[f"medaug_ddim_{mode}"], flush=True)
        ref = res.get("baseline_train_fp16_amp", {}).get("img_per_s")
        if ref and "img_per_s" in res["medaug_train"]:
            res["ratio_train_vs_fp16_amp"] = res["medaug_train"]["img_per_s"] / ref
        ref = res["baseline_ddim_fp32"].get("img_per_s")
        for mode in args.sample_compile.split(","):
            got = res[f"medaug_ddim_{mode}"].get("img_per_s")
            if ref and got:
                res[f"ratio_ddim_{mode}_vs_fp32"] = got / ref
        out[name] = res
        save()
        print(name, {k: round(v, 2) for k, v in res.items() if k.startswith("ratio")}, flush=True)
    if args.memory_3d:
        spec = {**unet_spec(dict(spatial_dims=3, channels=(64, 128, 256, 256),
                                 attention_levels=(False, False, False, True), num_res_blocks=1,
                                 num_head_channels=64)), "norm_num_groups": 32}
        for ckpt in (False, True):
            out[f"3d_128_batch2_actckpt_{ckpt}"] = guarded(
                time_train, spec, (1, 128, 128, 128), 2, 2 if args.quick else 5, 1, dev, amp_dtype=torch.bfloat16,
                compile_mode=None, activation_checkpointing=ckpt)
            print("3d 128 act ckpt", ckpt, out[f"3d_128_batch2_actckpt_{ckpt}"], flush=True)
            save()
    save()
    print(json.dumps(out, indent=1))
    print("written to", path)


if __name__ == "__main__":
    main()
