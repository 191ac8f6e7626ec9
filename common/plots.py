"""Pictures for people: training curves, mask sparsity per layer, per-task bar charts.

Every figure is rendered off-screen (matplotlib's Agg backend) and written as a PNG with
:func:`common.runlog.atomic_write_bytes`, so a reader never sees half a file and the file
gets the permissions of a plain ``open()`` (0644 under the usual umask).

:func:`save_run_plots` is what a training run calls at its end: from the run folder's
``log.jsonl`` it draws ``curves.png`` (loss and accuracy per epoch) and, when the run has
masks, ``sparsity.png`` (percentage of weights masked out per layer, the paper's Fig. 3)
from ``metrics.json``'s ``sparsity_layers`` or from ``masks.safetensors``. It draws what
the files hold and skips what they lack; it never fails a finished run over a picture.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from common.runlog import atomic_write_bytes

__all__ = ["save_figure", "plot_training_curves", "plot_sparsity", "plot_grouped_bars",
           "save_run_plots", "CURVES_PNG", "SPARSITY_PNG"]

CURVES_PNG = "curves.png"
SPARSITY_PNG = "sparsity.png"
_DPI = 100


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi: int = _DPI) -> Path:
    """Render ``fig`` to PNG bytes, close it and write the file atomically."""
    plt = _pyplot()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------- curves


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _series(records: Sequence[Mapping], keys: Sequence[str]) -> Dict[str, Tuple[List[float], List[float]]]:
    """key -> (epochs, values) for every key with at least one finite number."""
    out = {}
    for key in keys:
        xs, ys = [], []
        for i, r in enumerate(records):
            y = _number(r.get(key))
            if y is None:
                continue
            x = _number(r.get("epoch"))
            xs.append(x if x is not None else i + 1)
            ys.append(y)
        if ys:
            out[key] = (xs, ys)
    return out


# Accuracy-like keys: the decathlon's top-1 (percent) and segmentation's FCN metrics (fractions).
_ACCURACY_KEYS = ("train_top1", "val_top1", "pixel_acc", "mean_acc", "mean_iou", "fw_iou")
_LABELS = {"train_loss": "train loss", "val_loss": "val loss", "train_top1": "train top-1",
           "val_top1": "val top-1", "pixel_acc": "pixel acc.", "mean_acc": "mean acc.",
           "mean_iou": "mean IoU", "fw_iou": "f.w. IoU"}


def plot_training_curves(records: Sequence[Mapping], path, *, title: Optional[str] = None) -> Optional[Path]:
    """Loss and accuracy per epoch from log.jsonl records; None when they hold neither.

    Losses are every ``*loss`` key; accuracies the keys in ``_ACCURACY_KEYS``, drawn in
    percent (fractions, as segmentation logs them, are scaled by 100)."""
    records = [r for r in records if isinstance(r, Mapping)]
    loss_keys = sorted({k for r in records for k in r if isinstance(k, str) and k.endswith("loss")})
    losses = _series(records, loss_keys)
    accuracies = _series(records, _ACCURACY_KEYS)
    if not losses and not accuracies:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    accuracy_label = "accuracy and IoU (%)" if any("iou" in k for k in accuracies) else "accuracy (%)"
    panels = [p for p in (("loss", losses), (accuracy_label, accuracies)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        percent = ylabel.startswith("accuracy") and all(v <= 1.0 for _, ys in series.values() for v in ys)
        for key, (xs, ys) in series.items():
            ys = [100 * v for v in ys] if percent else ys
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3,
                    label=_LABELS.get(key, key))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Training curves")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- sparsity


def plot_sparsity(per_layer: Union[Mapping[str, float], Mapping[str, Mapping[str, float]]], path, *,
                  title: Optional[str] = None) -> Path:
    """Bar chart of the percentage of weights masked out per layer (paper Fig. 3).

    ``per_layer`` maps layer name to zero fraction, or series name (e.g. task) to such a
    mapping, drawn side by side; layers keep the order of the first series."""
    plt = _pyplot()
    nested = bool(per_layer) and isinstance(next(iter(per_layer.values())), Mapping)
    series = dict(per_layer) if nested else {"": per_layer}
    names: List[str] = []
    for values in series.values():
        names += [n for n in values if n not in names]
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(min(40.0, max(7.0, 0.3 * len(names) * max(1, len(series)) ** 0.5 + 2)), 4.5))
    for i, (label, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [100 * float(values.get(n, float("nan"))) for n in names], width, label=label or None)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("weights masked out (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "Mask sparsity per layer", fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- grouped bars


def plot_grouped_bars(panels: Sequence[Tuple[str, Mapping[str, Mapping[str, Optional[float]]]]],
                      categories: Sequence[str], path, *, title: Optional[str] = None,
                      notes: Optional[Mapping[str, str]] = None) -> Path:
    """One grouped bar chart per panel, stacked vertically.

    Each panel is ``(y label, {series name: {category: value or None}})``; a missing or
    None value leaves a gap. ``notes`` writes a short text under a category's label
    (e.g. "missing")."""
    plt = _pyplot()
    categories = list(categories)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 1.05 * len(categories) + 2), 3.6 * len(panels)),
                             squeeze=False)
    for ax, (ylabel, series) in zip(axes[:, 0], panels):
        width = 0.8 / max(len(series), 1)
        for i, (label, values) in enumerate(series.items()):
            xs, ys = [], []
            for j, c in enumerate(categories):
                v = _number(values.get(c))
                if v is not None:
                    xs.append(j + (i - (len(series) - 1) / 2) * width)
                    ys.append(v)
            bars = ax.bar(xs, ys, width, label=label)
            if i == 0:
                ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels([c + (f"\n({notes[c]})" if notes and c in notes else "") for c in categories],
                           fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        top = max([_number(v) or 0.0 for values in series.values() for v in values.values()] + [1.0])
        ax.set_ylim(0, top * 1.2)  # room for the legend above the bars
        ax.legend(fontsize=8, ncol=min(4, len(series)), loc="upper left")
    fig.suptitle(title or "")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- one run


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_log(path: Path) -> List[dict]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if isinstance(record, dict):
            records.append(record)
    return records


def _layer_sparsity(run: Path, metrics) -> Optional[Dict[str, float]]:
    layers = metrics.get("sparsity_layers") if isinstance(metrics, dict) else None
    if isinstance(layers, dict) and layers:
        values = {str(k): _number(v) for k, v in layers.items()}
        return {k: v for k, v in values.items() if v is not None} or None
    mask_file = run / "masks.safetensors"
    if not mask_file.is_file():
        return None
    from common.accounting import sparsity_from_masks
    from common.maskfile import read_mask_file
    try:
        masks, _, _ = read_mask_file(mask_file)
    except (ValueError, OSError) as exc:
        warnings.warn(f"{mask_file}: no sparsity picture ({exc})")
        return None
    return sparsity_from_masks(masks)["layers"] or None


def save_run_plots(run_dir) -> List[Path]:
    """Write ``curves.png`` and (for runs with masks) ``sparsity.png`` into ``run_dir``;
    returns the files written (none when the folder holds nothing to draw)."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    config = _read_json(run / "config.json")
    config = config if isinstance(config, dict) else {}
    name = " ".join(str(config[k]) for k in ("task", "method", "arch") if config.get(k)) or run.name
    written = []
    curves = plot_training_curves(_read_log(run / "log.jsonl"), run / CURVES_PNG,
                                  title=f"{name}: training curves")
    if curves is not None:
        written.append(curves)
    metrics = _read_json(run / "metrics.json")
    layers = _layer_sparsity(run, metrics)
    if layers:
        total = metrics.get("sparsity") if isinstance(metrics, dict) else None
        total = _number(total)
        suffix = f"\noverall {100 * total:.1f}% of the masked layers' weights" if total is not None else ""
        written.append(plot_sparsity(layers, run / SPARSITY_PNG,
                                     title=f"{name}: weights masked out per layer{suffix}"))
    return written
