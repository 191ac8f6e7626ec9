"""Benchmark 6 (accelerator): what mask training costs on a GPU, measured the way users run it.

``python -m benchmarks.gpu [--out BENCHMARKS-gpu.md]`` on a machine with a CUDA device.

Part A, the training step (WRN-28-4 at 64x64, Adam, BN frozen, data already on the
device), side by side in one run at batch 32 and 128:

- piggyback with this toolkit's masked layers, eager and under ``torch.compile``;
- finetuning the same network, eager and compiled;
- piggyback with a masked layer written the original code's way (an autograd binarizer
  that makes a new {0, 1} tensor every forward, then ``weight * mask``);
- bf16 autocast + channels_last against fp32;
- CUDA graphs (``torch.compile(mode="reduce-overhead")``) at batch 32, in fp32 NCHW,
  fp32 channels_last and bf16 + channels_last, and with fused Adam;
- the ``affine`` mask scheme against binary masks, eager, compiled and under CUDA graphs
  ("affine ..." and "binary ..."): both prepared and optimised as the training commands
  do (``common.methods``: masks, head and the scheme's values each with their own
  optimiser, the values at their per-layer rates), with the step-time ratio affine /
  binary of each mode and the goal "affine compiled / binary compiled <= 1.05".

Each batch size starts from an empty compile cache, as a training run does.

Part B, end to end (``--end-to-end DIR``, written by ``decathlon.synthetic`` when missing):
``decathlon.train`` itself, one process per run (``--e2e-runs
BATCH:COMPILE:LOADER[:METHOD[:PRECISION]]``): eager, compiled and CUDA graphs; images kept on
the device (``resident``), gathered on the host (``device``) or the worker loader; piggyback
against finetuning; fp32 NCHW against fp32 channels_last (``cl``) and bf16 autocast with
channels_last (``bf16cl``). Images per second and
milliseconds per step are read from each run's own log, with the projected wall time of the
nine-task, 60-epoch recipe and the issue's goals. The report is rewritten after every run,
so a session cut short keeps what it measured. ``--no-steps`` skips part A.

Part C (``--eval``): evaluation of a plain WRN-28-4 eager against compiled and CUDA graphs,
with the compilation's cost and the number of images after which compiling pays back (the
reason the evaluation entry points default to ``--compile auto`` = off).

Part D, the classification and segmentation training commands end to end
(``--training-e2e DIR``): ``classification.train`` (ResNet-50 at 224 px on a synthetic
ImageFolder tree of 256x256 JPEGs) and ``segmentation.train`` (FCN-32s on VGG-16 on a
synthetic SBD tree), with random weight files, one process per run (``--training-runs
PIPELINE:METHOD[:SCHEME]``; default: classification and segmentation with binary masks
and with affine, then classification finetuned). The trees and weight files are written
under DIR when missing. Images per second and milliseconds per step are read from each
run's own log, with the time ratios affine / binary and piggyback / finetune of each
pipeline; the report is rewritten after every run. ``--cls-*`` and ``--seg-*`` set the
networks, sizes, epochs and image counts (the tests run it on the CPU with tiny ones).

``benchmarks.run`` calls :func:`run`, which reports "not measured" without a device.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.harness import Section, fmt, machine_info, markdown_path, median, median_ratio, render_markdown
from benchmarks.workloads import get_workload, make_optimizer, prepare, prepare_scheme, scheme_optimizers
from common.amp import autocast, maybe_channels_last
from common.config import read_run_config
from common.errors import UsageError
from common.cli import Parser, positive_int, run_cli
from common.runlog import RunDir, atomic_write_bytes

# train / val images of the nine mask tasks (the challenge's published split sizes)
SPLITS = {"aircraft": (3334, 3333), "cifar100": (40000, 10000), "daimlerpedcls": (23520, 5880),
          "dtd": (1880, 1880), "gtsrb": (31367, 7842), "omniglot": (17853, 6492),
          "svhn": (47217, 26040), "ucf101": (7585, 1952), "vgg-flowers": (1020, 1020)}
EPOCHS = 60


class _NewTensorBinarizer(torch.autograd.Function):
    """The original code's binarizer: a fresh {0, 1} tensor every forward, gradient passed through."""

    @staticmethod
    def forward(ctx, mask_real, threshold):
        out = mask_real.clone()
        out[mask_real <= threshold] = 0
        out[mask_real > threshold] = 1
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _OriginalStyleConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight * _NewTensorBinarizer.apply(self.mask_real, 5e-3), self.bias)


def original_style(plain: nn.Module, skip=("fc",)) -> nn.Module:
    """The network with every conv masked the original code's way (for comparison only)."""
    for name, m in plain.named_modules():
        for p in m.parameters(recurse=False):
            p.requires_grad_(name.startswith(skip))
        if type(m) is nn.Conv2d:
            m.__class__ = _OriginalStyleConv2d
            m.mask_real = nn.Parameter(torch.full_like(m.weight, 1e-2))
        elif isinstance(m, nn.BatchNorm2d):
            m.eval()
    return plain


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Built(NamedTuple):
    step: Callable[[], None]  # one training step
    model: nn.Module
    optimizers: Dict[str, torch.optim.Optimizer]


def build_contender(plain, method: str, device, batch: int, *, compiled: Optional[str], amp: bool,
                    channels_last: bool, fused: bool = False, scheme: Optional[str] = None) -> Built:
    """One contender's training step on a copy of ``plain``. With ``scheme``, piggyback with
    that mask scheme prepared and optimised as the training commands do
    (``common.methods``: ``Method.prepare`` and ``build_optimizers``: masks, head and the
    scheme's values each with their own optimiser, fused where on a CUDA device, the
    values as one flat tensor at their per-layer rates: ``flat_group``); without, the method's parameters
    under one Adam (foreach, or fused with ``fused``)."""
    import copy
    workload = get_workload("wrn28_4")
    if scheme is not None:
        if method != "piggyback":
            raise ValueError(f"a mask scheme ({scheme}) needs method piggyback, not {method!r}")
        model, prepared = prepare_scheme(plain, workload, scheme)
        model = maybe_channels_last(model.to(device), channels_last)
        opts = scheme_optimizers(prepared, scheme)  # after the move: fused kernels on a CUDA device
    else:
        if method == "original":
            model = original_style(copy.deepcopy(plain)).train()
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            model, params = prepare(plain, method, workload, train_bn=False)
        model = maybe_channels_last(model.to(device), channels_last)
        # fused: a few kernels per Adam step instead of torch's default multi-tensor ("foreach") ops
        opts = {"main": make_optimizer("adam", params, fused=fused)}
    g = torch.Generator().manual_seed(batch)
    x = maybe_channels_last(torch.randn(batch, 3, 64, 64, generator=g).to(device), channels_last)
    y = torch.randint(0, 100, (batch,), generator=g).to(device)
    fwd = torch.compile(model, mode=compiled) if compiled else model
    optimizers = list(opts.values())

    def step():
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = fwd(x)
        F.cross_entropy(logits.float(), y).backward()
        for opt in optimizers:
            opt.step()
    return Built(step, model, opts)


class Contender(NamedTuple):
    method: str
    mode: Optional[str]  # torch.compile mode, None = eager
    amp: bool
    channels_last: bool
    fused: bool = False  # fused Adam instead of torch's default (foreach)
    scheme: Optional[str] = None  # a mask scheme, prepared and optimised as the training commands do


CONTENDERS = {
    "piggyback eager": Contender("piggyback", None, False, False),
    "piggyback compiled": Contender("piggyback", "default", False, False),
    "finetune eager": Contender("finetune", None, False, False),
    "finetune compiled": Contender("finetune", "default", False, False),
    "original-style layer eager": Contender("original", None, False, False),
    "piggyback eager bf16+CL": Contender("piggyback", None, True, True),
    "piggyback compiled bf16+CL": Contender("piggyback", "default", True, True),
    "piggyback CUDA graphs": Contender("piggyback", "reduce-overhead", False, False),
    "piggyback CUDA graphs CL": Contender("piggyback", "reduce-overhead", False, True),
    "piggyback CUDA graphs bf16+CL": Contender("piggyback", "reduce-overhead", True, True),
    "piggyback CUDA graphs fused Adam": Contender("piggyback", "reduce-overhead", False, False, True),
    "piggyback CUDA graphs bf16+CL fused Adam": Contender("piggyback", "reduce-overhead", True, True, True),
    "finetune CUDA graphs": Contender("finetune", "reduce-overhead", False, False),
    "finetune CUDA graphs CL": Contender("finetune", "reduce-overhead", False, True),
    "finetune CUDA graphs bf16+CL": Contender("finetune", "reduce-overhead", True, True),
    # mask schemes, with the training commands' optimisers; fp32 NCHW like "piggyback ..."
    "binary eager": Contender("piggyback", None, False, False, scheme="binary"),
    "binary compiled": Contender("piggyback", "default", False, False, scheme="binary"),
    "binary CUDA graphs": Contender("piggyback", "reduce-overhead", False, False, scheme="binary"),
    "affine eager": Contender("piggyback", None, False, False, scheme="affine"),
    "affine compiled": Contender("piggyback", "default", False, False, scheme="affine"),
    "affine CUDA graphs": Contender("piggyback", "reduce-overhead", False, False, scheme="affine"),
}
# (scheme contender, binary contender it is held against, goal of the step-time ratio or None)
SCHEME_PAIRS = (("affine eager", "binary eager", None), ("affine compiled", "binary compiled", 1.05),
                ("affine CUDA graphs", "binary CUDA graphs", None))


