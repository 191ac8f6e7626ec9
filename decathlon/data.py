"""Visual Decathlon data: annotation reading, image decoding, decoded-image cache, loaders.

The data root is the unpacked ``decathlon-1.0`` folder; ``annotations/<task>_<split>.json``
are COCO-style JSON files whose ``file_name`` is relative to the root.
A sample's class is ``category_id - P - 1`` (never derived from the category name: names
sort as strings).  The stripped test split has no labels; its targets are -1 and its image
ids are kept for the submission file.

Augmentation randomness is drawn from a generator seeded by ``(seed, epoch, index)``, so
samples do not depend on worker count, process count or on where a run was resumed.
Augmentation itself lives in :mod:`decathlon.transforms`.

Images are decoded by :func:`common.images.decode_rgb` (16-bit files scaled, alpha
composited on white, EXIF orientation applied as OpenCV did before).  Decoders can
accept a truncated JPEG or PNG (OpenCV fills the missing rows with grey), so
:func:`load_image` first checks that the file ends as its format requires and refuses a
partial file naming it.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import DataError, MissingFileError, UsageError
from common.images import load_rgb_array
from decathlon.cache import DecodedCache
from decathlon.tasks import TaskSpec, get_task
from decathlon.transforms import build_transforms

__all__ = ["DecathlonDataset", "SPLITS", "annotation_path", "load_image", "check_complete",
           "build_transforms"]

# split name -> annotation file suffixes it is made of
SPLITS = {"train": ("train",), "val": ("val",), "train+val": ("train", "val"),
          "test": ("test_stripped",)}


def annotation_path(root: Union[str, Path], task: str, part: str) -> Path:
    return Path(root) / "annotations" / f"{task}_{part}.json"


_JPEG_SOI, _JPEG_SOS, _JPEG_EOI = b"\xff\xd8", b"\xff\xda", b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # the last chunk: type and its fixed CRC


def check_complete(data: bytes, path: Path, what: str = "") -> None:
    """Refuse a JPEG without its end-of-image marker after the last scan, or a PNG without
    its IEND chunk: a file cut short (an interrupted copy or download) that OpenCV would
    decode partially, silently."""
    if data[:2] == _JPEG_SOI:
        sos = data.rfind(_JPEG_SOS)
        # Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so
        # the first 0xFFD9 after the last scan header is the real end; bytes after it are
        # tolerated (some cameras append trailers).
        if sos < 0 or data.find(_JPEG_EOI, sos + 2) < 0:
            raise DataError(f"image file {path} {what}is truncated: a JPEG of {len(data):,} bytes "
                            f"without the end-of-image marker 0xFFD9 after its last scan; "
                            f"copy or extract it again")
    elif data[:8] == _PNG_SIGNATURE:
        if data.rfind(_PNG_IEND) < 0:
            raise DataError(f"image file {path} {what}is truncated: a PNG of {len(data):,} bytes "
                            f"without its final IEND chunk; copy or extract it again")


def load_image(path: Union[str, Path], what: str = "") -> np.ndarray:
    """Decode an image file to an RGB uint8 array of shape (H, W, 3); grayscale files are
    replicated to three channels.  ``what`` names the image in error messages.  A missing,
    unreadable or truncated file raises, naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"image file {path} {what}does not exist") from None
    except OSError as exc:
        raise DataError(f"image file {path} {what}cannot be read: {exc.strerror or exc}") from None
    check_complete(data, path, what)
    if not data:
        raise DataError(f"image file {path} {what}could not be decoded (not a readable image: empty file)")
    try:
        return load_rgb_array(io.BytesIO(data), exif_transpose=True)
    except DataError as exc:
        raise DataError(f"image file {path} {what}could not be decoded "
                        f"(not a readable image: {getattr(exc, 'reason', exc)})") from None


@dataclass
class _Part:
    """The images of one annotation file.  Stored as numpy arrays: loader workers then
    share the pages instead of copying them as Python reference counts change (which
    matters at ImageNet's 1.2 M images)."""

    ann_file: Path
    image_ids: np.ndarray
    file_names: np.ndarray  # utf-8 bytes, relative to the data root
    shapes: np.ndarray  # (N, 2): height, width from the JSON
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.image_ids)

    def file_name(self, j: int) -> str:
        return self.file_names[j].decode("utf-8")


