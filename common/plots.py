"""Pictures for people: training curves, mask sparsity per layer, per-task bar charts.

Every figure is rendered off-screen (matplotlib's Agg backend) and written as a PNG with
:func:`common.atomic.atomic_write_bytes`, so a reader never sees half a file and the file
gets the permissions of a plain ``open()`` (0644 under the usual umask).

:func:`save_run_plots` is what a training run calls at its end: from the run folder's
``log.jsonl`` it draws ``curves.png`` (loss and accuracy per epoch) and, when the run has
masks, ``sparsity.png`` (percentage of weights masked out per layer, the paper's Fig. 3)
from ``metrics.json``'s ``sparsity_layers`` or from ``masks.safetensors``. It draws what
the files hold and skips what they lack; it never fails a finished run over a picture.
Titles and legends name the dataset and the split a run was evaluated on as its
``config.json`` / ``metrics.json`` record them (logs call every evaluation split "val"),
and a run marked ``"synthetic": true`` carries a visible "synthetic data" note.

The figures are meant to be read where a README shows them (about 800 px wide): no text
under 9 pt, widths capped at 13-14 inches, a sparsity axis scaled to the data and at most
25 layer names. Each ``plot_*`` function saves the figure its ``*_figure`` twin builds;
those return the matplotlib Figure, for callers that add to it and for tests.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from common.atomic import atomic_write_bytes

__all__ = ["save_figure", "plot_training_curves", "plot_sparsity", "plot_grouped_bars",
           "save_run_plots", "expected_plots", "CURVES_PNG", "SPARSITY_PNG", "curves_figure", "sparsity_figure",
           "grouped_bars_figure", "sparsity_axis_top", "thinned_ticks", "run_description", "SYNTHETIC_NOTE"]

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
_ACCURACY_KEYS = ("train_top1", "val_top1", "test_top1", "pixel_acc", "mean_acc", "mean_iou", "fw_iou")
_LABELS = {"train_loss": "train loss", "val_loss": "val loss", "train_top1": "train top-1",
           "val_top1": "val top-1", "test_loss": "test loss", "test_top1": "test top-1",
           "pixel_acc": "pixel acc.", "mean_acc": "mean acc.",
           "mean_iou": "mean IoU", "fw_iou": "f.w. IoU"}
_EVAL_METRICS = ("pixel_acc", "mean_acc", "mean_iou", "fw_iou")  # computed on the evaluation split

# Font sizes in points: at 100 dpi a figure 10-13 inches wide shown 800 px wide in a README
# is scaled by 0.6-0.8, so nothing smaller than 9 pt stays readable.
_FONT = {"title": 13, "label": 11, "tick": 10, "legend": 10, "value": 9, "note": 11}
SYNTHETIC_NOTE = "synthetic data"


def _series_label(key: str, eval_split: Optional[str]) -> str:
    label = _LABELS.get(key, key)
    if eval_split and key.startswith("val_"):
        rest = label[len("val "):] if label.startswith("val ") else key[len("val_"):]
        return f"{eval_split} {rest}"
    if eval_split and key in _EVAL_METRICS:
        return f"{label} ({eval_split})"
    return label


def _figure_note(synthetic: bool, note: Optional[str]) -> Optional[str]:
    parts = ([SYNTHETIC_NOTE + ": not a measured result"] if synthetic else []) + ([note] if note else [])
    return " | ".join(parts) or None


def _finish(fig, suptitle: Optional[str] = None, synthetic: bool = False, note: Optional[str] = None) -> None:
    """Lay the figure out: the figure-wide note (e.g. "synthetic data") in a box across the
    top, the title under it, the axes below both."""
    height = fig.get_figheight()
    top = 1.0
    text = _figure_note(synthetic, note)
    if text:
        fig.text(0.5, 1 - 0.06 / height, text, ha="center", va="top", fontsize=_FONT["note"],
                 fontweight="bold", color="#8a3b00",
                 bbox=dict(boxstyle="round,pad=0.3", facecolor="#fff1d6", edgecolor="#d08a2e"))
        top -= 0.36 / height
    if suptitle:
        fig.suptitle(suptitle, y=top, va="top", fontsize=_FONT["title"])
        top -= (0.04 + 0.22 * (suptitle.count("\n") + 1)) / height
    fig.tight_layout(rect=(0, 0, 1, top))


def _collapses(records: Sequence[Mapping]) -> List[Tuple[float, str]]:
    """(epoch, label) of every epoch whose record reports a collapse."""
    out = []
    for i, r in enumerate(records):
        event = r.get("collapse")
        if isinstance(event, Mapping):
            epoch = _number(r.get("epoch")) or i + 1
            step = event.get("step")
            out.append((epoch, f"collapse (step {step})" if step is not None else "collapse"))
    return out


def curves_figure(records: Sequence[Mapping], *, title: Optional[str] = None, dataset: Optional[str] = None,
                  eval_split: Optional[str] = None, synthetic: bool = False, note: Optional[str] = None,
                  chance: Optional[float] = None):
    """The matplotlib Figure :func:`plot_training_curves` saves (None when nothing to draw).
    ``chance`` (percent) draws the accuracy of guessing; a collapse an epoch record reports
    is marked on every panel."""
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
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.2), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        percent = ylabel.startswith("accuracy") and all(v <= 1.0 for _, ys in series.values() for v in ys)
        for key, (xs, ys) in series.items():
            ys = [100 * v for v in ys] if percent else ys
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=4, linewidth=1.8,
                    label=_series_label(key, eval_split))
        if ylabel.startswith("accuracy") and chance is not None and not any("iou" in k for k in series):
            ax.axhline(chance, color="#777777", linestyle=":", linewidth=1.5, label=f"chance ({chance:.3g}%)")
        for i, (epoch, label) in enumerate(_collapses(records)):
            ax.axvline(epoch, color="#c0392b", linestyle="--", linewidth=1.5, label=label if i == 0 else None)
        ax.set_xlabel("epoch", fontsize=_FONT["label"])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=_FONT["label"])
        ax.tick_params(labelsize=_FONT["tick"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=_FONT["legend"])
    if title is None:
        title = f"{dataset}: training curves" if dataset else "Training curves"
        if eval_split:
            title += f" (evaluated on {eval_split})"
    _finish(fig, title, synthetic, note)
    return fig


def plot_training_curves(records: Sequence[Mapping], path, *, title: Optional[str] = None,
                         dataset: Optional[str] = None, eval_split: Optional[str] = None,
                         synthetic: bool = False, note: Optional[str] = None,
                         chance: Optional[float] = None) -> Optional[Path]:
    """Loss and accuracy per epoch from log.jsonl records; None when they hold neither.

    Losses are every ``*loss`` key; accuracies the keys in ``_ACCURACY_KEYS``, drawn in
    percent (fractions, as segmentation logs them, are scaled by 100). ``eval_split``
    names the split the ``val_*`` keys were measured on (logs call it "val" whatever it
    is: "test" when a run evaluates on its test split); without ``title`` the title is
    made of ``dataset`` and ``eval_split``. ``synthetic`` marks the figure "synthetic
    data"; ``note`` adds a text of its own beside it."""
    fig = curves_figure(records, title=title, dataset=dataset, eval_split=eval_split,
                        synthetic=synthetic, note=note, chance=chance)
    return None if fig is None else save_figure(fig, path)


