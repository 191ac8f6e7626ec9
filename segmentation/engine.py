"""What FCN training adds to the common engine: the loss, the batch step and the
evaluation pass.

``segmentation_loss`` is a per-pixel cross-entropy that ignores label 255. The training
loop is :func:`common.engine.train_one_epoch`, fed by :class:`SegmentationPipeline`
(mixed training: every optimizer of the scheme steps on the same loss). ``evaluate``
accumulates one confusion matrix over this process's share of the evaluation set, sums
it over processes and computes the FCN metrics from the sum.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.amp import autocast
from common.engine import Pipeline, StepOutput
from common.metrics import ConfusionMatrix
from common.meters import MetricLogger

from .data import IGNORE_INDEX

__all__ = ["segmentation_loss", "SegmentationPipeline", "evaluate_segmentation", "predict_labels",
           "summarize", "LOG_METRICS"]

# The metrics of each epoch's log record.
LOG_METRICS = ("pixel_acc", "mean_acc", "mean_iou", "fw_iou")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels of the batch (255 ignored).

    A batch whose pixels are all void gives a zero loss that still reaches every
    trainable parameter, instead of the 0/0 of ``reduction='mean'``.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    labelled = (target != IGNORE_INDEX).sum().clamp_min(1)
    return total / labelled


class SegmentationPipeline(Pipeline):
    """FCN training step (loss weighted by images per batch) and evaluation on ``val_loader``."""

    def __init__(self, device: torch.device, val_loader=None, num_classes: int = 21, *, amp: bool = False,
                 print_freq: int = 20, is_main: bool = True, header: str = "eval"):
        self.device, self.val_loader, self.num_classes, self.amp = device, val_loader, num_classes, amp
        self.print_freq, self.is_main, self.header = print_freq, is_main, header

    def train_step(self, model: nn.Module, batch: Any) -> StepOutput:
        images, targets = batch
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp):
            logits = model(images)
        return StepOutput(segmentation_loss(logits, targets), int(images.shape[0]))

    def evaluate(self, model: nn.Module) -> Dict[str, Any]:
        return evaluate_segmentation(model, self.val_loader, self.device, self.num_classes, amp=self.amp,
                        print_freq=self.print_freq, is_main=self.is_main, header=self.header)

    def log_metrics(self, evaluation: Mapping[str, Any]) -> Dict[str, Any]:
        return {k: evaluation[k] for k in LOG_METRICS}

    def describe(self, record: Mapping[str, Any]) -> str:
        return (f"train loss {record['train_loss']:.4f}  mean IoU {100 * record['mean_iou']:.2f}  "
                f"pixel acc {100 * record['pixel_acc']:.2f}")


@torch.no_grad()
def predict_labels(model: nn.Module, images: torch.Tensor, *, amp: bool = False) -> torch.Tensor:
    """Class map (N x H x W, int64) for a batch of normalised images."""
    with autocast(images.device, amp):
        logits = model(images)
    return logits.argmax(dim=1)


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader, device: torch.device, num_classes: int, *,
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
        matrix.update(targets, predict_labels(model, images, amp=amp))
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
