"""Benchmark 6, part A (accelerator): the WRN-28-4 training step of piggyback against finetuning, a
masked layer written the original code's way, bf16 + channels_last, CUDA graphs and the
affine scheme, side by side at batch 32 and 128 (see :mod:`benchmarks.gpu`).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.harness import Section, fmt, median, median_ratio
from benchmarks.workloads import get_workload, bench_optimizer, prepare, prepare_scheme, scheme_optimizers
from common.amp import autocast, maybe_channels_last

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


def sync(device: torch.device) -> None:
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
        opts = {"main": bench_optimizer("adam", params, fused=fused)}
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
        sync(device)
        log(f"  batch {batch}: {name} ready in {time.perf_counter() - t0:.1f}s")
    times = {n: [] for n in fns}
    for r in range(rounds):
        for name in list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]:
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fns[name]()
            sync(device)
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
