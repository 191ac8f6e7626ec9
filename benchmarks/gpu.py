"""Benchmark 6 (accelerator): WRN-28-4 mask training in fp32 and in bf16 + channels_last.

``python -m benchmarks.gpu [--out BENCHMARKS-gpu.md]`` on a machine with a CUDA device:
images per second of a piggyback training step (and of a finetuning step, for the
overhead on the device) at batch 32 and 128, in fp32 and with bf16 autocast plus
channels_last memory format, timed side by side; then the projected wall time of the
paper's decathlon recipe (nine tasks, 60 epochs each) at the measured rate. Not a test.
``benchmarks.run`` calls :func:`run`, which reports "not measured" without a device.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import (Section, fmt, machine_info, markdown_path, median, median_ratio,
                                render_markdown)
from benchmarks.workloads import get_workload, make_optimizer, prepare
from common.amp import autocast, maybe_channels_last
from common.cli import run_cli
from common.runlog import atomic_write_bytes

# train / val images of the nine mask tasks (the challenge's published split sizes)
SPLITS = {"aircraft": (3334, 3333), "cifar100": (40000, 10000), "daimlerpedcls": (23520, 5880),
          "dtd": (1880, 1880), "gtsrb": (31367, 7842), "omniglot": (17853, 6492),
          "svhn": (47217, 26040), "ucf101": (7585, 1952), "vgg-flowers": (1020, 1020)}
EPOCHS = 60
MODES = {"fp32": (False, False), "bf16 + channels_last": (True, True)}


def _step_fn(model, opt, x, y, device, amp):
    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        opt.step()
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, batch_size: int, steps: int, rounds: int) -> dict:
    """Images/s per (mode, method): every round runs ``steps`` steps of each contender."""
    workload = get_workload("wrn28_4")
    torch.manual_seed(0)
    plain = workload.build()
    x_cpu, y_cpu = workload.batch(batch_size)
    contenders = {}
    for mode, (amp, channels_last) in MODES.items():
        for method in ("piggyback", "finetune"):
            model, params = prepare(plain, method, workload, train_bn=False)
            model = maybe_channels_last(model.to(device), channels_last)
            opt = make_optimizer("adam", params)
            x = maybe_channels_last(x_cpu.to(device), channels_last)
            contenders[(mode, method)] = _step_fn(model, opt, x, y_cpu.to(device), device, amp)
    times = {k: [] for k in contenders}
    for r in range(rounds + 1):  # round 0 warms up (cuDNN autotuning, allocator)
        for key, step in contenders.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            if r:
                times[key].append((time.perf_counter() - start) / steps)
    return times


def run(quick: bool, context: dict, device: str = "cuda") -> Section:
    start = time.perf_counter()
    section = Section("6. GPU", "WRN-28-4 at 64x64, Adam, BN frozen, random weights and data on the device "
                      "(no loader in the loop). Images/s are medians over rounds of repeated steps.")
    if device == "cuda" and not torch.cuda.is_available():
        section.notes.append("**Not measured here**: this machine has no CUDA device. Run "
                             "`python -m benchmarks.gpu` on a machine with one; it writes "
                             "BENCHMARKS-gpu.md with the device name and these figures.")
        section.check("bf16 + channels_last vs fp32 images/s", "not measured (no GPU)", "reported", None)
        return section
    dev = torch.device(device)
    name = "CPU (code-path check only)"
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as decathlon.train does: fixed 64x64 inputs
        name = (f"{torch.cuda.get_device_name(dev)}; cuDNN autotuning on, TF32 convolutions "
                f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}")
    section.intro += f" Device: **{name}**."
    rows, best = [], {}
    for batch in ((32,) if quick else (32, 128)):
        t = measure(dev, batch, steps=3 if quick or dev.type == "cpu" else 20, rounds=3 if quick else 5)
        for mode in MODES:
            pg, ft = t[(mode, "piggyback")], t[(mode, "finetune")]
            rate = batch / median(pg)
            best[(batch, mode)] = rate
            rows.append([str(batch), mode, fmt(rate), fmt(batch / median(ft)),
                         f"{median_ratio(pg, ft):.3f}"])
        speedup = best[(batch, "bf16 + channels_last")] / best[(batch, "fp32")]
        section.check(f"bf16 + channels_last / fp32 images/s, batch {batch}", f"{speedup:.2f}x", "reported", None)
    section.table("", ["batch", "precision", "piggyback images/s", "finetune images/s",
                       "piggyback / finetune step time"], rows)
    train = sum(s[0] for s in SPLITS.values())
    trainval = sum(sum(s) for s in SPLITS.values())
    proj = []
    for (batch, mode), rate in sorted(best.items()):
        proj.append([str(batch), mode, f"{train * EPOCHS / rate / 3600:.2f}", f"{trainval * EPOCHS / rate / 3600:.2f}"])
    section.table(f"Projected wall time of the nine-task decathlon, {EPOCHS} epochs per task, one device, "
                  f"if the loader keeps up ({train:,} train or {trainval:,} train+val images per epoch):",
                  ["batch", "precision", "hours, train split", "hours, train+val"], proj)
    section.seconds = time.perf_counter() - start
    return section


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GPU benchmark of WRN-28-4 mask training (benchmark 6).")
    parser.add_argument("--out", type=markdown_path, default=Path(__file__).resolve().parent.parent / "BENCHMARKS-gpu.md",
                        help="Markdown report to write (default: BENCHMARKS-gpu.md at the repository root)")
    parser.add_argument("--quick", action="store_true", help="batch 32 only, fewer rounds")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default); cpu only checks the code path, its figures mean nothing")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible (torch.cuda.is_available() is False); run it on a "
                     "machine with a GPU, or pass --device cpu to check the code path")
    return args


def main(args: argparse.Namespace) -> int:
    section = run(args.quick, {}, device=args.device)
    info = machine_info()
    if args.device == "cuda":
        info["GPU"] = torch.cuda.get_device_name()
        info["CUDA"] = str(torch.version.cuda)
        info["cuDNN"] = str(torch.backends.cudnn.version())
    atomic_write_bytes(args.out, render_markdown([section], info, title="GPU benchmark").encode("utf-8"))
    print(f"[benchmarks.gpu] wrote {args.out}")
    return 0


def cli(argv=None) -> int:
    return run_cli(get_args_parser(), main, argv, check_args)


if __name__ == "__main__":
    sys.exit(cli())
