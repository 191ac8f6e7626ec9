"""Synthetic ImageFolder trees: ``DIR/train/<class>/*.jpg`` and ``DIR/test/<class>/*.jpg``.

For the benchmarks and tests on machines with no dataset. Each image is its class's colour
with pixel noise, square, written as a JPEG (or PNG): the decoding, cropping and resizing
cost per image is that of real photographs of the same size, and a network tells the
classes apart within an epoch. The tree carries :data:`common.synthetic.MARKER`: results
on it say nothing about the method.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import UsageError
from common.synthetic import mark_synthetic

__all__ = ["write_synthetic_image_folder"]

FORMATS = {"jpg": {"quality": 90}, "png": {}}


def write_synthetic_image_folder(root, *, classes: int = 10, train_per_class: int = 32, test_per_class: int = 4,
                                 side: int = 256, image_format: str = "jpg", seed: int = 0) -> Path:
    """Write ``classes`` classes (``class00``, ``class01``, ...) of ``train_per_class``
    training and ``test_per_class`` test images of ``side`` x ``side`` pixels under
    ``root``, which must not exist or be empty. Returns ``root``."""
    if image_format not in FORMATS:
        raise UsageError(f"image format {image_format!r}: expected one of {', '.join(FORMATS)}")
    for name, value in (("classes", classes), ("train_per_class", train_per_class),
                        ("test_per_class", test_per_class), ("side", side)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UsageError(f"{root} exists and is not an empty folder; choose a new one for the synthetic tree")
    rng = np.random.default_rng(seed)
    colours = rng.uniform(30, 225, size=(classes, 3))
    mark_synthetic(root)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = colours[c] + rng.normal(0, 25, size=(side, side, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    folder / f"{i:05d}.{image_format}", **FORMATS[image_format])
    return root
