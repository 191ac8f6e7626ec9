"""Sparsity, parameter and storage accounting (paper Table 6, Fig. 3 and section 6).

Sparsity is the fraction of mask entries equal to 0. The parameter ratio counts
everything relative to one backbone of n 32-bit parameters: a plain binary mask adds
n bits per task, so N tasks give 1 + N/32; per-task extras (heads, task-specific norm
layers) add 32 bits per parameter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Union

import torch
import torch.nn as nn

from .masking import conversion_settings, mask_entries, task_state_modules

__all__ = ["sparsity", "sparsity_from_masks", "backbone_parameters", "task_extra_parameters",
           "task_cost", "parameter_ratio", "file_bits_per_weight"]


def sparsity_from_masks(masks: Mapping[str, torch.Tensor]) -> dict:
    """Per-layer and total fraction of zero mask entries, from thresholded masks."""
    layers, zeros, total = {}, 0, 0
    for name, m in masks.items():
        z = int((m == 0).sum())
        layers[name] = z / max(m.numel(), 1)
        zeros += z
        total += m.numel()
    return {"layers": layers, "total": zeros / max(total, 1), "zeros": zeros, "numel": total}


@torch.no_grad()
def sparsity(model: nn.Module) -> dict:
    """{"layers": {name: fraction of zeros}, "total": fraction, "zeros": int, "numel": int}."""
    return sparsity_from_masks({e.key: e.binary() for e in mask_entries(model)})


def backbone_parameters(model: nn.Module) -> int:
    """n: the shared backbone's parameter count (frozen weights, biases and norm
    parameters; masks and per-task modules excluded)."""
    task = {id(p) for _, m in task_state_modules(model) for p in m.parameters(recurse=False)}
    masks = {id(e.mask_real) for e in mask_entries(model)}
    masks |= {id(t) for e in mask_entries(model) for t in e.extras.values()}
    return sum(p.numel() for p in model.parameters() if id(p) not in task and id(p) not in masks)


def task_extra_parameters(model: nn.Module) -> int:
    """Per-task 32-bit parameters: new heads, task-specific norm parameters and the mask
    scheme's values beside the mask (``affine``'s scalars)."""
    return (sum(p.numel() for _, m in task_state_modules(model) for p in m.parameters(recurse=False))
            + sum(t.numel() for e in mask_entries(model) for t in e.extras.values()))


def task_cost(model: nn.Module, bits_per_mask_entry: float = None) -> dict:
    """One task's cost: mask bits (1 or 2 per weight, or the given rate) and extra parameters."""
    entries = mask_entries(model)
    masked = sum(e.weight.numel() for e in entries)
    if bits_per_mask_entry is not None:
        rate = bits_per_mask_entry
    else:
        from .schemes import get_scheme
        rate = get_scheme(conversion_settings(model)["scheme"]).bits if entries else 1
    return {"masked_weights": masked, "mask_bits": masked * rate, "extra_params": task_extra_parameters(model)}


def parameter_ratio(backbone_params: int, tasks: Iterable[Mapping[str, float]]) -> float:
    """(32 n + sum over tasks of mask_bits + 32 * extra_params) / 32 n."""
    if backbone_params <= 0:
        raise ValueError(f"backbone_params must be positive, got {backbone_params}")
    bits = 32 * backbone_params
    for t in tasks:
        bits += t.get("mask_bits", 0) + 32 * t.get("extra_params", 0)
    return bits / (32 * backbone_params)


def file_bits_per_weight(path: Union[str, Path], masked_weights: int) -> float:
    """Bits on disk per masked weight for a mask file (header and task state included)."""
    return Path(path).stat().st_size * 8 / masked_weights
