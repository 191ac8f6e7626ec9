"""The segmentation confusion matrix and the FCN metrics computed from it (top-1 of the
classification pipelines is :func:`common.classify.evaluate_classifier`).

The matrix accumulates integer counts, which sum exactly across processes: after
``all_reduce()`` every rank computes the metrics of the whole evaluation set.

Segmentation metrics follow the FCN definitions on one confusion matrix ``M`` with rows =
ground truth and columns = prediction (ignored pixels dropped):
pixel accuracy = trace(M) / sum(M); mean accuracy = nanmean(diag / row sums);
mean IoU = nanmean(diag / (row sums + column sums - diag)); frequency-weighted IoU =
sum over classes with row sum > 0 of (row sum / total) * IoU.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Union

import numpy as np
import torch

from common.distributed import all_reduce_sum

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Pixel confusion matrix over ``num_classes`` labels; ``ignore_index`` is dropped.

    ``device=None`` keeps the matrix on the device of the first update, so accumulation
    on a GPU needs no host transfer per batch.
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255,
                 device: Optional[Union[str, torch.device]] = None):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} is a valid class index for "
                             f"num_classes={num_classes}; pick a label outside 0..{num_classes - 1}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self._follow_input = device is None
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64,
                               device=device if device is not None else "cpu")
        self._reduced = False

    def reset(self) -> None:
        self.mat.zero_()
        self._reduced = False

    def _bad_values(self, values: torch.Tensor) -> List[int]:
        bad = values[(values < 0) | (values >= self.num_classes)]
        return torch.unique(bad)[:8].tolist()

    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        """Count (ground truth, prediction) pairs of two integer tensors of one shape."""
        if self._reduced:
            raise RuntimeError("ConfusionMatrix updated after all_reduce(); call reset() first "
                               "(the matrix now includes other processes)")
        for name, t in (("target", target), ("prediction", prediction)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise ValueError(f"{name} must hold integer labels, got dtype {t.dtype} "
                                 f"(take argmax over the class dimension first)")
        if target.shape != prediction.shape:
            raise ValueError(f"target shape {tuple(target.shape)} and prediction shape "
                             f"{tuple(prediction.shape)} differ")
        target = target.reshape(-1).long()
        prediction = prediction.reshape(-1).to(target.device).long()
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            target, prediction = target[keep], prediction[keep]
        bad = self._bad_values(target)
        if bad:
            raise ValueError(f"target labels {bad} are outside 0..{self.num_classes - 1} "
                             f"and are not ignore_index={self.ignore_index}")
        bad = self._bad_values(prediction)
        if bad:
            raise ValueError(f"prediction labels {bad} are outside 0..{self.num_classes - 1}")
        counts = torch.bincount(self.num_classes * target + prediction,
                                minlength=self.num_classes ** 2)
        counts = counts.view(self.num_classes, self.num_classes)
        if self._follow_input and self.mat.device != counts.device and not self.mat.any():
            self.mat = self.mat.to(counts.device)
        self._follow_input = False
        self.mat += counts.to(self.mat.device)

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrix over processes in place (once; later calls do nothing)."""
        if not self._reduced:
            all_reduce_sum(self.mat)
            self._reduced = True
        return self

    def compute(self) -> Dict[str, object]:
        """FCN metrics as fractions; per-class ``iou``/``class_acc`` are NaN where undefined."""
        hist = self.mat.detach().cpu().numpy().astype(np.float64)
        total = hist.sum()
        diag = np.diag(hist)
        rows, cols = hist.sum(axis=1), hist.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            class_acc = np.where(rows > 0, diag / rows, np.nan)
            union = rows + cols - diag
            iou = np.where(union > 0, diag / union, np.nan)
        freq = rows / total if total > 0 else np.zeros_like(rows)
        present = freq > 0
        return {
            "pixel_acc": float(diag.sum() / total) if total > 0 else math.nan,
            "mean_acc": _nanmean(class_acc),
            "mean_iou": _nanmean(iou),
            "fw_iou": float((freq[present] * iou[present]).sum()) if total > 0 else math.nan,
            "iou": [float(v) for v in iou],
            "class_acc": [float(v) for v in class_acc],
            "pixels": int(total),
        }


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan
