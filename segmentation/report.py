"""Storage report and human-readable tables for a segmentation run.

Sizes are in MB of 10^6 bytes, as the paper counts them: masks at 1 bit per masked
weight (2 for ternary masks), every stored parameter at 32 bits. For VGG-16 this gives
16.78 MB of masks (13 convs + fc6 + fc7 = 134,248,128 weights), 7.57 MB of new layers
(score_fr + upscore) and about 545 MB for a whole finetuned FCN-32s.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch.nn as nn

from common.accounting import task_cost
from common.masking import is_piggybacked, mask_parameters, scheme_parameters

from .model import NEW_LAYERS

__all__ = ["MB", "storage_report", "format_storage", "format_metrics"]

MB = 1e6


def storage_report(model: nn.Module) -> Dict[str, float]:
    """Bytes one task costs: masks + new layers (piggyback) or the whole FCN (finetune)."""
    masks = {id(p) for p in mask_parameters(model) + scheme_parameters(model)}
    new_params = sum(p.numel() for name in NEW_LAYERS for p in model.get_submodule(name).parameters())
    fcn_params = sum(p.numel() for p in model.parameters() if id(p) not in masks)
    report = {
        "new_layer_params": new_params,
        "fcn_params": fcn_params,
        "new_layers_mb": new_params * 4 / MB,
        "full_fcn_mb": fcn_params * 4 / MB,
    }
    if is_piggybacked(model):
        cost = task_cost(model)
        scalars = sum(p.numel() for p in scheme_parameters(model))  # affine's a, b, c, d, in float32
        report.update(masked_weights=cost["masked_weights"], mask_bits=cost["mask_bits"],
                      mask_mb=cost["mask_bits"] / 8 / MB, scheme_params=scalars, scheme_mb=scalars * 4 / MB)
        report["task_mb"] = report["mask_mb"] + report["scheme_mb"] + report["new_layers_mb"]
    else:
        report.update(masked_weights=0, mask_bits=0, mask_mb=0.0, scheme_params=0, scheme_mb=0.0,
                      task_mb=report["full_fcn_mb"])
    return report


def format_storage(report: Mapping[str, float]) -> str:
    lines = ["storage per task:",
             f"  masks        {report['mask_mb']:9.2f} MB  ({report['masked_weights']:,} masked weights)",
             *([f"  scheme       {report['scheme_mb']:9.4f} MB  ({report['scheme_params']:,} float32 values "
                f"beside the masks)"] if report.get("scheme_params") else []),
             f"  new layers   {report['new_layers_mb']:9.2f} MB  ({report['new_layer_params']:,} parameters)",
             f"  this task    {report['task_mb']:9.2f} MB",
             f"  full FCN     {report['full_fcn_mb']:9.2f} MB  ({report['fcn_params']:,} parameters)"]
    return "\n".join(lines)


def _pct(v) -> str:
    return "   n/a" if v is None or v != v else f"{100 * v:6.2f}"


def format_metrics(metrics: Mapping[str, object], names: Sequence[str]) -> str:
    """Summary metrics in percent, then one IoU line per class."""
    lines = [f"pixel acc {_pct(metrics['pixel_acc'])}  mean acc {_pct(metrics['mean_acc'])}  "
             f"mean IoU {_pct(metrics['mean_iou'])}  fw IoU {_pct(metrics['fw_iou'])}"]
    per_class = metrics.get("per_class_iou") or dict(zip(names, metrics.get("iou", [])))
    for name, value in per_class.items():
        lines.append(f"  {name:<12} IoU {_pct(value)}")
    return "\n".join(lines)