# ----------------------------------------------------------------------------- sparsity

_MAX_TICK_LABELS = 25
_NICE_STEPS = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


def sparsity_axis_top(max_percent: float) -> float:
    """Upper y limit (percent) for bars up to ``max_percent``: a round number about 15 %
    above the largest bar (room for its value label), so that 0-5 % sparsity is drawn on
    a 0-6 % axis rather than squashed at the bottom of 0-100 %; at most 100 unless a bar
    is that high."""
    m = _number(max_percent)
    if m is None or m <= 0:
        return 1.0
    target = m * 1.15
    magnitude = 10.0 ** math.floor(math.log10(target))
    top = next(step * magnitude for step in _NICE_STEPS if step * magnitude >= target - 1e-12)
    if top > 100.0:
        top = 100.0 if m <= 90.0 else 105.0
    return top


def thinned_ticks(n: int, max_labels: int = _MAX_TICK_LABELS) -> List[int]:
    """Indices of the bars that get a name: all of them up to ``max_labels``, else every
    k-th from the first (k the smallest step giving at most ``max_labels`` names) and the
    last one, which takes the place of the k-th before it when the two would crowd."""
    if n <= max_labels:
        return list(range(n))
    step = math.ceil(n / max_labels)
    ticks = list(range(0, n, step))
    if ticks[-1] != n - 1:
        if n - 1 - ticks[-1] < step / 2 or len(ticks) >= max_labels:
            ticks[-1] = n - 1
        else:
            ticks.append(n - 1)
    return ticks