def contender(plain, name: str, device, batch: int) -> Built:
    """The contender ``name`` of :data:`CONTENDERS` on a copy of ``plain``."""
    if name not in CONTENDERS:
        raise ValueError(f"unknown contender {name!r}; valid: {', '.join(CONTENDERS)}")
    c = CONTENDERS[name]
    return build_contender(plain, c.method, device, batch, compiled=c.mode, amp=c.amp,
                           channels_last=c.channels_last, fused=c.fused, scheme=c.scheme)


def measure_steps(device: torch.device, batch: int, names, steps: int, rounds: int, log=print) -> Dict[str, List[float]]:
    """Seconds per step of each contender, ``rounds`` interleaved rounds of ``steps`` steps.

    Each call starts from an empty compile cache, so each batch size is compiled for its
    own shape, as a training run compiles it (not for dynamic shapes after seeing another
    size), and every compiled contender keeps its graphs (torch runs a function eagerly past
    its recompile limit, 8 graphs by default)."""
    torch.compiler.reset()
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 4 * len(names)))
    workload = get_workload("wrn28_4")
    torch.manual_seed(0)
    plain = workload.build()
    fns: Dict[str, Callable] = {}
    for name in names:
        t0 = time.perf_counter()
        fns[name] = contender(plain, name, device, batch).step
        for _ in range(3):  # compile, autotune, allocator warm-up
            fns[name]()
        _sync(device)
        log(f"  batch {batch}: {name} ready in {time.perf_counter() - t0:.1f}s")
    times = {n: [] for n in fns}
    for r in range(rounds):
        for name in list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def scheme_ratios(section: Section, batch: int, times: Dict[str, List[float]], requested) -> List[List[str]]:
    """Rows of the schemes-against-binary table at ``batch`` from the seconds per step of
    each round (``times``), and a check for each pair of :data:`SCHEME_PAIRS` with a goal;
    a requested pair with a goal that was not timed (compiled contenders on the CPU) gets
    its check as not measured."""
    rows = []
    for scheme, binary, goal in SCHEME_PAIRS:
        mode = scheme.split(" ", 1)[1]
        name = f"{scheme} / {binary} step time, batch {batch}"
        if scheme in times and binary in times:
            ratio = median_ratio(times[scheme], times[binary])
            rows.append([str(batch), mode, fmt(batch / median(times[scheme])), fmt(batch / median(times[binary])),
                         f"{ratio:.3f}"])
            if goal is not None:
                section.check(name, f"{ratio:.3f}", f"<= {goal}", ratio <= goal)
        elif goal is not None and scheme in requested and binary in requested:
            section.check(name, "not measured (compiled contenders run on a CUDA device only)", f"<= {goal}", None)
    return rows


