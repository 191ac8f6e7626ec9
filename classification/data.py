"""ImageFolder datasets and the paper's section 4 augmentation.

A data root holds ``train/<class>/*`` and ``test/<class>/*`` (or ``val/<class>/*``);
classes are the sub-folder names in sorted order and must be the same in every split.
Images are decoded by :func:`common.images.decode_rgb` (gray digits become three equal
channels, 16-bit files are scaled rather than clipped, alpha is composited on white).

Before the first step a training command calls :func:`check_splits` (empty class
folders, a single class, classes present in only one split, a ``--train-limit`` /
``--eval-limit`` too small to keep every class) and may call :func:`scan_images` to find
unreadable files; those can be dropped with ``ImageFolderDataset(..., exclude=...)``.
The scan result is cached by (path, size, mtime) so a resumed run does not repeat it.

Training samples get a random resized crop (a random area fraction in ``crop_scale``
and aspect ratio in [3/4, 4/3], resized to ``size`` px) and a horizontal flip with
probability 1/2; evaluation resizes the shorter side to ``eval_resize`` and takes the
centre ``size`` px crop (or, ``eval_mode="squash"``, resizes the whole image to ``size`` x
``size``). With ``size=224``, ``eval_resize=256``, ``crop_scale=(0.08, 1)``
this is the usual ImageNet-style transfer setting the paper's section 4 trains with.
Random choices come from a generator seeded by ``(seed, epoch, index)``, so a resumed run
sees exactly the augmentations an uninterrupted one would.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import DataError, MissingFileError, UsageError
from common.images import decode_rgb, to_rgb

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ClassificationTransform", "ImageFolderDataset",
           "resolve_split", "random_resized_crop_box", "subset_indices", 
           "EVAL_SPLITS", "EVAL_MODES", "check_splits", "scan_images"]

# Evaluation: "crop" resizes the shorter side to eval_resize and takes the centre size
# crop; "squash" resizes the whole image to size x size (the piggyback authors' *_cropped
# datasets, already cropped to their object).
EVAL_MODES = ("crop", "squash")
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
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 eval_mode: str = "crop"):
        eval_resize = int(round(size * 256 / 224)) if eval_resize is None else int(eval_resize)
        if size < 1 or eval_resize < size:
            raise UsageError(f"need 1 <= size <= eval_resize, got size {size}, eval_resize {eval_resize}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise UsageError(f"crop scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")
        if eval_mode not in EVAL_MODES:
            raise UsageError(f"evaluation mode {eval_mode!r}; expected one of {', '.join(EVAL_MODES)}")
        self.train, self.size, self.eval_resize, self.eval_mode = bool(train), int(size), eval_resize, eval_mode
        self.crop_scale, self.hflip = (float(crop_scale[0]), float(crop_scale[1])), bool(hflip)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        from PIL import Image

        img = to_rgb(img)
        if self.train:
            rng = rng if rng is not None else np.random.default_rng()
            left, top, w, h = random_resized_crop_box(img.width, img.height, self.crop_scale, rng)
            img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
            if self.hflip and rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        elif self.eval_mode == "squash":  # the whole image to size x size (pre-cropped datasets)
            if (img.width, img.height) != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BILINEAR)
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
                f"crop_scale={self.crop_scale}, hflip={self.hflip}, eval_mode={self.eval_mode!r})")


def resolve_split(root: Union[str, Path], split: str, order: Sequence[str] = EVAL_SPLITS) -> str:
    """``train``, ``test`` or ``val``; ``auto`` is the first of ``order`` whose folder
    exists (``test`` before ``val`` by default: what an evaluation scores)."""
    root = Path(root)
    if split != "auto":
        return split
    for name in order:
        if (root / name).is_dir():
            return name
    raise MissingFileError(f"{root} has neither test/ nor val/ (expected {root}/test/<class>/*)")


def unread_text(counts: Dict[str, int]) -> str:
    """``12 .gif files, 1 .svg file (readable: .jpg, ...)``: what a folder held that is not read."""
    kinds = ", ".join(f"{n} {ext} file{'s' if n > 1 else ''}" for ext, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{kinds} (readable: {', '.join(IMG_EXTENSIONS)})"


def _scan(folder: Path) -> Tuple[List[str], List[Tuple[str, int]], List[Dict[str, int]]]:
    if not folder.is_dir():
        raise MissingFileError(f"{folder} is not a folder (expected an ImageFolder tree "
                               f"{folder}/<class>/<image>)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} has no class sub-folders")
    samples, unread = [], []
    for c, name in enumerate(classes):
        files, other = [], {}
        for p in sorted((folder / name).rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix.lower() in IMG_EXTENSIONS:
                files.append(p)
            else:
                ext = p.suffix.lower() or "(no extension)"
                other[ext] = other.get(ext, 0) + 1
        samples.extend((str(p), c) for p in files)
        unread.append(other)
    if not samples:
        total: Dict[str, int] = {}
        for other in unread:
            for ext, n in other.items():
                total[ext] = total.get(ext, 0) + n
        held = f": {unread_text(total)}" if total else f" ({', '.join(IMG_EXTENSIONS)})"
        raise DataError(f"{folder} holds no images this toolkit reads{held}")
    return classes, samples, unread


def _class_quota(counts: np.ndarray, n: int) -> np.ndarray:
    """Images per class in a subset of ``n``: proportional, largest remainders."""
    quota = counts * n / counts.sum()
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]:
        take[i] += 1
    return take


def subset_indices(targets: Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` samples, each class represented in proportion to its
    size (largest remainders), drawn with ``seed``."""
    targets = np.asarray(targets)
    if n >= len(targets):
        return np.arange(len(targets))
    classes, counts = np.unique(targets, return_counts=True)
    take = _class_quota(counts, n)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(targets == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def _normpath(path) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


class ImageFolderDataset(Dataset):
    """One split of an ImageFolder tree; ``limit`` keeps a class-balanced subset of that
    many images (the same one for every seed).

    ``exclude`` names image files to leave out (e.g. the unreadable ones
    :func:`scan_images` found); they are dropped before ``limit`` picks its subset and
    listed in ``excluded``. ``class_counts`` holds the images per class before ``limit``
    (after ``exclude``), which :func:`check_splits` reads."""

    def __init__(self, root: Union[str, Path], split: str, transform=None, *, seed: int = 0,
                 limit: Optional[int] = None, classes: Optional[Sequence[str]] = None,
                 exclude: Optional[Iterable[Union[str, os.PathLike]]] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"data root {self.root} is not a folder (expected "
                                   f"{self.root}/train/<class>/* and test/ or val/)")
        self.split = resolve_split(self.root, split)
        self.classes, samples, self.unread = _scan(self.root / self.split)
        if classes is not None and list(classes) != self.classes:
            raise DataError(f"{self.root / self.split} has classes {self.classes[:5]}... "
                            f"({len(self.classes)}), the training split has {list(classes)[:5]}... "
                            f"({len(classes)}): the splits must hold the same class folders"
                            f"{_class_difference('training split', classes, self.split, self.classes)}")
        self.excluded: List[str] = []
        if exclude is not None:
            drop = {_normpath(p) for p in exclude}
            if drop:
                self.excluded = [p for p, _ in samples if _normpath(p) in drop]
                samples = [(p, t) for p, t in samples if _normpath(p) not in drop]
        self.class_counts: List[int] = np.bincount(np.asarray([t for _, t in samples], dtype=np.int64),
                                                   minlength=len(self.classes)).tolist()
        self.limit = None if limit is None else int(limit)
        if limit is not None and samples:
            keep = subset_indices([t for _, t in samples], int(limit))
            samples = [samples[i] for i in keep]
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.seed, self.epoch = int(seed), 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def paths(self) -> List[str]:
        """The image files of this split (after ``exclude`` and ``limit``), in order."""
        return [p for p, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def load(self, index: int):
        path, _ = self.samples[index]
        return decode_rgb(path)

    def __getitem__(self, index: int):
        img = self.load(index)
        target = self.targets[index]
        if self.transform is None:
            return img, target
        if getattr(self.transform, "uses_rng", False):
            return self.transform(img, rng=np.random.default_rng([self.seed, self.epoch, index])), target
        return self.transform(img), target


def _names(items: Sequence[str], at_most: int = 5) -> str:
    shown = ", ".join(repr(x) for x in items[:at_most])
    return shown + (f" and {len(items) - at_most} more" if len(items) > at_most else "")


def _class_difference(a_name: str, a: Sequence[str], b_name: str, b: Sequence[str]) -> str:
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    parts = [f"only in {name}: {_names(only)}" for name, only in ((a_name, only_a), (b_name, only_b)) if only]
    return f" ({'; '.join(parts)})" if parts else ""


def _smallest_full_limit(counts: np.ndarray) -> int:
    """The smallest subset size whose proportional quota gives every class an image."""
    k, total = len(counts), int(counts.sum())
    bound = min(total, int(math.ceil(total / max(int(counts.min()), 1))))
    for n in range(k, min(bound, k + 4096) + 1):
        if _class_quota(counts, n).min() >= 1:
            return n
    return bound


def _check_limit(dataset: ImageFolderDataset, limit: Optional[int], flag: str) -> None:
    counts = np.asarray(dataset.class_counts)
    if limit is None or limit >= counts.sum():
        return
    take = _class_quota(counts, int(limit))
    empty = [dataset.classes[i] for i in np.flatnonzero(take == 0)]
    if empty:
        raise DataError(f"{flag} {limit} leaves {len(empty)} of the {len(counts)} classes of "
                        f"{dataset.root / dataset.split} without images ({_names(empty, 3)}); "
                        f"use a limit of at least {_smallest_full_limit(counts)} "
                        f"(there are {len(counts)} classes)")


def check_splits(train_set: ImageFolderDataset, eval_set: ImageFolderDataset, *,
                 train_limit: Optional[int] = None, eval_limit: Optional[int] = None) -> None:
    """Refuse, with one line, a pair of splits a classifier cannot be trained and scored on:
    classes that differ between the splits (naming those only in one), a single class, a
    class folder without images (naming it) or a ``--train-limit`` / ``--eval-limit`` that
    leaves a class without images (naming the limit and suggesting one that keeps every
    class). The limits default to the ones the datasets were built with."""
    if list(train_set.classes) != list(eval_set.classes):
        raise DataError(f"the training split {train_set.root / train_set.split} and the evaluation split "
                        f"{eval_set.root / eval_set.split} must hold the same class folders"
                        f"{_class_difference(train_set.split, train_set.classes, eval_set.split, eval_set.classes)}")
    if train_set.num_classes < 2:
        raise DataError(f"{train_set.root / train_set.split} holds a single class folder "
                        f"({_names(train_set.classes)}); a classifier needs at least 2 classes")
    for dataset in (train_set, eval_set):
        empty = [c for c, n in zip(dataset.classes, dataset.class_counts) if n == 0]
        if empty:
            folder = dataset.root / dataset.split / empty[0]
            more = f" (and {len(empty) - 1} more empty class folders)" if len(empty) > 1 else ""
            excluded = f" after excluding {len(dataset.excluded)} unreadable files" if dataset.excluded else ""
            other = dataset.unread[dataset.classes.index(empty[0])]
            held = f" this toolkit reads, only {unread_text(other)}" if other else ""
            raise DataError(f"class folder {folder} holds no images{held}{excluded}{more}; "
                            f"add images or remove the folder from every split")
    for dataset, limit, flag in ((train_set, train_limit, "--train-limit"),
                                 (eval_set, eval_limit, "--eval-limit")):
        _check_limit(dataset, dataset.limit if limit is None else int(limit), flag)


_SCAN_FORMAT = 1


def _file_key(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _read_scan_cache(cache_path: Path) -> Dict[str, dict]:
    try:
        data = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or damaged: scan again
    if not isinstance(data, dict) or data.get("format") != _SCAN_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return {k: v for k, v in data["files"].items() if isinstance(v, dict)}


def scan_images(paths: Iterable[Union[str, os.PathLike]],
                cache_path: Union[None, str, os.PathLike] = None) -> List[Tuple[str, str]]:
    """``(path, reason)`` for every file of ``paths`` that :func:`decode_rgb` cannot read
    (missing, corrupt, truncated), in the order given; an empty list when all decode.

    Each file is fully decoded once. With ``cache_path`` the result per file is kept in a
    JSON file keyed by absolute path, size and modification time (written atomically, also
    every few thousand files so an interrupted scan keeps its progress); a later call
    decodes only the files that are new or changed since."""
    from common.atomic import atomic_write_json

    cache_file = Path(cache_path) if cache_path is not None else None
    cache = _read_scan_cache(cache_file) if cache_file is not None else {}
    bad: List[Tuple[str, str]] = []
    fresh = 0
    last_write = time.monotonic()

    def save() -> None:
        atomic_write_json(cache_file, {"format": _SCAN_FORMAT, "files": cache}, indent=None)

    for path in paths:
        path = os.fspath(path)
        key = _normpath(path)
        stamp = _file_key(path)
        if stamp is None:
            bad.append((path, "does not exist or cannot be read"))
            cache.pop(key, None)
            continue
        entry = cache.get(key)
        if entry is not None and [entry.get("size"), entry.get("mtime_ns")] == list(stamp):
            reason = entry.get("reason")
        else:
            try:
                decode_rgb(path)
                reason = None
            except MissingFileError:
                reason = "does not exist or cannot be read"
            except DataError as exc:
                reason = getattr(exc, "reason", str(exc))
            cache[key] = {"size": stamp[0], "mtime_ns": stamp[1], "reason": reason}
            fresh += 1
            if cache_file is not None and fresh % 2000 == 0 and time.monotonic() - last_write > 10:
                save()
                last_write = time.monotonic()
        if reason is not None:
            bad.append((path, str(reason)))
    if cache_file is not None and fresh:
        save()
    return bad