def _short(name: str, width: int = 28) -> str:
    """A layer name cut from the left: its end tells layers apart."""
    return name if len(name) <= width else "\u2026" + name[-(width - 1):]


def sparsity_figure(per_layer: Union[Mapping[str, float], Mapping[str, Mapping[str, float]]], *,
                    title: Optional[str] = None, synthetic: bool = False, note: Optional[str] = None):
    """The matplotlib Figure :func:`plot_sparsity` saves."""
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, MaxNLocator
    nested = bool(per_layer) and isinstance(next(iter(per_layer.values())), Mapping)
    series = dict(per_layer) if nested else {"": per_layer}
    names: List[str] = []
    for values in series.values():
        names += [n for n in values if n not in names]
    n = len(names)
    width = 0.8 / max(len(series), 1)
    # Width grows slowly with the layer count and stops at 13 in (1300 px at 100 dpi).
    fig_w = min(13.0, max(8.0, 6.0 + 0.07 * n * max(1, len(series)) ** 0.5))
    ticks = thinned_ticks(n)
    longest = max((len(_short(names[j])) + (len(f"{j}: ") if len(ticks) < n else 0) for j in ticks), default=0)
    upright = n <= 12 and longest <= 12  # a few short names fit side by side
    # rotated names need about 0.085 in per character at 10 pt: grow the height, not shrink the bars
    fig, ax = plt.subplots(figsize=(fig_w, 5.0 if upright else min(8.0, max(5.0, 3.4 + 0.085 * longest))))
    percents = []
    pitch_in = fig_w * 0.85 / max(n, 1) * width  # inches per bar, roughly
    label_all = pitch_in >= 0.14  # a rotated 9 pt label is about 0.13 in thick
    for i, (label, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(n)]
        ys = [100 * float(values.get(nm, float("nan"))) for nm in names]
        bars = ax.bar(xs, ys, width, label=label or None)
        finite = [y for y in ys if math.isfinite(y)]
        percents += finite
        if not finite:
            continue
        if label_all:
            shown = [f"{y:.1f}" if math.isfinite(y) else "" for y in ys]
        else:  # too many bars to name each value: name the five largest
            largest = set(sorted(range(n), key=lambda j: -ys[j] if math.isfinite(ys[j]) else math.inf)[:5])
            shown = [f"{ys[j]:.1f}" if j in largest else "" for j in range(n)]
        ax.bar_label(bars, labels=shown, fontsize=_FONT["value"], rotation=0 if pitch_in >= 0.45 else 90,
                     padding=2)
    centre = width * (len(series) - 1) / 2
    ax.set_xticks([j + centre for j in ticks])
    if len(ticks) < n:
        # thinned: each name carries its layer's position so the bars between can be counted
        ax.set_xticklabels([f"{j}: {_short(names[j])}" for j in ticks], rotation=90, fontsize=_FONT["tick"])
        ax.xaxis.set_minor_locator(FixedLocator([j + centre for j in range(n)]))
        ax.set_xlabel(f"layer number and name ({n} layers in network order, one named every "
                      f"{ticks[1] - ticks[0]})", fontsize=_FONT["label"])
    else:
        ax.set_xticklabels([_short(names[j]) for j in ticks], rotation=0 if upright else 90,
                           fontsize=_FONT["tick"])
        ax.set_xlabel(f"layer ({n} in network order)" if n > 1 else "layer", fontsize=_FONT["label"])
    ax.set_xlim(-0.6, n - 0.4 + 2 * centre)
    ax.set_ylabel("weights masked out (%)", fontsize=_FONT["label"])
    ax.set_ylim(0, sparsity_axis_top(max(percents, default=0.0)))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.tick_params(axis="y", labelsize=_FONT["tick"])
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "Mask sparsity per layer", fontsize=_FONT["title"])
    if percents and max(percents) == 0:
        ax.text(0.5, 0.5, "no weight is masked out: every mask keeps all of its layer's weights",
                transform=ax.transAxes, ha="center", va="center", fontsize=_FONT["label"],
                bbox=dict(boxstyle="round,pad=0.4", facecolor="white", edgecolor="#999999"))
    if len(series) > 1:
        ax.legend(fontsize=_FONT["legend"])
    _finish(fig, None, synthetic, note)
    return fig


