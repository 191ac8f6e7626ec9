"""Per-task storage of a decathlon submission and its parameter ratio (#par).

Everything is counted relative to one backbone of ``n`` 32-bit parameters (the imagenet12
network with its own classifier, which solves the source task). Each further task adds
its mask (bits per masked weight of its scheme: 1 binary, 2 ternary) and its own 32-bit
parameters: the new classifier, task-specific normalisation layers, the scheme's trained
values beside the mask (``affine``'s four scalars per layer) and any other trained tensor
saved with the mask. Nine plain 1-bit masks over all n weights give (32n + 9n) / 32n = 1.28, the paper's
figure (section 6). Running statistics of task-specific BN are per-task values too but not
parameters; like the backbone's own statistics they are left out of the ratio and show up
in the bytes on disk.

The costs are read from the mask files themselves (:func:`mask_file_cost`), so they
describe what is actually stored; the ratio itself is :func:`common.accounting.parameter_ratio`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional

from common.accounting import parameter_ratio, sparsity_from_masks
from common.errors import UsageError
from common.maskfile import read_mask_file
from common.schemes import get_scheme

__all__ = ["BUFFER_SUFFIXES", "mask_file_cost", "decathlon_accounting", "FP32_BITS"]

FP32_BITS = 32
# State-dict suffixes of the buffers torch's normalisation layers keep: statistics,
# not trained parameters.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _bits_per_entry(meta: dict) -> int:
    return int(get_scheme(meta["scheme"]).bits)


def _head_prefixes(meta: dict, state: Mapping, norm_layers: set) -> tuple:
    """The task's new modules: as the file records them (``skip``), else the owners of
    its 2-D weight tensors (linear classifiers) that are not normalisation layers."""
    skip = meta.get("skip")
    if isinstance(skip, (list, tuple)) and skip:
        return tuple(f"{name}." for name in skip)
    owners = {key.rsplit(".", 1)[0] for key, t in state.items()
              if key.endswith(".weight") and t.dim() == 2}
    return tuple(f"{o}." for o in sorted(owners - norm_layers))


def mask_file_cost(path, *, head: Optional[str] = None) -> dict:
    """What one task's mask file stores, counted from the file.

    Returns ``masked_weights``, ``mask_bits`` (bits per masked weight of the file's mask
    scheme: 1 binary, 2 ternary), ``head_params`` (tensors of the task's new modules:
    ``head`` when given, else those the file records or its linear layers),
    ``norm_params`` (affine parameters of task-specific normalisation layers, recognised
    by their running statistics), ``scheme_params`` (the scheme's values beside the mask),
    ``other_params`` (any other trained tensor), ``extra_params`` (the sum of the four:
    the task's 32-bit parameters), ``statistic_values`` (running statistics),
    ``sparsity`` (fraction of mask entries equal to 0), ``scheme`` and ``file_bytes``.
    """
    masks, state, meta, extras = read_mask_file(path)
    masked = sum(m.numel() for m in masks.values())
    norm_layers = {key.rsplit(".", 1)[0] for key in state if key.endswith(".running_mean")}
    heads = (f"{head}.",) if head else _head_prefixes(meta, state, norm_layers)
    counts = {"head_params": 0, "norm_params": 0, "other_params": 0, "statistic_values": 0,
              "scheme_params": sum(t.numel() for layer in extras.values() for t in layer.values())}
    for key, tensor in state.items():
        owner, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        if leaf == "num_batches_tracked":
            continue  # a step counter, not used at inference
        if leaf in BUFFER_SUFFIXES:
            kind = "statistic_values"
        elif heads and key.startswith(heads) and owner not in norm_layers:
            kind = "head_params"
        elif owner in norm_layers:
            kind = "norm_params"
        else:
            kind = "other_params"
        counts[kind] += tensor.numel()
    return {
        "masked_weights": masked,
        "mask_bits": masked * _bits_per_entry(meta),
        **counts,
        "extra_params": counts["head_params"] + counts["norm_params"] + counts["scheme_params"]
        + counts["other_params"],
        "sparsity": sparsity_from_masks(masks)["total"],
        "scheme": meta["scheme"],
        "file_bytes": Path(path).stat().st_size,
    }


def decathlon_accounting(backbone_params: int, tasks: Mapping[str, Mapping[str, float]], *,
                         backbone_file_bytes: Optional[int] = None) -> dict:
    """The parameter ratio and storage of a backbone plus per-task costs.

    ``tasks`` maps task name to a cost with ``mask_bits`` and ``extra_params`` (and
    optionally ``file_bytes``), as from :func:`mask_file_cost`; the backbone's own task
    costs nothing beyond the backbone and is not listed. Returns the ratio with every
    per-task parameter (``parameter_ratio``), the ratio of the masks alone
    (``parameter_ratio_masks_only``, the paper's convention), the bits of each part and
    the bytes: ideal (bit-exact) and, where known, of the files on disk.
    """
    if backbone_params <= 0:
        raise UsageError(f"backbone_params must be a positive count, got {backbone_params}")
    costs = {name: {"mask_bits": int(c["mask_bits"]), "extra_params": int(c["extra_params"])}
             for name, c in tasks.items()}
    backbone_bits = FP32_BITS * backbone_params
    mask_bits = sum(c["mask_bits"] for c in costs.values())
    extra_bits = FP32_BITS * sum(c["extra_params"] for c in costs.values())
    file_sizes = [c.get("file_bytes") for c in tasks.values()]
    task_file_bytes = sum(file_sizes) if all(s is not None for s in file_sizes) else None
    total_file_bytes = (backbone_file_bytes + task_file_bytes
                        if backbone_file_bytes is not None and task_file_bytes is not None else None)
    per_task = {}
    for name, c in costs.items():
        ideal = math.ceil(c["mask_bits"] / 8) + FP32_BITS // 8 * c["extra_params"]
        per_task[name] = dict(tasks[name], **c, ideal_bytes=ideal,
                              ratio_increment=(c["mask_bits"] + FP32_BITS * c["extra_params"]) / backbone_bits)
    return {
        "backbone_params": int(backbone_params),
        "num_tasks_with_masks": len(costs),
        "parameter_ratio": parameter_ratio(backbone_params, costs.values()),
        "parameter_ratio_masks_only": parameter_ratio(
            backbone_params, [{"mask_bits": c["mask_bits"]} for c in costs.values()]),
        "bits": {"backbone": backbone_bits, "masks": mask_bits, "task_parameters": extra_bits,
                 "total": backbone_bits + mask_bits + extra_bits},
        "bytes": {
            "backbone_ideal": backbone_bits // 8,
            "tasks_ideal": sum(t["ideal_bytes"] for t in per_task.values()),
            "total_ideal": backbone_bits // 8 + sum(t["ideal_bytes"] for t in per_task.values()),
            "backbone_file": backbone_file_bytes,
            "task_files": task_file_bytes,
            "total_files": total_file_bytes,
        },
        "tasks": per_task,
    }
