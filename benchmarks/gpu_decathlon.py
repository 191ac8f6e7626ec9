"""Benchmark 6, part B (accelerator): ``decathlon.train`` end to end, one process per run, with
images per second and milliseconds per step read from each run's log (see :mod:`benchmarks.gpu`).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional


from benchmarks.gpu_steps import EPOCHS, SPLITS
from benchmarks.harness import Section, fmt, median
from common.config import read_run_config
from common.runlog import RunDir

E2E_RUNS = ("32:cudagraphs:resident", "32:cudagraphs:resident:piggyback:fp32", "32:cudagraphs:resident:piggyback:bf16cl",
            "128:cudagraphs:resident", "128:cudagraphs:resident:piggyback:bf16cl", "128:on:resident",
            "128:on:resident:finetune")
# LOADER: resident = images kept on the device; device = gathered on the host, augmented on the device
LOADERS = {"resident": ["--loader", "device", "--images-on-device", "on"],
           "device": ["--loader", "device", "--images-on-device", "off"], "workers": ["--loader", "workers"]}
# PRECISION: decathlon.train's defaults (left out), fp32 (TF32) NCHW, fp32 channels_last (cl),
# or bf16 autocast with channels_last (bf16cl)
PRECISIONS = {"default": [], "fp32": ["--amp", "off", "--channels-last", "off"], "cl": ["--amp", "off", "--channels-last", "on"],
              "bf16cl": ["--amp", "on", "--channels-last", "on"]}
# The goals for decathlon.train end to end: (images/s, minutes of the nine-task recipe) per batch.
E2E_GOALS = {128: (15000, 20), 32: (8000, 45)}


def parse_run(spec: str):
    """``BATCH:COMPILE:LOADER[:METHOD[:PRECISION]]`` -> (label, decathlon.train flags)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4, 5) or not parts[0].isdigit() or parts[1] not in ("on", "off", "cudagraphs") \
            or parts[2] not in LOADERS or (len(parts) == 5 and parts[4] not in PRECISIONS):
        raise argparse.ArgumentTypeError(
            f"end-to-end run {spec!r}: expected BATCH:COMPILE:LOADER[:METHOD[:PRECISION]], e.g. 128:on:resident "
            f"or 32:cudagraphs:device:finetune (COMPILE on|off|cudagraphs, LOADER {'|'.join(LOADERS)}, "
            f"PRECISION {'|'.join(PRECISIONS)})")
    method = parts[3] if len(parts) >= 4 else "piggyback"
    precision = parts[4] if len(parts) == 5 else "default"
    mode = {"on": "compiled", "off": "eager", "cudagraphs": "CUDA graphs"}[parts[1]]
    label = f"{method}, batch {parts[0]}, {mode}, {parts[2]} loader" + ("" if precision == "default" else f", {precision}")
    return label, ["--batch-size", parts[0], "--compile", parts[1], *LOADERS[parts[2]], "--method", method,
                   *PRECISIONS[precision]]


def end_to_end(root: Path, task: str, out: Path, runs, epochs: int, extra: List[str], log=print,
               report: Optional[Callable[[Section], None]] = None) -> Section:
    """``decathlon.train`` as users run it; images/s from its own log, the median over the
    epochs after the first (which compiles; at batch 32 epochs differ by 10-20 % on an H100).
    ``report(section)`` is called after every run, so a cut-off session keeps what it measured."""
    section = Section("6b. GPU end to end", f"`python -m decathlon.train --task {task}` on the tree at {root}, "
                      f"{epochs} epochs; images/s = training images / epoch time, the median over the epochs after the "
                      f"first (training, evaluation, loading and the checkpoint included).")
    rows, rates = [], {}
    train = sum(s[0] for s in SPLITS.values())

    def fill():
        section.tables.clear()
        section.checks.clear()
        for batch, (goal_rate, goal_minutes) in E2E_GOALS.items():
            mine = {k: r for k, r in rates.items() if k.startswith(f"piggyback, batch {batch},")}
            if mine:
                best = max(mine, key=mine.get)
                minutes = train * EPOCHS / mine[best] / 60
                section.check(f"decathlon.train images/s, batch {batch} ({best.split(', ', 2)[2]})",
                              fmt(mine[best]), f">= {goal_rate:,}", mine[best] >= goal_rate)
                section.check(f"nine-task recipe projected, batch {batch}", f"{minutes:.1f} min",
                              f"< {goal_minutes} min", minutes < goal_minutes)
        section.table("", ["run", "images/s (median after epoch 1)", "images/s per epoch", "ms per step",
                           "outside steps", "command s"], rows)
        section.table(f"Projected nine-task, {EPOCHS}-epoch recipe ({train:,} training images per epoch) at these "
                      f"end-to-end rates:", ["run", "minutes"],
                      [[k, f"{train * EPOCHS / r / 60:.1f}"] for k, r in rates.items()])

    for label, flags in runs:
        run_dir = out / label.replace(" ", "_").replace(",", "")
        cmd = [sys.executable, "-m", "decathlon.train", "--task", task, "--data-root", str(root), "--out", str(run_dir),
               "--epochs", str(epochs), "--print-freq", "1000", *extra, *flags]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log(f"  {label}: failed\n" + proc.stdout[-2000:] + proc.stderr[-3000:])
            rows.append([label, "failed", "", "", "", f"{time.perf_counter() - t0:.0f}"])
        else:
            records = RunDir(run_dir / task).read_log()
            cfg = read_run_config(run_dir / task)
            per_epoch = [cfg["train_images"] / r["epoch_time_s"] for r in records]
            steady = records[1:] or records  # epoch 1 holds compilation and the cache fill
            rates[label] = median([cfg["train_images"] / r["epoch_time_s"] for r in steady])
            step_ms = 1000 * median([r["step_time_s"] for r in steady])
            # the share of the epoch outside training steps: evaluation, checkpoint
            outside = median([1 - r["step_time_s"] * r["steps"] / r["epoch_time_s"] for r in steady])
            rows.append([label, fmt(rates[label]), " / ".join(fmt(r) for r in per_epoch), f"{step_ms:.2f}",
                         f"{100 * outside:.0f} %", f"{time.perf_counter() - t0:.0f}"])
            log(f"  {label}: {rates[label]:.0f} images/s (epochs: {', '.join(f'{r:.0f}' for r in per_epoch)})")
        fill()
        if report is not None:
            report(section)
    return section


# Part D: classification.train and segmentation.train end to end, one process per run.
