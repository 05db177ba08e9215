"""Cost accounting: parameters, MACs (torch.utils.flop_counter), wall / CPU time and peak
memory per stage."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, inputs: tuple[Any, ...]) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2, as FlopCounterMode counts a
    multiply-add as 2 FLOPs for matmul and convolution)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*inputs)
    finally:
        module.train(was_training)
    return counter.get_total_flops() // 2


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class StageCost:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float = 0.0


@contextmanager
def measure(device: torch.device) -> Iterator[StageCost]:
    """Measure wall time, process CPU time and peak memory of the enclosed block."""
    cost = StageCost()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield cost
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            cost.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
        cost.wall_s = time.perf_counter() - wall
        cost.cpu_s = time.process_time() - cpu
        cost.peak_rss_mb = peak_rss_mb()
