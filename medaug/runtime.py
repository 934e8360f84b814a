"""Where a stage runs: its device, its place under torchrun (rank, world size, process group), its precision.

Every stage asks here, with plain values from its config (``training.device``, ``training.precision``):

Example::

    device = device_of("auto")                        # cuda:LOCAL_RANK with a GPU, else cpu
    with process_group(device) as (rank, world):      # (0, 1) without torchrun
        amp = amp_dtype_of("auto", device)            # bf16 on CUDA, None (fp32) on the CPU
        ...
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def distributed() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` that torchrun gave this process (its environment); (0, 0, 1)
    without torchrun. Known before the process group starts; :func:`rank_and_world` asks the group."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the running ``torch.distributed`` process group; ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank of the running process group (nothing without one)."""
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


@contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """Around a stage's work under torchrun: ``(rank, world_size)``, with the process group started
    (NCCL on CUDA, gloo on the CPU) and, at the end, torn down once every rank is done. A rank that
    fails does not wait for the others: it exits, and torchrun stops the rest. Without torchrun: (0, 1)."""
    world = distributed()[2]
    started = world > 1 and not torch.distributed.is_initialized()
    if started:  # device_of made a GPU this rank's current one
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield rank_and_world() if world > 1 else (0, 1)
        barrier()  # every rank reaches here before any tears down (gloo aborts otherwise)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def device_of(name: str) -> torch.device:
    """The device ``name`` (``auto``: this rank's GPU, ``cuda:LOCAL_RANK``, when there is one, else the CPU).
    A GPU becomes the current device, with TF32 matmuls/convolutions and cuDNN's autotuner on."""
    if name == "auto":
        name = f"cuda:{distributed()[1]}" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"training.device={name} but no CUDA device is visible; use training.device=cpu")
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def switch(value, on_cuda: bool) -> bool:
    """A speed switch from the config: ``auto`` means on for CUDA (``on_cuda``), off elsewhere."""
    return on_cuda if value == "auto" else bool(value)


def amp_dtype_of(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``): ``auto`` is bf16 on
    CUDA and fp32 (None: no autocast) on the CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"training.precision={precision!r}; choose auto, fp32, bf16 or fp16")
    return PRECISIONS[precision]
