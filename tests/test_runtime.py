"""medaug.runtime: device, torchrun rank/world, process group and autocast dtype from plain config values."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from medaug.runtime import amp_dtype_of, barrier, device_of, distributed, process_group, rank_and_world, switch


def test_amp_dtype_of_each_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_dtype_of("auto", cpu) is None and amp_dtype_of("auto", cuda) is torch.bfloat16
    assert amp_dtype_of("fp32", cuda) is None and amp_dtype_of("bf16", cpu) is torch.bfloat16
    assert amp_dtype_of("fp16", cuda) is torch.float16
    with pytest.raises(ValueError, match=r"training.precision='fp8'; choose auto, fp32, bf16 or fp16"):
        amp_dtype_of("fp8", cpu)


def test_switch_auto_follows_cuda():
    assert switch("auto", True) is True and switch("auto", False) is False
    assert switch(True, False) is True and switch(False, True) is False


def test_distributed_reads_torchruns_environment(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert distributed() == (0, 0, 1)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert distributed() == (5, 1, 8)


def test_device_of_cpu_and_missing_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_of("cpu") == torch.device("cpu") and device_of("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="training.device=cuda:1 but no CUDA device is visible"):
        device_of("cuda:1")


def test_device_of_auto_is_this_ranks_gpu(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    flags = [
        (torch.backends.cudnn, "benchmark"),
        (torch.backends.cudnn, "allow_tf32"),
        (torch.backends.cuda.matmul, "allow_tf32"),
    ]
    saved = [getattr(module, name) for module, name in flags]  # cuBLAS's flag is no plain attribute for monkeypatch
    try:
        for module, name in flags:
            setattr(module, name, False)
        assert device_of("auto") == torch.device("cuda", 3)
        assert current == [torch.device("cuda", 3)] and all(getattr(module, name) for module, name in flags)
    finally:
        for (module, name), value in zip(flags, saved):
            setattr(module, name, value)


def test_without_torchrun_there_is_one_rank_and_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_world() == (0, 1)
    barrier()  # nothing to wait for
    with process_group(torch.device("cpu")) as (rank, world):
        assert (rank, world) == (0, 1) and not torch.distributed.is_initialized()


def _two_ranks(rank: int, port: int, results) -> None:
    import os

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    with process_group(torch.device("cpu")) as (r, world):
        seen = rank_and_world()
        barrier()
    results.put((rank, r, world, seen, torch.distributed.is_initialized()))


def test_process_group_of_two_ranks_starts_and_ends():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_two_ranks, args=(rank, port, results)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    got = sorted(results.get(timeout=5) for _ in procs)
    # (env rank, yielded rank, yielded world, the group's (rank, world), group still up after the block)
    assert got == [(0, 0, 2, (0, 2), False), (1, 1, 2, (1, 2), False)]
