"""Training and evaluation loops for decathlon classifiers, and the resumable epoch loop.

``train_one_epoch`` / ``evaluate`` / ``predict`` are plain loops over a loader that work
the same for one process and for DistributedDataParallel (counts are summed across
processes before anything is reported).  ``fit`` runs epochs, writes one JSON line per
epoch and a checkpoint after each; started again on the same run folder it continues
from the last checkpoint, and on the CPU ends bit-identical to an uninterrupted run
(data order and augmentation depend only on seed, epoch and sample index).
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.amp import autocast, maybe_channels_last
from common.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from common.distributed import DistInfo, all_reduce_sum, barrier
from common.metrics import ClassificationMeter
from common.runlog import MetricLogger, RunDir, check_finite
from decathlon.data import set_loader_epoch

__all__ = ["Precision", "train_one_epoch", "evaluate", "predict", "fit", "ResumeMismatch"]


@dataclass(frozen=True)
class Precision:
    """Where and how batches run: device, bf16 autocast, channels_last."""

    device: torch.device
    amp: bool = False
    channels_last: bool = False

    def batch(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None):
        images = maybe_channels_last(images.to(self.device, non_blocking=True), self.channels_last)
        if targets is None:
            return images
        return images, targets.to(self.device, non_blocking=True)


def _train_mode(model: nn.Module, frozen: Sequence[nn.Module]) -> None:
    model.train()
    # Layers a method keeps fixed (e.g. BN of the classifier-only baseline) keep using
    # their running statistics.
    for m in frozen:
        m.eval()


def train_one_epoch(model: nn.Module, loader, optimizers: Sequence[torch.optim.Optimizer], *,
                    prec: Precision, epoch: int, step_offset: int = 0,
                    frozen_modules: Sequence[nn.Module] = (), print_freq: int = 50,
                    is_main: bool = True, header: str = "",
                    log: Callable[[str], None] = print) -> Dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean loss, top-1 (%) and step time,
    reduced over processes.  A non-finite loss raises, naming the global step."""
    _train_mode(model, frozen_modules)
    logger = MetricLogger(is_main=is_main, print_fn=log)
    correct = torch.zeros((), dtype=torch.int64, device=prec.device)
    seen, steps, start = 0, 0, time.perf_counter()
    for images, targets in logger.log_every(loader, print_freq, header):
        images, targets = prec.batch(images, targets)
        with autocast(prec.device, prec.amp):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), targets)
        steps += 1
        # The step's one host synchronisation: the loss value, checked before it is used.
        value = check_finite(loss, step_offset + steps, epoch)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        correct += (logits.detach().argmax(dim=1) == targets).sum()
        seen += targets.shape[0]
        logger.update(n=targets.shape[0], loss=value)
    elapsed = time.perf_counter() - start
    logger.synchronize()
    meter = ClassificationMeter()
    meter.update_counts([int(correct)], seen)
    meter.all_reduce()
    return {"train_loss": logger.meters["loss"].global_avg, "train_top1": meter.top1,
            "steps": steps, "step_time_s": elapsed / max(steps, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, prec: Precision) -> Dict[str, float]:
    """Top-1 (%) and mean loss over the whole (possibly sharded) loader."""
    model.eval()
    # Sums stay on the device until the end: no host synchronisation per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=prec.device)
    correct = torch.zeros((), dtype=torch.int64, device=prec.device)
    seen = 0
    for images, targets in loader:
        images, targets = prec.batch(images, targets)
        with autocast(prec.device, prec.amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").double()
        correct += (logits.argmax(dim=1) == targets).sum()
        seen += targets.shape[0]
    meter = ClassificationMeter()
    meter.update_counts([int(correct)], seen)
    meter.all_reduce()
    loss_sum = all_reduce_sum(loss_sum.cpu())
    n = meter.total
    return {"val_top1": meter.top1, "val_loss": float(loss_sum) / n if n else float("nan"),
            "val_count": n}


@torch.no_grad()
def predict(model: nn.Module, loader, *, prec: Precision) -> torch.Tensor:
    """Predicted class index of every sample of a (single-process) loader, in order."""
    model.eval()
    out = []
    for images, _ in loader:
        with autocast(prec.device, prec.amp):
            out.append(model(prec.batch(images)).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


class ResumeMismatch(ValueError):
    """The run folder's checkpoint was made with other settings."""


@dataclass
class FitState:
    """What ``fit`` trains and checkpoints."""

    model: nn.Module  # unwrapped: its state_dict goes into the checkpoint
    train_model: nn.Module  # what the loop calls (the DDP wrapper when distributed)
    optimizers: List[torch.optim.Optimizer]
    schedulers: List[Any]
    frozen_modules: List[nn.Module] = field(default_factory=list)


def _resume(run: RunDir, st: FitState, settings: Dict[str, Any], log: Callable[[str], None]):
    path = run.file("checkpoint.pt")
    if not path.exists():
        return 0, None
    ckpt = load_checkpoint(path)
    differ = [f"{k}: {ckpt['settings'].get(k)!r} there, {v!r} now" for k, v in settings.items()
              if ckpt["settings"].get(k) != v]
    if differ:
        raise ResumeMismatch(f"{path} was written with other settings ({'; '.join(differ)}); run "
                             f"with the same flags to resume, or choose another --out")
    st.model.load_state_dict(ckpt["model"])
    for opt, s in zip(st.optimizers, ckpt["optimizers"]):
        opt.load_state_dict(s)
    for sch, s in zip(st.schedulers, ckpt["schedulers"]):
        sch.load_state_dict(s)
    set_rng_state(ckpt["rng"])
    start = int(ckpt["epoch"])
    run.trim_log(start + 1)  # log epochs are 1-based; drop any logged after the checkpoint
    log(f"resumed from {path} after epoch {start}")
    return start, ckpt.get("last")


def fit(run: RunDir, st: FitState, train_loader, val_loader, *, epochs: int, prec: Precision,
        dist: DistInfo, settings: Dict[str, Any], config: Dict[str, Any], print_freq: int = 50,
        header: str = "", log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train to ``epochs`` (resuming from ``run``'s checkpoint when one exists) and return
    the last epoch's record.  ``settings`` must equal those of the checkpoint; ``config``
    is written to config.json once that is known (a refused resume leaves it alone).  The model
    is expected on ``prec.device`` already (and in channels_last when that is on)."""
    start, last = _resume(run, st, settings, log)
    run.write_config(config)
    steps_per_epoch = len(train_loader)
    t_run = time.perf_counter()
    for epoch in range(start, epochs):
        set_loader_epoch(train_loader, epoch)
        t0 = time.perf_counter()
        stats = train_one_epoch(st.train_model, train_loader, st.optimizers, prec=prec,
                                epoch=epoch + 1, step_offset=epoch * steps_per_epoch,
                                frozen_modules=st.frozen_modules, print_freq=print_freq,
                                is_main=dist.is_main, header=f"{header}epoch {epoch + 1}/{epochs}",
                                log=log)
        lrs = [g["lr"] for opt in st.optimizers for g in opt.param_groups]
        for sch in st.schedulers:
            sch.step()
        stats.update(evaluate(st.model, val_loader, prec=prec))
        last = {"epoch": epoch + 1, **stats, "lr": lrs, "epoch_time_s": time.perf_counter() - t0}
        run.log_epoch(last)
        if dist.is_main:
            save_checkpoint(run.file("checkpoint.pt"), {
                "model": st.model.state_dict(), "epoch": epoch + 1, "rng": rng_state(),
                "optimizers": [o.state_dict() for o in st.optimizers],
                "schedulers": [s.state_dict() for s in st.schedulers],
                "settings": settings, "last": last})
        barrier()
        per_epoch = (time.perf_counter() - t_run) / (epoch + 1 - start)
        eta = datetime.timedelta(seconds=int(per_epoch * (epochs - epoch - 1)))
        if dist.is_main:
            log(f"{header}epoch {epoch + 1}/{epochs}: train loss {stats['train_loss']:.4f} "
                f"top-1 {stats['train_top1']:.2f}  val loss {stats['val_loss']:.4f} "
                f"top-1 {stats['val_top1']:.2f}  ({last['epoch_time_s']:.1f}s, ETA {eta})")
    if last is None:
        raise RuntimeError("no epoch was run and no checkpoint holds a finished epoch")
    return last
