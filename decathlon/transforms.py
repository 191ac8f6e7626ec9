"""Per-task image transforms for the decathlon: whole-image resize, crop, flip, normalise.

The paper augments by random cropping, horizontal flipping and resizing of the entire
image.  Training: the whole image is resized to a square of ``resize`` px (optionally a
random scale of it), a random ``crop`` px window is taken and, where the task allows it,
flipped.  Evaluation: the same square resize and the centre crop.  Flips are off by default
for gtsrb, omniglot and svhn (mirrored signs, characters and digits change meaning).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from common.errors import DataError, UsageError
from decathlon.tasks import get_task

__all__ = ["DecathlonTransform", "build_transforms"]


class DecathlonTransform:
    """RGB uint8 (H, W, 3) array -> normalised float tensor (3, crop, crop).

    Random choices come from the ``rng`` the dataset passes (seeded per sample), so the
    same sample at the same epoch is always augmented the same way.
    """

    uses_rng = True

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, train: bool,
                 resize: int = 72, crop: int = 64, hflip: bool = True,
                 scale: Tuple[float, float] = (1.0, 1.0)):
        if crop > resize:
            raise UsageError(f"crop ({crop}) must not exceed resize ({resize})")
        lo, hi = scale
        if not 0 < lo <= hi:
            raise UsageError(f"scale range must satisfy 0 < low <= high, got {scale}")
        self.train, self.resize, self.crop = train, int(resize), int(crop)
        self.hflip, self.scale = bool(hflip), (float(lo), float(hi))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0

    def _square(self, img: np.ndarray, size: int) -> np.ndarray:
        h, w = img.shape[:2]
        if (h, w) == (size, size):
            return img
        interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
        return cv2.resize(img, (size, size), interpolation=interp)

    def __call__(self, img: np.ndarray, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        if img.ndim != 3 or img.shape[2] != 3:
            raise DataError(f"expected an RGB image of shape (H, W, 3), got {img.shape}")
        if self.train:
            rng = rng if rng is not None else np.random.default_rng()
            size = self.resize
            if self.scale != (1.0, 1.0):
                size = max(self.crop, int(round(self.resize * rng.uniform(*self.scale))))
            img = self._square(img, size)
            top = int(rng.integers(0, size - self.crop + 1))
            left = int(rng.integers(0, size - self.crop + 1))
            img = img[top:top + self.crop, left:left + self.crop]
            if self.hflip and rng.random() < 0.5:
                img = img[:, ::-1]
        else:
            img = self._square(img, self.resize)
            off = (self.resize - self.crop) // 2
            img = img[off:off + self.crop, off:off + self.crop]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(train={self.train}, resize={self.resize}, crop={self.crop}, "
                f"hflip={self.hflip}, scale={self.scale})")


def build_transforms(task: str, train: bool, *, resize: int = 72, crop: int = 64,
                     hflip: Optional[bool] = None,
                     scale: Tuple[float, float] = (1.0, 1.0)) -> DecathlonTransform:
    """The transform of ``task``: its normalisation, and its flip policy unless ``hflip``
    overrides it.  ``scale`` randomly rescales the whole image at train time."""
    spec = get_task(task)
    return DecathlonTransform(spec.mean, spec.std, train=train, resize=resize, crop=crop,
                              hflip=spec.hflip if hflip is None else hflip, scale=scale)
