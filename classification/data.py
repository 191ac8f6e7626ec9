"""ImageFolder datasets and the paper's section 4 augmentation.

A data root holds ``train/<class>/*`` and ``test/<class>/*`` (or ``val/<class>/*``);
classes are the sub-folder names in sorted order and must be the same in every split.
Images are decoded with PIL and converted to RGB (gray digits become three equal
channels).

Training samples get a random resized crop (a random area fraction in ``crop_scale``
and aspect ratio in [3/4, 4/3], resized to ``size`` px) and a horizontal flip with
probability 1/2; evaluation resizes the shorter side to ``eval_resize`` and takes the
centre ``size`` px crop. With ``size=224``, ``eval_resize=256``, ``crop_scale=(0.08, 1)``
this is the usual ImageNet-style transfer setting the paper's section 4 trains with.
Random choices come from a generator seeded by ``(seed, epoch, index)``, so a resumed run
sees exactly the augmentations an uninterrupted one would.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import DataError, MissingFileError, UsageError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ClassificationTransform", "ImageFolderDataset",
           "resolve_split", "random_resized_crop_box", "subset_indices", "build_loader", "set_loader_epoch",
           "EVAL_SPLITS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_SPLITS = ("test", "val")
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def random_resized_crop_box(width: int, height: int, scale: Tuple[float, float],
                            rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """(left, top, w, h) of a crop covering a random fraction in ``scale`` of the image
    with a log-uniform aspect ratio in [3/4, 4/3]; after 10 misses the largest centred
    crop whose ratio is within range (torchvision's RandomResizedCrop rule)."""
    area = width * height
    log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, int(round(width / _RATIO[0]))
    elif in_ratio > _RATIO[1]:
        w, h = int(round(height * _RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ClassificationTransform:
    """PIL image -> normalised float tensor (3, size, size)."""

    uses_rng = True

    def __init__(self, *, train: bool, size: int = 224, eval_resize: Optional[int] = None,
                 crop_scale: Tuple[float, float] = (0.08, 1.0), hflip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        eval_resize = int(round(size * 256 / 224)) if eval_resize is None else int(eval_resize)
        if size < 1 or eval_resize < size:
            raise UsageError(f"need 1 <= size <= eval_resize, got size {size}, eval_resize {eval_resize}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise UsageError(f"crop scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")
        self.train, self.size, self.eval_resize = bool(train), int(size), eval_resize
        self.crop_scale, self.hflip = (float(crop_scale[0]), float(crop_scale[1])), bool(hflip)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        from PIL import Image

        img = img.convert("RGB")
        if self.train:
            rng = rng if rng is not None else np.random.default_rng()
            left, top, w, h = random_resized_crop_box(img.width, img.height, self.crop_scale, rng)
            img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
            if self.hflip and rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            short = min(img.width, img.height)
            if short != self.eval_resize:
                scale = self.eval_resize / short
                img = img.resize((max(self.eval_resize, int(round(img.width * scale))),
                                  max(self.eval_resize, int(round(img.height * scale)))), Image.BILINEAR)
            left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(train={self.train}, size={self.size}, eval_resize={self.eval_resize}, "
                f"crop_scale={self.crop_scale}, hflip={self.hflip})")


def resolve_split(root: Union[str, Path], split: str) -> str:
    """``train``, ``test`` or ``val``; ``auto`` is ``test`` when that folder exists, else ``val``."""
    root = Path(root)
    if split != "auto":
        return split
    for name in EVAL_SPLITS:
        if (root / name).is_dir():
            return name
    raise MissingFileError(f"{root} has neither test/ nor val/ (expected {root}/test/<class>/*)")


def _scan(folder: Path) -> Tuple[List[str], List[Tuple[str, int]]]:
    if not folder.is_dir():
        raise MissingFileError(f"{folder} is not a folder (expected an ImageFolder tree "
                               f"{folder}/<class>/<image>)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} has no class sub-folders")
    samples = []
    for c, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        samples.extend((str(p), c) for p in files)
    if not samples:
        raise DataError(f"{folder} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return classes, samples


def subset_indices(targets: Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` samples, each class represented in proportion to its
    size (largest remainders), drawn with ``seed``."""
    targets = np.asarray(targets)
    if n >= len(targets):
        return np.arange(len(targets))
    classes, counts = np.unique(targets, return_counts=True)
    quota = counts * n / len(targets)
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(targets == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


class ImageFolderDataset(Dataset):
    """One split of an ImageFolder tree; ``limit`` keeps a class-balanced subset of that
    many images (the same one for every seed)."""

    def __init__(self, root: Union[str, Path], split: str, transform=None, *, seed: int = 0,
                 limit: Optional[int] = None, classes: Optional[Sequence[str]] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"data root {self.root} is not a folder (expected "
                                   f"{self.root}/train/<class>/* and test/ or val/)")
        self.split = resolve_split(self.root, split)
        self.classes, samples = _scan(self.root / self.split)
        if classes is not None and list(classes) != self.classes:
            raise DataError(f"{self.root / self.split} has classes {self.classes[:5]}... "
                            f"({len(self.classes)}), the training split has {list(classes)[:5]}... "
                            f"({len(classes)}): the splits must hold the same class folders")
        if limit is not None:
            keep = subset_indices([t for _, t in samples], int(limit))
            samples = [samples[i] for i in keep]
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.seed, self.epoch = int(seed), 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def load(self, index: int):
        from PIL import Image, UnidentifiedImageError

        path, _ = self.samples[index]
        try:
            with Image.open(path) as img:
                img.load()
                return img
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"image {path} could not be decoded ({exc})") from None

    def __getitem__(self, index: int):
        img = self.load(index)
        target = self.targets[index]
        if self.transform is None:
            return img, target
        if getattr(self.transform, "uses_rng", False):
            return self.transform(img, rng=np.random.default_rng([self.seed, self.epoch, index])), target
        return self.transform(img), target


def build_loader(dataset: Dataset, *, batch_size: int, train: bool, workers: int = 0,
                 dist_info=None, seed: int = 0, pin_memory: bool = False):
    """A DataLoader whose order and worker seeds depend on ``(seed, epoch, rank)`` only
    (call :func:`set_loader_epoch` before each epoch); distributed runs shard it.

    Training drops the last incomplete batch (when there is a complete one): batch-norm
    layers that train (finetuning, ``--train-bn``) would otherwise fold the statistics of
    a handful of images into their running averages at the end of every epoch, and the
    evaluation that follows reads exactly those."""
    from torch.utils.data import DataLoader

    from common.distributed import make_sampler
    from common.seed import epoch_generator, worker_init_fn

    rank = dist_info.rank if dist_info is not None else 0
    loader = DataLoader(dataset, batch_size=batch_size, sampler=make_sampler(dataset, dist_info, train, seed),
                        num_workers=workers, pin_memory=pin_memory,
                        drop_last=train and len(dataset) >= batch_size * (dist_info.world_size if dist_info else 1),
                        generator=epoch_generator(seed, 0, rank), worker_init_fn=worker_init_fn,
                        persistent_workers=False)  # workers must see set_epoch's value
    loader.seed_and_rank = (int(seed), rank)
    return loader


def set_loader_epoch(loader, epoch: int) -> None:
    """Sampler order, worker seeds and per-sample augmentation seeds of ``epoch``."""
    from common.seed import reseed_loader

    seed, rank = loader.seed_and_rank
    reseed_loader(loader, seed, epoch, rank)
    loader.dataset.set_epoch(epoch)
