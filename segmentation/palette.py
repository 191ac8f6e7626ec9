"""The PASCAL VOC colour palette and the pictures made with it.

Label and prediction maps are written as palette PNGs whose indices are the class ids,
exactly like VOC's ``SegmentationClass`` files, so a saved prediction can be read back
with :func:`segmentation.data.read_voc_label`. Overview pictures put the input, the
ground truth and the prediction side by side for people to look at: every panel at the
image's own resolution or an integer multiple of it (never smaller), captioned (image id,
the prediction's IoU), with a legend of the classes present. Files are written with
:func:`common.atomic.atomic_write_bytes` (whole or not at all, mode 0644 under the usual
umask).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from common.errors import DataError
from common.atomic import atomic_write_bytes

__all__ = ["voc_palette", "label_to_png", "colorize", "save_label_png", "save_overview",
           "IGNORE_NAME"]

IGNORE_INDEX = 255
IGNORE_NAME = "void (ignored)"


def voc_palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 VOC colours: the bits of the index are spread over the high bits of
    R, G and B in turn (0 -> black, 1 -> (128,0,0), ..., 255 -> (224,224,192))."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            shift = 7 - bit
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = (r, g, b)
    return colours


_PALETTE = voc_palette()


def label_to_png(label: np.ndarray) -> Image.Image:
    """A palette ('P') image whose pixel values are the class ids of ``label``."""
    label = np.asarray(label)
    if label.ndim != 2 or label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise DataError(f"label map must be H x W with values 0..255, got shape {label.shape}")
    img = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label, dtype=np.uint8).tobytes())
    img.putpalette(_PALETTE.reshape(-1).tolist())
    return img


def colorize(label: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB rendering of a class map with the VOC palette."""
    return _PALETTE[np.asarray(label, dtype=np.uint8)]


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def save_label_png(label: np.ndarray, path) -> Path:
    """Write ``label`` as a VOC-style palette PNG (atomically)."""
    return atomic_write_bytes(path, _png_bytes(label_to_png(label)))


# Layout of an overview, in pixels.
_MARGIN, _CAPTION, _LEGEND_ROW, _MIN_PANEL = 12, 46, 22, 240


def _legend_entries(labels: Sequence[np.ndarray], names: Optional[Sequence[str]]):
    present = sorted(set(int(v) for lab in labels for v in np.unique(lab)))
    entries = []
    for v in present:
        if v == IGNORE_INDEX:
            name = IGNORE_NAME
        elif names is not None and v < len(names):
            name = f"{v} {names[v]}"
        else:
            name = f"class {v}"
        entries.append((name, _PALETTE[v] / 255.0))
    return entries


def save_overview(image: np.ndarray, prediction: np.ndarray, path,
                  target: Optional[np.ndarray] = None, gap: int = 8, *,
                  image_id: Optional[str] = None, iou: Optional[float] = None,
                  class_names: Optional[Sequence[str]] = None, synthetic: bool = False) -> Path:
    """Input | ground truth (when given) | prediction, side by side, as an RGB PNG.

    Panels are the image's own size, enlarged by an integer factor (nearest neighbour)
    when the image is smaller than 240 px, so nothing is lost to resampling. Captions
    name the panels, ``image_id`` and the prediction's mean ``iou`` (a fraction); the legend
    lists the classes present in the ground truth and the prediction, named from
    ``class_names`` (default: the 21 VOC classes). ``synthetic`` puts the badge every picture
    made from synthetic data carries across the top."""
    from common.plots import save_figure, _pyplot
    from matplotlib.patches import Patch

    if class_names is None:
        from .data import class_names as voc_class_names
        class_names = voc_class_names()
    image = np.asarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    for name, lab in (("prediction", prediction), ("target", target)):
        if lab is not None and np.asarray(lab).shape != (h, w):
            raise DataError(f"{name} map of shape {np.asarray(lab).shape} does not match the "
                            f"{w}x{h} image")
    scale = max(1, math.ceil(_MIN_PANEL / max(h, w)))
    panels = [("image" + (f" {image_id}" if image_id else ""), image)]
    if target is not None:
        panels.append(("ground truth", colorize(target)))
    caption = "prediction" + (f" (mean IoU {100 * iou:.1f}%)" if iou is not None and iou == iou else "")
    panels.append((caption, colorize(prediction)))
    entries = _legend_entries([lab for lab in (target, prediction) if lab is not None], class_names)
    ph, pw = h * scale, w * scale
    width = 2 * _MARGIN + len(panels) * pw + (len(panels) - 1) * gap
    per_row = max(1, width // 150)
    legend_h = _LEGEND_ROW * math.ceil(len(entries) / per_row) + _MARGIN
    badge = _CAPTION if synthetic else 0
    height = badge + _CAPTION + ph + legend_h + _MARGIN
    dpi = 100
    plt = _pyplot()
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    fig.patch.set_facecolor("white")
    for k, (title, panel) in enumerate(panels):
        x = _MARGIN + k * (pw + gap)
        big = np.repeat(np.repeat(panel, scale, axis=0), scale, axis=1)
        # figimage places the pixels as they are: no resampling, origin at the bottom left
        fig.figimage(big, xo=x, yo=legend_h + _MARGIN, origin="upper")
        fig.text((x + pw / 2) / width, 1 - (badge + _CAPTION / 2) / height, title, ha="center",
                 va="center", fontsize=10, wrap=True)
    if synthetic:
        from common.plots import SYNTHETIC_NOTE
        fig.text(0.5, 1 - (badge / 2) / height, SYNTHETIC_NOTE + ": not a measured result", ha="center", va="center",
                 fontsize=10, fontweight="bold", color="#8a3b00",
                 bbox=dict(boxstyle="round,pad=0.3", facecolor="#fff1d6", edgecolor="#d08a2e"))
    handles = [Patch(facecolor=c, edgecolor="black", linewidth=0.5, label=n) for n, c in entries]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(per_row, len(handles)),
                   fontsize=8, frameon=False, bbox_to_anchor=(0.5, _MARGIN / 2 / height),
                   handlelength=1.2, columnspacing=1.0)
    return save_figure(fig, path, dpi=dpi)