def _read_part(root: Path, spec: TaskSpec, part: str) -> _Part:
    path = annotation_path(root, spec.name, part)
    if not path.is_file():
        raise MissingFileError(
            f"annotation file {path} not found (expected {spec.name}_{part}.json under "
            f"{root / 'annotations'}; the data root must be the decathlon-1.0 folder)")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"annotation file {path} is not a COCO-style JSON object: "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"annotation file {path} is not a COCO-style JSON object: it holds a "
                         f"{type(data).__name__}")
    if "images" not in data:
        raise DataError(f"annotation file {path} has no 'images' list")
    for cat in data.get("categories", []):
        _class_index(spec, cat.get("id"), path, f"category {cat.get('name')!r}")
    labelled = part != "test_stripped"
    by_image = _annotations_by_image(data.get("annotations") or [], path)
    ids, names, shapes, targets = [], [], [], []
    for im in data["images"]:
        try:
            image_id, name = int(im["id"]), str(im["file_name"])
            shape = (int(im["height"]), int(im["width"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"annotation file {path}: image record {im!r} lacks an integer "
                             f"id/width/height or a file_name") from None
        target = -1
        if labelled:
            anns = by_image.get(image_id, [])
            if len(anns) != 1:
                raise DataError(f"annotation file {path}: image id {image_id} has {len(anns)} "
                                 f"annotations, expected exactly one")
            target = _class_index(spec, anns[0].get("category_id"), path, f"image id {image_id}")
        ids.append(image_id)
        names.append(name.encode("utf-8"))
        shapes.append(shape)
        targets.append(target)
    if labelled and not ids:
        raise DataError(f"annotation file {path} lists no images")
    return _Part(path, np.array(ids, dtype=np.int64), np.array(names, dtype=np.bytes_),
                 np.array(shapes, dtype=np.int64).reshape(-1, 2), np.array(targets, dtype=np.int64))


def _check_files(root: Path, part: _Part, cached: Optional[np.ndarray] = None) -> None:
    """Refuse, before any step, an annotation file whose images are neither on disk nor in
    the decoded cache (``cached``: one flag per image); a missing file would otherwise stop
    a run only when a batch reaches it."""
    missing = [n.decode("utf-8") for k, n in enumerate(part.file_names)
               if not (cached is not None and cached[k]) and not (root / n.decode("utf-8")).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise MissingFileError(f"{len(missing)} of the {len(part)} images listed in {part.ann_file} are missing under "
                               f"{root}: {shown}; restore them (or the whole data/ folder) before training")


def _annotations_by_image(annotations, path: Path) -> Dict[int, List[dict]]:
    """The annotation records of each image id (what a COCO index's ``imgToAnns`` holds)."""
    if not isinstance(annotations, list):
        raise DataError(f"annotation file {path}: 'annotations' is a {type(annotations).__name__}, expected a list")
    found: Dict[int, List[dict]] = {}
    for ann in annotations:
        try:
            found.setdefault(int(ann["image_id"]), []).append(ann)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"annotation file {path}: annotation record {ann!r} lacks an integer image_id") from None
    return found


def _class_index(spec: TaskSpec, category_id, path: Path, where: str) -> int:
    try:
        return spec.class_index(int(category_id))
    except (TypeError, ValueError):
        raise DataError(
            f"annotation file {path}: {where} has category_id {category_id!r}, outside task "
            f"{spec.name!r} (expected {spec.prefix + 1}..{spec.prefix + spec.num_classes})") from None


class DecathlonDataset(Dataset):
    """One split (``train``, ``val``, ``train+val`` or ``test``) of one task.

    ``image_ids`` and ``targets`` (class indices, -1 for the stripped test split) follow
    the order of the annotation files.  ``transform`` receives an RGB uint8 (H, W, 3)
    array (and an ``rng`` keyword when it declares ``uses_rng``); without one, samples
    are uint8 (3, H, W) tensors.  ``cache_dir`` enables the decoded-image cache.  Every
    listed image must be on disk or in that cache unless ``check_files`` is false (reading
    the annotations alone, for their ids and labels).
    """

    def __init__(self, root: Union[str, Path], task: str, split: str, transform=None,
                 cache_dir: Union[None, str, Path] = None, seed: int = 0, check_files: bool = True):
        if split not in SPLITS:
            raise UsageError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"data root {self.root} is not a folder (expected the "
                                    f"decathlon-1.0 folder holding annotations/ and data/)")
        self.spec = get_task(task)
        self.task, self.split = task, split
        self.transform = transform
        self.seed, self.epoch = int(seed), 0
        self.parts = [_read_part(self.root, self.spec, p) for p in SPLITS[split]]
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.caches: Optional[List[DecodedCache]] = None
        if cache_dir is not None:
            self.caches = [DecodedCache(Path(cache_dir), f"{task}_{p.ann_file.stem}",
                                        p.file_names, p.shapes) for p in self.parts]
        for k, part in enumerate(self.parts if check_files else ()):
            _check_files(self.root, part, None if self.caches is None else self.caches[k].filled_flags())

    @property
    def image_ids(self) -> List[int]:
        """Image ids in order (the submission needs them for the test split)."""
        return [int(i) for p in self.parts for i in p.image_ids]

    @property
    def targets(self) -> List[int]:
        """Class indices in order (-1 for the stripped test split)."""
        return [int(t) for p in self.parts for t in p.targets]

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def __len__(self) -> int:
        return int(self._starts[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _decode(self, part: _Part, j: int) -> np.ndarray:
        return load_image(self.root / part.file_name(j),
                          f"(image id {part.image_ids[j]} of {part.ann_file.name}) ")

    def _locate(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return k, index - int(self._starts[k])

    def load(self, index: int) -> np.ndarray:
        """The decoded RGB image at ``index`` (from the cache when one is enabled)."""
        k, j = self._locate(index)
        part = self.parts[k]
        if self.caches is None:
            return self._decode(part, j)
        return self.caches[k].get(j, lambda: self._decode(part, j))

    def __getitem__(self, index: int):
        img = self.load(index)
        k, j = self._locate(index)
        target = int(self.parts[k].targets[j])
        if self.transform is None:
            return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), target
        if getattr(self.transform, "uses_rng", False):
            rng = np.random.default_rng([self.seed, self.epoch, index])
            return self.transform(img, rng=rng), target
        return self.transform(img), target
