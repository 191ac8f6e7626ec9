"""Benchmark 6, part C (accelerator): evaluation of a plain WRN-28-4, eager against compiled and
CUDA graphs, with the images after which compiling pays back (see :mod:`benchmarks.gpu`).
"""
from __future__ import annotations

import time

import torch

from benchmarks.gpu_steps import sync
from benchmarks.harness import Section, fmt, median
from benchmarks.workloads import get_workload

def measure_eval(device: torch.device, batch: int, batches: int = 40, log=print) -> Section:
    """Evaluation (no gradients) of a plain WRN-28-4 at 64 px, what ``decathlon.submit``
    runs per task: eager against compiled and CUDA graphs, each with what its first batch
    cost (compilation), and the images after which compiling pays back."""
    section = Section("6c. GPU evaluation", f"A plain WRN-28-4 (masks folded) at 64x64, batch {batch}, under "
                      f"`torch.no_grad()`, eval mode: the cost of the first batch (compilation, autotuning) and "
                      f"the median rate of {batches} batches after it.")
    torch.manual_seed(0)
    model = get_workload("wrn28_4").build().to(device).eval()
    x = torch.randn(batch, 3, 64, 64, device=device)
    rows, rates = [], {}
    modes = (("eager", None), ("compiled", "default"), ("CUDA graphs", "reduce-overhead"))
    for label, mode in modes if device.type == "cuda" else modes[:1]:  # the CPU checks the code path
        torch._dynamo.reset()
        fwd = torch.compile(model, mode=mode) if mode else model
        with torch.no_grad():
            sync(device)
            t0 = time.perf_counter()
            fwd(x).sum().item()
            first = time.perf_counter() - t0
            times = []
            for _ in range(batches):
                sync(device)
                t0 = time.perf_counter()
                fwd(x).argmax(1)
                sync(device)
                times.append(time.perf_counter() - t0)
        rates[label] = (batch / median(times), first)
        log(f"  eval {label}: first batch {first:.1f}s, {rates[label][0]:.0f} images/s")
    eager_rate, eager_first = rates["eager"]
    for label, (rate, first) in rates.items():
        gain = 1 / eager_rate - 1 / rate  # seconds saved per image
        pays = "" if label == "eager" else f"{(first - eager_first) / gain:,.0f}" if gain > 0 else "never"
        rows.append([label, f"{first:.1f}", fmt(rate), pays])
    section.table("", ["mode", "first batch s", "images/s", "images before compiling pays"], rows)
    return section
