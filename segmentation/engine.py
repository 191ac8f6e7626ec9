"""One training epoch and one evaluation pass of the FCN, plus what they need.

``train_one_epoch`` steps every optimizer of the mixed scheme (masks with Adam, new
layers with their own optimizer) on a per-pixel cross-entropy that ignores label 255.
``evaluate`` accumulates one confusion matrix over this process's share of the
evaluation set, sums it over processes and computes the FCN metrics from the sum.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.amp import autocast
from common.metrics import ConfusionMatrix
from common.runlog import MetricLogger, check_finite

from .data import IGNORE_INDEX

__all__ = ["segmentation_loss", "train_one_epoch", "evaluate", "predict", "summarize"]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels of the batch (255 ignored).

    A batch whose pixels are all void gives a zero loss that still reaches every
    trainable parameter, instead of the 0/0 of ``reduction='mean'``.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    labelled = (target != IGNORE_INDEX).sum().clamp_min(1)
    return total / labelled


def train_one_epoch(model: nn.Module, loader, optimizers: Mapping[str, torch.optim.Optimizer],
                    device: torch.device, epoch: int, *, amp: bool = False, print_freq: int = 20,
                    is_main: bool = True, header: str = "") -> Dict[str, float]:
    """Train for one pass over ``loader``; returns the loss averaged over all processes.
    A non-finite loss raises, naming the epoch and step."""
    model.train()
    logger = MetricLogger(is_main=is_main)
    header = header or f"epoch {epoch}"
    for step, (images, targets) in enumerate(logger.log_every(loader, print_freq, header)):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        loss = segmentation_loss(logits, targets)
        value = check_finite(loss, step, epoch)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers.values():
            opt.step()
        logger.update(n=images.shape[0], loss=value)
    logger.synchronize()
    return {"loss": logger.meters["loss"].global_avg}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, amp: bool = False) -> torch.Tensor:
    """Class map (N x H x W, int64) for a batch of normalised images."""
    with autocast(images.device, amp):
        logits = model(images)
    return logits.argmax(dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, num_classes: int, *,
             amp: bool = False, print_freq: int = 50, is_main: bool = True,
             header: str = "eval") -> Dict[str, object]:
    """FCN metrics of ``model`` on ``loader`` (each process its own shard).

    The matrix is reduced across processes before the metrics are computed, so every
    rank returns the metrics of the whole set.
    """
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX, device=device)
    logger = MetricLogger(is_main=is_main)
    for images, targets in logger.log_every(loader, print_freq, header):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        matrix.update(targets, predict(model, images, amp=amp))
    matrix.all_reduce()
    return matrix.compute()


def summarize(metrics: Mapping[str, object], names: Optional[list] = None) -> Dict[str, object]:
    """Metrics with per-class lists turned into {class name: value} dicts."""
    out = dict(metrics)
    if names is not None:
        for key, new in (("iou", "per_class_iou"), ("class_acc", "per_class_acc")):
            if key in out:
                values = out.pop(key)
                out[new] = {n: v for n, v in zip(names, values)}
    return out
