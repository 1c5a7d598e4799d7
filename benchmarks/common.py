"""Shared timing helpers for benchmarks: interleaved trials, medians, synchronised CUDA."""
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, iters, device):
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - start) / iters


def compare(named_steps, iters=50, trials=7, warmup=10, device="cpu"):
    """Time each step function in interleaved trials; returns {name: median seconds/iter}."""
    for _, step in named_steps:
        for _ in range(warmup):
            step()
    results = {name: [] for name, _ in named_steps}
    for _ in range(trials):
        for name, step in named_steps:
            results[name].append(time_steps(step, iters, device))
    return {name: statistics.median(v) for name, v in results.items()}


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "CPU, %d threads (torch %s)" % (torch.get_num_threads(), torch.__version__)
