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
  fp32 channels_last and bf16 + channels_last, and with fused Adam.

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

``benchmarks.run`` calls :func:`run`, which reports "not measured" without a device.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.harness import Section, fmt, machine_info, markdown_path, median, render_markdown
from benchmarks.workloads import get_workload, make_optimizer, prepare
from common.amp import autocast, maybe_channels_last
from common.config import read_run_config
from common.cli import Parser, positive_int, run_cli
from common.runlog import atomic_write_bytes

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


def _contender(plain, method: str, device, batch: int, *, compiled: Optional[str], amp: bool, channels_last: bool,
               fused: bool = False):
    import copy
    workload = get_workload("wrn28_4")
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
    opt = make_optimizer("adam", params, fused=fused)
    g = torch.Generator().manual_seed(batch)
    x = maybe_channels_last(torch.randn(batch, 3, 64, 64, generator=g).to(device), channels_last)
    y = torch.randint(0, 100, (batch,), generator=g).to(device)
    fwd = torch.compile(model, mode=compiled) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = fwd(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
    return step


class Contender(NamedTuple):
    method: str
    mode: Optional[str]  # torch.compile mode, None = eager
    amp: bool
    channels_last: bool
    fused: bool = False  # fused Adam instead of torch's default (foreach)


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
}


def measure_steps(device: torch.device, batch: int, names, steps: int, rounds: int, log=print) -> Dict[str, List[float]]:
    """Seconds per step of each contender, ``rounds`` interleaved rounds of ``steps`` steps."""
    workload = get_workload("wrn28_4")
    torch.manual_seed(0)
    plain = workload.build()
    fns: Dict[str, Callable] = {}
    for name in names:
        c = CONTENDERS[name]
        t0 = time.perf_counter()
        fns[name] = _contender(plain, c.method, device, batch, compiled=c.mode, amp=c.amp,
                               channels_last=c.channels_last, fused=c.fused)
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


def run(quick: bool, context: dict, device: str = "cuda", batches=(32, 128), names=None) -> Section:
    start = time.perf_counter()
    section = Section("6. GPU", "WRN-28-4 at 64x64, Adam, BN frozen, random weights and data on the device "
                      "(no loader in the loop). Images/s are medians over interleaved rounds.")
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
    names = list(names or CONTENDERS)
    if dev.type != "cuda":
        names = [n for n in names if "CUDA graphs" not in n and "compiled" not in n]
    rows, rates = [], {}
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
    section.table("Training-step throughput", ["batch", "contender", "images/s"], rows)
    train = sum(s[0] for s in SPLITS.values())
    proj = [[str(b), n, f"{train * EPOCHS / r / 60:.1f}"] for (b, n), r in sorted(rates.items())
            if n.startswith("piggyback")]
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
            records = [json.loads(line) for line in (run_dir / task / "log.jsonl").read_text().splitlines() if line]
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
                                     description="GPU benchmark of WRN-28-4 mask training (benchmark 6).")
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
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible (torch.cuda.is_available() is False); run it on a "
                     "machine with a GPU, or pass --device cpu to check the code path")
    if args.backbone is not None and not Path(args.backbone).is_file():
        parser.error(f"--backbone {args.backbone}: no such file (expected a backbone file from "
                     f"python -m decathlon.pretrain; leave it out for a random WRN-28-4)")
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
    write(sections)
    print(f"[benchmarks.gpu] wrote {args.out}")
    return 0


def cli(argv=None) -> int:
    return run_cli(get_args_parser(), main, argv, check_args)


if __name__ == "__main__":
    sys.exit(cli())