def plot_sparsity(per_layer: Union[Mapping[str, float], Mapping[str, Mapping[str, float]]], path, *,
                  title: Optional[str] = None, synthetic: bool = False, note: Optional[str] = None) -> Path:
    """Bar chart of the percentage of weights masked out per layer (paper Fig. 3).

    ``per_layer`` maps layer name to zero fraction, or series name (e.g. task) to such a
    mapping, drawn side by side; layers keep the order of the first series. The y axis
    fits the data (:func:`sparsity_axis_top`); with more than 25 layers every k-th layer
    is named (:func:`thinned_ticks`) and only the largest values are written on bars."""
    return save_figure(sparsity_figure(per_layer, title=title, synthetic=synthetic, note=note), path)


# ----------------------------------------------------------------------------- grouped bars


def grouped_bars_figure(panels: Sequence[Tuple[str, Mapping[str, Mapping[str, Optional[float]]]]],
                        categories: Sequence[str], *, title: Optional[str] = None,
                        notes: Optional[Mapping[str, str]] = None, synthetic: bool = False,
                        note: Optional[str] = None):
    """The matplotlib Figure :func:`plot_grouped_bars` saves."""
    plt = _pyplot()
    categories = list(categories)
    fig_w = min(14.0, max(8.0, 1.05 * len(categories) + 2))
    fig, axes = plt.subplots(len(panels), 1, figsize=(fig_w, 4.0 * len(panels)), squeeze=False)
    for ax, (ylabel, series) in zip(axes[:, 0], panels):
        width = 0.8 / max(len(series), 1)
        bar_in = fig_w * 0.85 / max(len(categories), 1) * width
        for i, (label, values) in enumerate(series.items()):
            xs, ys = [], []
            for j, c in enumerate(categories):
                v = _number(values.get(c))
                if v is not None:
                    xs.append(j + (i - (len(series) - 1) / 2) * width)
                    ys.append(v)
            bars = ax.bar(xs, ys, width, label=label)
            if i == 0 or bar_in >= 0.22:
                # upright when the bar is wide enough for "99.9" at 9 pt, else turned
                ax.bar_label(bars, fmt="%.1f" if max(ys, default=0) < 100 else "%.0f",
                             fontsize=_FONT["value"], padding=2, rotation=0 if bar_in >= 0.4 else 90)
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels([c + (f"\n({notes[c]})" if notes and c in notes else "") for c in categories],
                           fontsize=_FONT["tick"])
        ax.tick_params(axis="y", labelsize=_FONT["tick"])
        ax.set_ylabel(ylabel, fontsize=_FONT["label"])
        ax.grid(axis="y", alpha=0.3)
        top = max([_number(v) or 0.0 for values in series.values() for v in values.values()] + [1.0])
        ax.set_ylim(0, top * 1.32)  # room for the value labels and the legend above the bars
        ax.legend(fontsize=_FONT["legend"], ncol=min(4, len(series)), loc="upper left")
    if synthetic:
        title = f"{title} [{SYNTHETIC_NOTE}]" if title else f"[{SYNTHETIC_NOTE}]"
    _finish(fig, title, synthetic, note)
    return fig


def plot_grouped_bars(panels: Sequence[Tuple[str, Mapping[str, Mapping[str, Optional[float]]]]],
                      categories: Sequence[str], path, *, title: Optional[str] = None,
                      notes: Optional[Mapping[str, str]] = None, synthetic: bool = False,
                      note: Optional[str] = None) -> Path:
    """One grouped bar chart per panel, stacked vertically.

    Each panel is ``(y label, {series name: {category: value or None}})``; a missing or
    None value leaves a gap. ``notes`` writes a short text under a category's label
    (e.g. "missing"); ``synthetic`` marks the figure (title and a box) as drawn from
    synthetic data and ``note`` adds a figure-wide text of its own."""
    return save_figure(grouped_bars_figure(panels, categories, title=title, notes=notes,
                                           synthetic=synthetic, note=note), path)


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
        masks = read_mask_file(mask_file)[0]  # masks are the first field
    except (ValueError, OSError) as exc:
        warnings.warn(f"{mask_file}: no sparsity picture ({exc})")
        return None
    return sparsity_from_masks(masks)["layers"] or None


# segmentation's --split -> the split it evaluates on
_SEGMENTATION_EVAL = {"sbd": "seg11valid", "voc": "VOC val"}


def _text(value) -> Optional[str]:
    return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value) else None


