"""Image classification for the training engine: cross-entropy step, top-1 evaluation,
prediction. Shared by every pipeline whose task is one label per image (decathlon,
classification).

No loop here reads the device per batch: correct predictions and loss sums stay on the
device and are read once at the end (:func:`evaluate_classifier`) or, in training, by the
engine at its window reads.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.amp import Precision
from common.distributed import all_reduce_sum
from common.engine import Pipeline, StepOutput

__all__ = ["ClassificationPipeline", "classification_step", "evaluate_classifier", "predict"]


def classification_step(model: nn.Module, batch, prec: Precision) -> StepOutput:
    """Cross-entropy of one ``(images, targets)`` batch, with its correct predictions."""
    images, targets = prec.batch(*batch)
    with prec.autocast():
        logits = model(images)
    loss = F.cross_entropy(logits.float(), targets)
    correct = (logits.detach().argmax(dim=1) == targets).sum()
    return StepOutput(loss=loss, count=int(targets.shape[0]), sums={"correct": correct})


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, prec: Precision, split: str = "val") -> Dict[str, float]:
    """``<split>_top1`` (%), ``<split>_loss`` and ``<split>_count`` over the whole (possibly
    sharded) loader, summed over processes; ``split`` names what the loader holds."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=prec.device)
    correct = torch.zeros((), dtype=torch.float64, device=prec.device)
    seen = 0
    for images, targets in loader:
        images, targets = prec.batch(images, targets)
        with prec.autocast():
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").double()
        correct += (logits.argmax(dim=1) == targets).sum()
        seen += int(targets.shape[0])
    totals = torch.stack([loss_sum, correct, torch.tensor(float(seen), dtype=torch.float64,
                                                          device=prec.device)])
    loss_sum, correct, n = all_reduce_sum(totals).tolist()
    n = int(n)
    return {f"{split}_top1": 100.0 * correct / n if n else float("nan"),
            f"{split}_loss": loss_sum / n if n else float("nan"), f"{split}_count": n}


@torch.no_grad()
def predict(model: nn.Module, loader, *, prec: Precision) -> torch.Tensor:
    """Predicted class index of every sample of a (single-process) loader, in order."""
    model.eval()
    out = []
    for images, _ in loader:
        with prec.autocast():
            out.append(model(prec.batch(images)).argmax(dim=1))
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.int64)


class ClassificationPipeline(Pipeline):
    """Cross-entropy training with top-1 (%), evaluated after every epoch on ``val_loader``,
    which holds the split named ``split`` (its metrics carry that name: ``val_top1``,
    ``test_top1``)."""

    accuracy_key = "correct"

    def __init__(self, prec: Precision, val_loader, num_classes: Optional[int] = None, split: str = "val"):
        self.prec, self.val_loader, self.split = prec, val_loader, split
        self.chance = 1.0 / num_classes if num_classes else None

    def train_step(self, model: nn.Module, batch: Any) -> StepOutput:
        return classification_step(model, batch, self.prec)

    def evaluate(self, model: nn.Module) -> Dict[str, Any]:
        return evaluate_classifier(model, self.val_loader, self.prec, self.split)

    def train_metrics(self, sums: Mapping[str, float], count: float) -> Dict[str, float]:
        return {"train_top1": 100.0 * sums.get("correct", 0.0) / count if count else float("nan")}

    def describe(self, record: Mapping[str, Any]) -> str:
        return (f"train loss {record['train_loss']:.4f} top-1 {record['train_top1']:.2f}  "
                f"{self.split} loss {record[self.split + '_loss']:.4f} top-1 {record[self.split + '_top1']:.2f}")