def run(quick: bool, context: dict, device: str = "cuda", batches=(32, 128), names=None) -> Section:
    start = time.perf_counter()
    section = Section("6. GPU", "WRN-28-4 at 64x64, Adam, BN frozen, random weights and data on the device "
                      "(no loader in the loop). Images/s are medians over interleaved rounds. \"piggyback ...\" "
                      "and \"finetune ...\" train under one Adam; \"binary ...\" and \"affine ...\" (mask "
                      "schemes) with the optimisers the training commands build: Adam for the masks and for "
                      "the head, the scheme's own optimiser and per-layer rates for its values, fused on a "
                      "CUDA device.")
    if device == "cuda" and not torch.cuda.is_available():
        section.notes.append("**Not measured here**: this machine has no CUDA device. Run "
                             "`python -m benchmarks.gpu` on a machine with one; it writes "
                             "BENCHMARKS-gpu.md with the device name and these figures.")
        section.check("piggyback / finetune step time on a GPU", "not measured (no GPU)", "<= 1", None)
        return section
    dev = torch.device(device)
    name = "CPU (code-path check only)"
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, cuDNN autotuning, TF32 on"
    section.intro += f" Device: **{name}**."
    names = requested = list(names or CONTENDERS)
    if dev.type != "cuda":
        names = [n for n in names if "CUDA graphs" not in n and "compiled" not in n]
    rows, rates, scheme_rows = [], {}, []
    for batch in batches:
        # CUDA graphs pay where launches dominate (small batches); compiled bf16 is timed at the large batch
        use = [n for n in names if ("CUDA graphs" not in n or batch <= 64) and ("compiled bf16" not in n or batch >= 128)]
        t = measure_steps(dev, batch, use, steps=3 if quick or dev.type == "cpu" else 20, rounds=2 if quick else 5)
        for n in use:
            rates[(batch, n)] = batch / median(t[n])
            rows.append([str(batch), n, fmt(rates[(batch, n)])])
            print(f"  batch {batch}: {n}: {rates[(batch, n)]:.0f} images/s "
                  f"(rounds {', '.join(f'{batch / x:.0f}' for x in t[n])})", flush=True)
        for pg, ft in (("piggyback eager", "finetune eager"), ("piggyback compiled", "finetune compiled"),
                       ("piggyback CUDA graphs", "finetune CUDA graphs"),
                       ("piggyback CUDA graphs CL", "finetune CUDA graphs CL"),
                       ("piggyback CUDA graphs bf16+CL", "finetune CUDA graphs bf16+CL")):
            if (batch, pg) in rates and (batch, ft) in rates:
                ratio = rates[(batch, ft)] / rates[(batch, pg)]
                section.check(f"{pg} / {ft} step time, batch {batch}", f"{ratio:.3f}", "<= 1", ratio <= 1.0)
        scheme_rows += scheme_ratios(section, batch, t, requested)
    section.table("Training-step throughput", ["batch", "contender", "images/s"], rows)
    if scheme_rows:
        section.table("Mask schemes against binary masks (both with the training commands' optimisers; step-time "
                      "ratio = the median of the per-round ratios):",
                      ["batch", "mode", "scheme images/s", "binary images/s", "step time scheme / binary"],
                      scheme_rows)
    train = sum(s[0] for s in SPLITS.values())
    proj = [[str(b), n, f"{train * EPOCHS / r / 60:.1f}"] for (b, n), r in sorted(rates.items())
            if CONTENDERS[n].method == "piggyback"]
    section.table(f"Projected wall time of the nine-task recipe ({EPOCHS} epochs, {train:,} training images per "
                  f"epoch) at the step rate alone:", ["batch", "contender", "minutes"], proj)
    context["gpu_rates"] = {f"{b}|{n}": r for (b, n), r in rates.items()}
    section.seconds = time.perf_counter() - start
    return section


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
TRAINING_PIPELINES = {"classification": "classification.train", "segmentation": "segmentation.train"}
TRAINING_METHODS = ("piggyback", "finetune")
# the affine pairs first: a call cut short keeps them
TRAINING_RUNS = ("classification:piggyback", "classification:piggyback:affine", "segmentation:piggyback",
                 "segmentation:piggyback:affine", "classification:finetune")
CLASSES = 10  # of the synthetic ImageFolder tree


class TrainingRun(NamedTuple):
    label: str
    pipeline: str
    method: str
    scheme: Optional[str]  # None for finetuning
    flags: List[str]  # the command's method flags


class TrainingSetup(NamedTuple):
    """What part D trains: the networks, input sizes, epochs and synthetic image counts."""

    cls_arch: str = "resnet50"
    cls_size: int = 224
    cls_epochs: int = 3
    cls_images: int = 3200
    seg_arch: str = "vgg16"
    seg_epochs: int = 2
    seg_images: int = 100
    seg_sides: Tuple[int, int] = (320, 500)


def parse_training_run(spec: str) -> TrainingRun:
    """``PIPELINE:METHOD[:SCHEME]`` -> the run; SCHEME (piggyback only) defaults to binary."""
    from common.schemes import scheme_names
    parts = spec.split(":")
    ok = len(parts) in (2, 3) and parts[0] in TRAINING_PIPELINES and parts[1] in TRAINING_METHODS and (
        len(parts) == 2 or (parts[1] == "piggyback" and parts[2] in scheme_names()))
    if not ok:
        raise argparse.ArgumentTypeError(
            f"training run {spec!r}: expected PIPELINE:METHOD[:SCHEME], e.g. classification:piggyback:affine or "
            f"segmentation:finetune (PIPELINE {'|'.join(TRAINING_PIPELINES)}, METHOD {'|'.join(TRAINING_METHODS)}, "
            f"SCHEME {'|'.join(scheme_names())}, with piggyback only)")
    pipeline, method = parts[:2]
    scheme = (parts[2] if len(parts) == 3 else "binary") if method == "piggyback" else None
    label = f"{pipeline}, {method}" + (f" {scheme}" if scheme else "")
    return TrainingRun(label, pipeline, method, scheme, ["--method", method] + (["--scheme", scheme] if scheme else []))