def run_description(config: Mapping, metrics: Mapping, run_name: str) -> Dict[str, object]:
    """What the pictures of a run say about it, from its config.json and metrics.json:
    ``dataset`` (the task, or the data root's folder name), ``eval_split`` (classification's
    ``eval_split``; segmentation's evaluation list; the decathlon's val, marked when a
    train+val run also trained on it), ``name`` (dataset, method, arch) and ``synthetic``
    (either file has ``"synthetic": true``, or config.json under ``resolved``)."""
    def first(*keys):
        for source in (config, metrics):
            for key in keys:
                value = _text(source.get(key))
                if value:
                    return value
        return None

    seg_split = first("split") if first("split") in _SEGMENTATION_EVAL and not first("eval_split") else None
    dataset = first("task", "dataset")
    if dataset is None and seg_split is not None:
        dataset = "PASCAL VOC"
    if dataset is None and first("data_root"):
        dataset = Path(first("data_root")).name or None
    resolved = config.get("resolved") if isinstance(config.get("resolved"), Mapping) else {}
    given = _text(config.get("eval_split"))
    eval_split = _text(resolved.get("eval_split")) or (given if given != "auto" else None) \
        or _text(metrics.get("eval_split"))
    if eval_split is None and seg_split is not None:
        eval_split = _SEGMENTATION_EVAL[seg_split]
    if eval_split is None and ("trainval" in config or "val_is_held_out" in metrics):  # the decathlon
        trained_on = config.get("trainval") is True or metrics.get("val_is_held_out") is False
        eval_split = "val (also trained on)" if trained_on else "val"
    if eval_split is None:
        eval_split = _text(metrics.get("split"))
    name = " ".join(v for v in (dataset, first("method"), first("arch")) if v) or run_name
    synthetic = True in (config.get("synthetic"), metrics.get("synthetic"), resolved.get("synthetic"))
    return {"dataset": dataset, "eval_split": eval_split, "name": name, "synthetic": synthetic}


def expected_plots(run_dir) -> List[Path]:
    """The pictures a finished run promises: ``curves.png``, and ``sparsity.png`` when it
    trained masks."""
    run = Path(run_dir)
    metrics = _read_json(run / "metrics.json")
    masked = (run / "masks.safetensors").is_file() or (isinstance(metrics, dict) and metrics.get("sparsity_layers"))
    return [run / CURVES_PNG] + ([run / SPARSITY_PNG] if masked else [])


def save_run_plots(run_dir, only: Optional[Sequence[Path]] = None) -> List[Path]:
    """Write ``curves.png`` and (for runs with masks) ``sparsity.png`` into ``run_dir`` (or
    only those of ``only``); returns the files written (none when the folder holds nothing
    to draw). Titles and series labels name the dataset and evaluation split the run folder
    records (:func:`run_description`); a run marked ``"synthetic": true`` gets a visible note."""
    run = Path(run_dir)
    wanted = None if only is None else {Path(p).name for p in only}
    if not run.is_dir():
        return []
    config = _read_json(run / "config.json")
    config = config if isinstance(config, dict) else {}
    metrics = _read_json(run / "metrics.json")
    about = run_description(config, metrics if isinstance(metrics, dict) else {}, run.name)
    name, eval_split, synthetic = about["name"], about["eval_split"], bool(about["synthetic"])
    written = []
    split_note = f" (evaluated on {eval_split})" if eval_split else ""
    if wanted is None or CURVES_PNG in wanted:
        classes = _number((metrics if isinstance(metrics, dict) else {}).get("num_classes")) or \
            _number((config.get("resolved") or {}).get("num_classes")) or _number(config.get("num_classes"))
        curves = plot_training_curves(_read_log(run / "log.jsonl"), run / CURVES_PNG,
                                      title=f"{name}: training curves{split_note}", dataset=about["dataset"],
                                      eval_split=eval_split, synthetic=synthetic,
                                      chance=100.0 / classes if classes else None)
        if curves is not None:
            written.append(curves)
    layers = _layer_sparsity(run, metrics) if wanted is None or SPARSITY_PNG in wanted else None
    if layers:
        total = metrics.get("sparsity") if isinstance(metrics, dict) else None
        total = _number(total)
        suffix = f"\noverall {100 * total:.1f}% of the masked layers' weights" if total is not None else ""
        written.append(plot_sparsity(layers, run / SPARSITY_PNG, synthetic=synthetic,
                                     title=f"{name}: weights masked out per layer{suffix}"))
    return written
