"""Per-task image transforms for the decathlon: resize, crop, flip, normalise.

Two preprocessings (``PREPROCESSINGS``):

* ``square`` (this toolkit's, for the backbones it trains): the paper augments by random
  cropping, horizontal flipping and resizing of the entire image.  Training: the whole
  image is resized to a square of ``resize`` px (optionally a random scale of it), a random
  ``crop`` px window is taken and, where the task allows it, flipped.  Evaluation: the same
  square resize and the centre crop.
* ``resnet26`` (what the decathlon's published ResNet-26 was trained and evaluated with):
  the shorter side is resized to ``resize`` px keeping the aspect ratio, then a random
  ``crop`` px window (training, with flips) or the centre one (evaluation); gtsrb, omniglot
  and svhn take the centre ``resize`` px square in both, without flips.

Flips are off by default for gtsrb, omniglot and svhn (mirrored signs, characters and
digits change meaning).  Every task has its own normalisation (:mod:`decathlon.tasks`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from common.errors import DataError, UsageError
from decathlon.tasks import get_task

__all__ = ["DecathlonTransform", "build_transforms", "PREPROCESSINGS", "CENTRE_TASKS"]

PREPROCESSINGS = ("square", "resnet26")
# Tasks the published ResNet-26 saw as the centre square, unflipped, in training too.
CENTRE_TASKS = ("gtsrb", "omniglot", "svhn")


class DecathlonTransform:
    """RGB uint8 (H, W, 3) array -> normalised float tensor (3, crop, crop).

    Random choices come from the ``rng`` the dataset passes (seeded per sample), so the
    same sample at the same epoch is always augmented the same way.
    """

    uses_rng = True

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, train: bool,
                 resize: int = 72, crop: int = 64, hflip: bool = True,
                 scale: Tuple[float, float] = (1.0, 1.0), shorter_side: bool = False,
                 centre_train: bool = False):
        if crop > resize:
            raise UsageError(f"crop ({crop}) must not exceed resize ({resize})")
        lo, hi = scale
        if not 0 < lo <= hi:
            raise UsageError(f"scale range must satisfy 0 < low <= high, got {scale}")
        self.train, self.resize, self.crop = train, int(resize), int(crop)
        self.hflip, self.scale = bool(hflip), (float(lo), float(hi))
        self.shorter_side, self.centre_train = bool(shorter_side), bool(centre_train)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0

    def _square(self, img: np.ndarray, size: int) -> np.ndarray:
        """The whole image at ``size`` x ``size``, or (``shorter_side``) its shorter side at
        ``size`` px, the aspect ratio kept."""
        h, w = img.shape[:2]
        if self.shorter_side:
            short = min(h, w)
            if short == size:
                return img
            # the longer side as torchvision's Resize(int) computes it
            th, tw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        else:
            th, tw = size, size
        if (h, w) == (th, tw):
            return img
        interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR  # shrinking or not
        return cv2.resize(img, (tw, th), interpolation=interp)

    def _centre(self, img: np.ndarray, crop: int) -> np.ndarray:
        h, w = img.shape[:2]
        if self.shorter_side:  # as torchvision's CenterCrop rounds
            top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
        else:
            top, left = (h - crop) // 2, (w - crop) // 2
        return img[top:top + crop, left:left + crop]

    def __call__(self, img: np.ndarray, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        if img.ndim != 3 or img.shape[2] != 3:
            raise DataError(f"expected an RGB image of shape (H, W, 3), got {img.shape}")
        if self.train:
            rng = rng if rng is not None else np.random.default_rng()
            size = self.resize
            if self.scale != (1.0, 1.0):
                size = max(self.crop, int(round(self.resize * rng.uniform(*self.scale))))
            img = self._square(img, size)
            if self.centre_train:
                img = self._centre(img, self.crop)
            else:
                h, w = img.shape[:2]
                top = int(rng.integers(0, h - self.crop + 1))
                left = int(rng.integers(0, w - self.crop + 1))
                img = img[top:top + self.crop, left:left + self.crop]
            if self.hflip and rng.random() < 0.5:
                img = img[:, ::-1]
        else:
            img = self._centre(self._square(img, self.resize), self.crop)
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(train={self.train}, resize={self.resize}, crop={self.crop}, "
                f"hflip={self.hflip}, scale={self.scale}, shorter_side={self.shorter_side}, "
                f"centre_train={self.centre_train})")


def build_transforms(task: str, train: bool, *, resize: int = 72, crop: int = 64,
                     hflip: Optional[bool] = None, scale: Tuple[float, float] = (1.0, 1.0),
                     preprocess: str = "square") -> DecathlonTransform:
    """The transform of ``task`` under ``preprocess`` (module docstring): its
    normalisation, and its flip policy unless ``hflip`` overrides it.  ``scale`` randomly
    rescales the image at train time."""
    if preprocess not in PREPROCESSINGS:
        raise UsageError(f"preprocessing {preprocess!r}; expected one of {', '.join(PREPROCESSINGS)}")
    spec = get_task(task)
    centre = preprocess == "resnet26" and task in CENTRE_TASKS
    return DecathlonTransform(spec.mean, spec.std, train=train, resize=resize, crop=resize if centre else crop,
                              hflip=(spec.hflip and not centre) if hflip is None else hflip, scale=scale,
                              shorter_side=preprocess == "resnet26", centre_train=centre)