def _write_once(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(folder)`` into a scratch folder beside ``path``, then renamed to ``path``: a
    write cut short leaves no tree that a later call would take as complete."""
    scratch = path.with_name(f".{path.name}.partial")
    if scratch.exists():
        shutil.rmtree(scratch)
    write(scratch)
    scratch.rename(path)
    return path


def classification_tree(root: Path, setup: TrainingSetup, log=print) -> Path:
    """Part D's ImageFolder tree under ``root``, written when missing: :data:`CLASSES`
    classes, ``cls_images`` training images and a tenth as many test images, JPEGs of side
    ``round(cls_size * 256 / 224)`` (classification.train's evaluation resize)."""
    side = round(setup.cls_size * 256 / 224)
    per_class = max(1, setup.cls_images // CLASSES)
    tree = root / f"imagefolder-{per_class * CLASSES}-{side}px"
    if not tree.is_dir():
        from classification.synthetic import write_synthetic_image_folder
        t0 = time.perf_counter()
        _write_once(tree, lambda folder: write_synthetic_image_folder(
            folder, classes=CLASSES, train_per_class=per_class, test_per_class=max(1, per_class // 10), side=side))
        log(f"wrote a synthetic ImageFolder tree at {tree} in {time.perf_counter() - t0:.0f}s")
    return tree


def segmentation_tree(root: Path, setup: TrainingSetup, log=print) -> Tuple[Path, Path]:
    """Part D's SBD + VOC tree under ``root``, written when missing: ``seg_images`` SBD
    training images with sides in ``seg_sides``, a tenth as many (at least 2) evaluation
    images. Returns (the tree, its seg11valid list)."""
    lo, hi = setup.seg_sides
    tree = root / f"pascal-{setup.seg_images}-{lo}-{hi}px"
    if not tree.is_dir():
        from segmentation.synthetic import write_synthetic_pascal
        t0 = time.perf_counter()
        _write_once(tree, lambda folder: write_synthetic_pascal(
            folder, n_sbd_train=setup.seg_images, n_sbd_val=2, n_voc_train=2,
            n_voc_val=max(2, setup.seg_images // 10), n_overlap=0, size=(lo, hi)))
        log(f"wrote a synthetic SBD + VOC tree at {tree} in {time.perf_counter() - t0:.0f}s")
    return tree, tree / "seg11valid.txt"


def random_weights(root: Path, pipeline: str, arch: str) -> Path:
    """A randomly initialised ``arch`` state dict (torchvision's layout) as ``root``/
    ``{pipeline}-{arch}-random.pth``, written when missing."""
    path = root / f"{pipeline}-{arch}-random.pth"
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                if pipeline == "classification":
                    from classification.models import build_model
                    state = build_model(arch).state_dict()
                else:
                    from segmentation.model import build_vgg
                    state = build_vgg(arch).state_dict()
            except (ValueError, KeyError, RuntimeError, UsageError) as exc:
                flag = "--cls-arch" if pipeline == "classification" else "--seg-arch"
                raise UsageError(f"{flag} {arch}: cannot build it ({exc})") from None
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    return path


def training_commands(root: Path, out: Path, runs: Sequence[TrainingRun], setup: TrainingSetup,
                      extra: Sequence[str] = (), log=print) -> List[Tuple[TrainingRun, Path, List[str]]]:
    """(run, run folder, command line) of each run: the trees and weight files under
    ``root`` (written when missing), the run folders under ``out``, ``extra`` flags last."""
    commands = []
    for run in runs:
        run_dir = out / run.label.replace(" ", "_").replace(",", "")
        if run.pipeline == "classification":
            tree = classification_tree(root, setup, log)
            args = ["--data-root", str(tree), "--arch", setup.cls_arch,
                    "--weights", str(random_weights(root, "classification", setup.cls_arch)),
                    "--size", str(setup.cls_size), "--epochs", str(setup.cls_epochs)]
        else:
            tree, val_list = segmentation_tree(root, setup, log)
            args = ["--data-root", str(tree), "--split", "sbd", "--val-list", str(val_list), "--arch", setup.seg_arch,
                    "--backbone", str(random_weights(root, "segmentation", setup.seg_arch)),
                    "--epochs", str(setup.seg_epochs)]
        cmd = [sys.executable, "-m", TRAINING_PIPELINES[run.pipeline], *args, "--out", str(run_dir),
               "--print-freq", "1000", *run.flags, *extra]
        commands.append((run, run_dir, cmd))
    return commands


def read_training_run(run_dir: Path) -> Dict[str, object]:
    """Rates of a finished run from its own log.jsonl and config.json: images/s per epoch
    (images trained / epoch time), the median after the first epoch (which compiles; the
    only epoch of a one-epoch run), ms per step and the share of the epoch outside steps."""
    records = RunDir(run_dir).read_log()
    if not records:
        raise ValueError(f"{run_dir / 'log.jsonl'} holds no epoch")
    batch = int(read_run_config(run_dir)["batch_size"])
    per_epoch = [r["steps"] * batch / r["epoch_time_s"] for r in records]
    steady = records[1:] or records
    step_s = median([r["step_time_s"] for r in steady])
    return {"rate": median(per_epoch[1:] or per_epoch), "per_epoch": per_epoch, "step_ms": 1000 * step_s,
            "step_rate": batch / step_s,
            "outside": median([1 - r["step_time_s"] * r["steps"] / r["epoch_time_s"] for r in steady])}


def training_ratios(results: Dict[str, Dict[str, object]], runs: Sequence[TrainingRun]) -> List[List[str]]:
    """Rows (pipeline, pair, epoch-time ratio, step-time ratio) for every scheme other than
    binary against binary piggyback, and binary piggyback against finetuning, where both
    runs of a pair finished in the same pipeline."""
    rows = []
    for pipeline in TRAINING_PIPELINES:
        mine = {(r.method, r.scheme): results[r.label] for r in runs if r.pipeline == pipeline and r.label in results}
        binary = mine.get(("piggyback", "binary"))
        pairs = [(f"{scheme} / binary", mine[("piggyback", scheme)], binary)
                 for (method, scheme) in mine if method == "piggyback" and scheme != "binary"]
        pairs.append(("piggyback / finetune", binary, mine.get(("finetune", None))))
        for name, a, b in pairs:
            if a is not None and b is not None:
                rows.append([pipeline, name, f"{b['rate'] / a['rate']:.3f}", f"{a['step_ms'] / b['step_ms']:.3f}"])
    return rows


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def training_end_to_end(root: Path, out: Path, runs: Sequence[TrainingRun], setup: TrainingSetup = TrainingSetup(),
                        extra: Sequence[str] = (), log=print,
                        report: Optional[Callable[[Section], None]] = None) -> Section:
    """``classification.train`` and ``segmentation.train`` as users run them, one process
    per run, on synthetic trees and random weights under ``root`` (written when missing),
    the run folders under ``out`` (a folder left there by an earlier call is replaced).
    ``report(section)`` is called after every run, so a cut-off session keeps what it measured."""
    lo, hi = setup.seg_sides
    side = round(setup.cls_size * 256 / 224)
    section = Section(
        "6e. GPU training commands end to end",
        f"`python -m classification.train` ({setup.cls_arch} at {setup.cls_size} px, synthetic ImageFolder tree of "
        f"{CLASSES} classes, {CLASSES * max(1, setup.cls_images // CLASSES):,} training JPEGs of {side}x{side}, "
        f"{_epochs(setup.cls_epochs)}) "
        f"and `python -m segmentation.train` (FCN-32s on {setup.seg_arch}, {setup.seg_images} synthetic SBD training "
        f"images of sides {lo}-{hi} px, {_epochs(setup.seg_epochs)}), random backbone weights, each command's "
        f"defaults otherwise; one process per run. Images/s = images trained per epoch / epoch time (training, "
        f"evaluation, loading and the checkpoint), the median over the epochs after the first (which compiles); "
        f"ms per step and images/s in steps from the training loop alone (loading included).")
    rows, results = [], {}

    def fill():
        section.tables.clear()
        section.table("", ["run", "images/s (median after epoch 1)", "images/s per epoch", "ms per step",
                           "images/s in steps", "outside steps", "command s"], rows)
        ratios = training_ratios(results, runs)
        if ratios:
            section.table("Time ratios (above 1: the first of the pair is slower):",
                          ["pipeline", "pair", "epoch time", "step time"], ratios)

    for run, run_dir, cmd in training_commands(root, out, runs, setup, extra, log):
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a run folder of an earlier call would resume, not train
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = f"{time.perf_counter() - t0:.0f}"
        if proc.returncode != 0:
            tail = (proc.stdout[-2000:] + proc.stderr[-3000:]).strip()
            log(f"  {run.label}: failed (exit {proc.returncode})\n{tail}")
            rows.append([run.label, "failed", "", "", "", "", seconds])
            last = tail.splitlines()[-1] if tail else ""
            section.notes.append(f"**{run.label} failed** (exit {proc.returncode}): `{last[:300]}`")
        else:
            r = results[run.label] = read_training_run(run_dir)
            rows.append([run.label, fmt(r["rate"]), " / ".join(fmt(x) for x in r["per_epoch"]), f"{r['step_ms']:.2f}",
                         fmt(r["step_rate"]), f"{100 * r['outside']:.0f} %", seconds])
            log(f"  {run.label}: {r['rate']:.1f} images/s (epochs: {', '.join(f'{x:.1f}' for x in r['per_epoch'])})")
        fill()
        if report is not None:
            report(section)
    return section


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
            _sync(device)
            t0 = time.perf_counter()
            fwd(x).sum().item()
            first = time.perf_counter() - t0
            times = []
            for _ in range(batches):
                _sync(device)
                t0 = time.perf_counter()
                fwd(x).argmax(1)
                _sync(device)
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


def get_args_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m benchmarks.gpu",
                    description="GPU benchmark of mask training (benchmark 6): the WRN-28-4 training step, "
                                "decathlon.train, classification.train and segmentation.train.")
    parser.add_argument("--out", type=markdown_path, default=Path(__file__).resolve().parent.parent / "BENCHMARKS-gpu.md",
                        help="Markdown report to write (default: BENCHMARKS-gpu.md at the repository root)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128], help="batch sizes (default: 32 128)")
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), default=None, metavar="NAME",
                        help=f"contenders to time (default: all: {', '.join(CONTENDERS)})")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default); cpu only checks the code path, its figures mean nothing")
    parser.add_argument("--no-steps", action="store_true", help="skip the training-step part (A)")
    parser.add_argument("--eval", action="store_true",
                        help="also time evaluation eager against compiled, compilation included (part C)")
    parser.add_argument("--eval-batch", type=positive_int, default=256,
                        help="batch of part C (default: 256, decathlon.submit's)")
    parser.add_argument("--end-to-end", default=None, metavar="DIR",
                        help="also run decathlon.train on this decathlon tree (part B)")
    parser.add_argument("--task", default="svhn", help="task of the end-to-end runs (default: svhn)")
    parser.add_argument("--e2e-epochs", type=int, default=5, help="epochs of each end-to-end run (default: 5)")
    parser.add_argument("--e2e-runs", type=parse_run, nargs="+", default=[parse_run(r) for r in E2E_RUNS],
                        metavar="BATCH:COMPILE:LOADER[:METHOD[:PRECISION]]",
                        help=f"end-to-end runs, in order (default: {' '.join(E2E_RUNS)})")
    parser.add_argument("--e2e-images", type=int, default=20000,
                        help="when the --end-to-end folder does not exist, write a synthetic decathlon tree there "
                             "with this many training images of --task (default: 20000)")
    parser.add_argument("--backbone", default=None, metavar="FILE",
                        help="backbone of the end-to-end runs (default: a randomly initialised WRN-28-4, "
                             "written next to the runs)")
    d = TrainingSetup()
    parser.add_argument("--training-e2e", default=None, metavar="DIR",
                        help="also run classification.train and segmentation.train end to end (part D) on the "
                             "synthetic trees and random weight files under DIR, written there when missing "
                             "(default: off)")
    parser.add_argument("--training-runs", type=parse_training_run, nargs="+",
                        default=[parse_training_run(r) for r in TRAINING_RUNS], metavar="PIPELINE:METHOD[:SCHEME]",
                        help=f"part D's runs, in order; PIPELINE {'|'.join(TRAINING_PIPELINES)}, METHOD "
                             f"{'|'.join(TRAINING_METHODS)}, SCHEME (piggyback only) a mask scheme, binary when "
                             f"left out (default: {' '.join(TRAINING_RUNS)})")
    parser.add_argument("--cls-arch", default=d.cls_arch, metavar="NAME",
                        help=f"network of part D's classification runs (default: {d.cls_arch})")
    parser.add_argument("--cls-size", type=positive_int, default=d.cls_size, metavar="PX",
                        help=f"input size in px of part D's classification runs; the tree's images have side "
                             f"round(size * 256 / 224) (default: {d.cls_size})")
    parser.add_argument("--cls-epochs", type=positive_int, default=d.cls_epochs, metavar="N",
                        help=f"epochs of each classification run of part D (default: {d.cls_epochs})")
    parser.add_argument("--cls-images", type=positive_int, default=d.cls_images, metavar="N",
                        help=f"training images of part D's ImageFolder tree, in {CLASSES} classes, with a tenth as "
                             f"many test images (default: {d.cls_images})")
    parser.add_argument("--seg-arch", default=d.seg_arch, metavar="NAME",
                        help=f"VGG backbone of part D's segmentation runs (default: {d.seg_arch})")
    parser.add_argument("--seg-epochs", type=positive_int, default=d.seg_epochs, metavar="N",
                        help=f"epochs of each segmentation run of part D (default: {d.seg_epochs})")
    parser.add_argument("--seg-images", type=positive_int, default=d.seg_images, metavar="N",
                        help=f"SBD training images of part D's synthetic tree, with a tenth as many (at least 2) "
                             f"evaluation images (default: {d.seg_images})")
    parser.add_argument("--seg-sides", type=positive_int, nargs=2, default=list(d.seg_sides), metavar=("LO", "HI"),
                        help=f"image sides in px of part D's segmentation tree, drawn from LO to HI "
                             f"(default: {d.seg_sides[0]} {d.seg_sides[1]})")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible (torch.cuda.is_available() is False); run it on a "
                     "machine with a GPU, or pass --device cpu to check the code path")
    if args.backbone is not None and not Path(args.backbone).is_file():
        parser.error(f"--backbone {args.backbone}: no such file (expected a backbone file from "
                     f"python -m decathlon.pretrain; leave it out for a random WRN-28-4)")
    if args.seg_sides[0] > args.seg_sides[1]:
        parser.error(f"--seg-sides {args.seg_sides[0]} {args.seg_sides[1]}: LO must not exceed HI")
    if args.training_e2e is not None and Path(args.training_e2e).exists() and not Path(args.training_e2e).is_dir():
        parser.error(f"--training-e2e {args.training_e2e}: exists and is not a folder")
    return args


def main(args: argparse.Namespace) -> int:
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    info = machine_info()
    if args.device == "cuda":
        info["GPU"] = torch.cuda.get_device_name()
        info["CUDA"] = str(torch.version.cuda)
        info["cuDNN"] = str(torch.backends.cudnn.version())

    def write(sections):
        atomic_write_bytes(args.out, render_markdown(sections, info, title="GPU benchmark").encode("utf-8"))

    sections = [] if args.no_steps else [run(args.quick, {}, device=args.device, batches=args.batches, names=args.only)]
    if args.eval:
        sections.append(measure_eval(torch.device(args.device), args.eval_batch, log=log))
    if sections:
        write(sections)
    if args.end_to_end:
        root = Path(args.end_to_end)
        if not root.exists():
            from decathlon.synthetic import make_synthetic_decathlon
            from decathlon.tasks import get_task
            classes = min(10, get_task(args.task).num_classes)
            t0 = time.perf_counter()
            make_synthetic_decathlon(root, tasks=(args.task,), num_classes={args.task: classes},
                                     train_per_class=max(1, args.e2e_images // classes),
                                     val_per_class=max(1, args.e2e_images // classes // 10), test_per_class=1)
            log(f"wrote a synthetic {args.task} tree at {root} in {time.perf_counter() - t0:.0f}s")
        out = Path(os.environ.get("TMPDIR", "/tmp")) / "piggyback-e2e"
        backbone = args.backbone
        if backbone is None:
            from decathlon.models import create_model, save_backbone
            backbone = out / "backbone-wrn28_4-random.pt"
            torch.manual_seed(0)
            save_backbone(backbone, create_model("wrn28_4", 1000), "wrn28_4", note="random weights (benchmark)")
        extra = ["--cache-dir", str(out / "cache"), "--backbone", str(backbone)]
        if args.device == "cpu":
            extra += ["--device", "cpu"]
        sections.append(end_to_end(root, args.task, out, args.e2e_runs, args.e2e_epochs, extra, log=log,
                                   report=lambda s: write([*sections, s])))
    if args.training_e2e:
        setup = TrainingSetup(args.cls_arch, args.cls_size, args.cls_epochs, args.cls_images, args.seg_arch,
                              args.seg_epochs, args.seg_images, tuple(args.seg_sides))
        extra = ["--device", "cpu", "--workers", "0"] if args.device == "cpu" else []
        out = Path(os.environ.get("TMPDIR", "/tmp")) / "piggyback-training-e2e"
        sections.append(training_end_to_end(Path(args.training_e2e), out, args.training_runs, setup, extra, log=log,
                                            report=lambda s: write([*sections, s])))
    write(sections)
    print(f"[benchmarks.gpu] wrote {args.out}")
    return 0


def cli(argv=None) -> int:
    return run_cli(get_args_parser(), main, argv, check_args)


if __name__ == "__main__":
    sys.exit(cli())
