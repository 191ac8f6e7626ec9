"""The PASCAL VOC colour palette and the pictures made with it.

Label and prediction maps are written as palette PNGs whose indices are the class ids,
exactly like VOC's ``SegmentationClass`` files, so a saved prediction can be read back
with :func:`segmentation.data.read_voc_label`. Overview pictures put the input, the
ground truth and the prediction side by side for people to look at.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

__all__ = ["voc_palette", "label_to_png", "colorize", "save_label_png", "save_overview"]


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
        raise ValueError(f"label map must be H x W with values 0..255, got shape {label.shape}")
    img = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label, dtype=np.uint8).tobytes())
    img.putpalette(_PALETTE.reshape(-1).tolist())
    return img


def colorize(label: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB rendering of a class map with the VOC palette."""
    return _PALETTE[np.asarray(label, dtype=np.uint8)]


def _atomic_save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_label_png(label: np.ndarray, path) -> Path:
    """Write ``label`` as a VOC-style palette PNG (atomically)."""
    path = Path(path)
    _atomic_save(label_to_png(label), path)
    return path


def save_overview(image: np.ndarray, prediction: np.ndarray, path,
                  target: Optional[np.ndarray] = None, gap: int = 4) -> Path:
    """Input | ground truth (when given) | prediction, side by side, as an RGB PNG."""
    panels = [np.asarray(image, dtype=np.uint8)]
    if target is not None:
        panels.append(colorize(target))
    panels.append(colorize(prediction))
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = np.full((h, w, 3), 255, dtype=np.uint8)
    x = 0
    for p in panels:
        canvas[:p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + gap
    path = Path(path)
    _atomic_save(Image.fromarray(canvas), path)
    return path
