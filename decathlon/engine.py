"""Decathlon training on the common engine: what ``decathlon.train`` and
``decathlon.pretrain`` share.

The loop, resume, checkpoints and the classification step live in :mod:`common.engine`
and :mod:`common.classify`; this module only binds them to the decathlon's loaders
(``set_loader_epoch``), learning-rate steps and runtime switches. ``Precision``,
``evaluate`` and ``predict`` stay importable from here.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Sequence

import torch
import torch.nn as nn

from common.amp import Precision, resolve_switch
from common.classify import ClassificationPipeline, evaluate_classifier, predict
from common.distributed import DistInfo
from common.methods import make_schedulers
from common.engine import FitResult, FitState, compile_model, fit
from common.runlog import RunDir
from decathlon.data import set_loader_epoch

__all__ = ["Precision", "evaluate", "predict", "make_precision", "use_compile", "make_schedulers",
           "train_classifier", "FitState", "fit"]


def evaluate(model: nn.Module, loader, *, prec: Precision) -> Dict[str, float]:
    """Top-1 (%), mean loss and count over the whole (possibly sharded) loader."""
    return evaluate_classifier(model, loader, prec)


def make_precision(cfg, dist: DistInfo) -> Precision:
    """fp32 (TF32 matrix units) by default; channels_last where the network is compiled on
    a CUDA device; bf16 autocast only when asked (``--amp on``). On an H100 under CUDA
    graphs, channels_last ran ``decathlon.train`` at 1.06x the images/s of NCHW at batch 32;
    bf16 autocast on top gave 1.15x more at batch 32 and 1.63x at batch 128, but piggyback
    masks trained under it lost 0.9 top-1 points on MNIST (mean of 3 seeds, MobileNetV2)
    (BENCHMARKS-gpu.md, 6d). In eager mode, bf16 with channels_last was slower (0.92x at
    batch 128)."""
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 64x64 inputs: autotuning pays off
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
    compiled = dist.device.type == "cuda" and bool(use_compile(cfg, dist))
    return Precision(dist.device, resolve_switch(cfg.amp, False), resolve_switch(cfg.channels_last, compiled))


def use_compile(cfg, dist: DistInfo):
    """``--compile``: False, True (default mode) or "reduce-overhead" (CUDA graphs).
    auto = CUDA graphs on a single CUDA device, where they were fastest end to end on an
    H100 at batch 32 and 128 (BENCHMARKS-gpu.md); the default mode across processes (DDP's
    gradient hooks); off on the CPU."""
    if cfg.compile == "cudagraphs" or (cfg.compile == "auto" and dist.device.type == "cuda"
                                       and dist.world_size == 1):
        return "reduce-overhead"
    return resolve_switch(cfg.compile, dist.device.type == "cuda")


def train_classifier(run: RunDir, model: nn.Module, optimizers: Dict[str, torch.optim.Optimizer], cfg, *,
                     dist: DistInfo, prec: Precision, train_loader, val_loader, num_classes: int,
                     config: Dict[str, Any], frozen_modules: Sequence[nn.Module] = (),
                     header: str = "",
                     log: Callable[[str], None] = print) -> FitResult:
    """Train (or resume) ``model`` in ``run`` to ``cfg.epochs`` with the classification
    step; ``model`` is on ``prec.device`` already. ``config`` is the run's record."""
    train_model, eval_model = compile_model(model, dist, config["resolved"]["compile"])
    state = FitState(model, optimizers, make_schedulers(optimizers, cfg), train_model, eval_model,
                     frozen_modules)
    return fit(run, state, ClassificationPipeline(prec, val_loader, num_classes), train_loader,
               epochs=cfg.epochs, config=config, dist=dist, set_epoch=partial(set_loader_epoch, train_loader),
               print_freq=cfg.print_freq, header=header, log=log, may_change=cfg.resume_free())
