"""A toy ``decathlon-1.0`` tree, written in exactly the on-disk format of the real one.

Tests and the demo need data that every loader path treats like the real archives: COCO
style annotation files laid out byte for byte like the published ones (one record per
line, the same key order and spacing), the real id prefixes and numbering (train ids
P + 200000 + k, then val, then test), JPEGs in class folders for train/val and a flat
``test/000001.jpg`` folder, 72 px short sides with some non-square images, 72 x 144
portrait pedestrians and single-channel omniglot.  Image content depends on the class
(hue and stripe frequency), so a small network learns it within a few epochs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import cv2
import numpy as np

from common.synthetic import mark_synthetic
from common.errors import UsageError
from decathlon.tasks import TASK_NAMES, get_task

__all__ = ["make_synthetic_decathlon", "write_annotation_file", "DEFAULT_CLASSES"]

# Classes that get images (the category list always holds all of a task's classes).
DEFAULT_CLASSES = 4
_INFO = {"year": 2017, "version": 1, "description": "Decathlon", "contributor": "misc",
         "url": "", "date_created": "02-Jun-2017 20:38:51"}
_LICENSES = [{"id": 1, "name": "decathlon", "url": ""}]
# Shape families of the real images (see the reference table of tasks).
_SQUARE = {"cifar100", "omniglot", "svhn", "ucf101"}
_GRAYSCALE = {"omniglot", "daimlerpedcls"}
_PORTRAIT = {"daimlerpedcls"}


def _dump(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _image_line(im: dict) -> str:
    return (f'{{"id":{im["id"]}, "width":{im["width"]}, "height":{im["height"]}, '
            f'"file_name":{json.dumps(im["file_name"])}}}')


def _annotation_line(a: dict) -> str:
    # The published files put a space after "image_id": and nowhere else inside a key.
    return (f'{{"id":{a["id"]}, "image_id": {a["image_id"]}, "category_id":{a["category_id"]}, '
            f'"segmentation":[], "area":0, "bbox":[], "iscrowd":0}}')


def _block(key: str, lines: List[str]) -> str:
    return f'"{key}":[' + "\n,".join(lines) + "\n]"


def write_annotation_file(path: Union[str, Path], images: List[dict],
                          categories: List[dict], annotations: Optional[List[dict]] = None,
                          info: Optional[dict] = None) -> None:
    """Write one annotation file in the published layout (no annotations key when
    ``annotations`` is None, as for a stripped test file).  Written atomically."""
    parts = ['{"info":' + _dump(info or _INFO), _block("images", [_image_line(i) for i in images])]
    if annotations is not None:
        parts.append(_block("annotations", [_annotation_line(a) for a in annotations]))
    parts.append(_block("categories", [_dump(c) for c in categories]))
    parts.append('"licenses":' + _dump(_LICENSES) + "}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(",\n".join(parts))
    os.replace(tmp, path)


def _category_names(task: str, count: int) -> List[str]:
    if task == "daimlerpedcls":
        return ["nonped", "ped"]
    # Numeric names sorted as strings, as in omniglot: id order != numeric order.
    return sorted(str(i + 1) for i in range(count))


def _image_size(task: str, rng: np.random.Generator) -> tuple:
    """(width, height) in the task's real shape family."""
    if task in _PORTRAIT:
        return 72, 144
    if task in _SQUARE:
        return 72, 72
    long_side = int(rng.integers(72, 110))
    return (long_side, 72) if rng.random() < 0.7 else (72, long_side)


def _render(task: str, c: int, k: int, size: tuple, rng: np.random.Generator) -> np.ndarray:
    """An image of class c (of k) in BGR or single channel: hue and stripe period both
    encode the class, plus noise, so crops and flips keep the class evident."""
    w, h = size
    period = 6 + 4 * (c % 4)
    phase = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(-0.3, 0.3)
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + phase)
    noise = rng.normal(0, 12, size=(h, w)).astype(np.float32)
    if task in _GRAYSCALE:
        level = 40 + 170 * c / max(k - 1, 1)
        img = level * 0.7 + 60 * stripes + noise
        return np.clip(img, 0, 255).astype(np.uint8)
    hsv = np.zeros((1, 1, 3), np.uint8)
    hsv[0, 0] = (int(180 * c / k) % 180, 200, 200)
    base = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
    img = base[None, None, :] * (0.6 + 0.4 * stripes[..., None]) + noise[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def _per_task(value, task: str, default):
    if value is None:
        return default
    if isinstance(value, dict):
        return value.get(task, default)
    return value


def make_synthetic_decathlon(root: Union[str, Path], *, tasks: Optional[Iterable[str]] = None,
                             num_classes: Union[None, int, Dict[str, int]] = None,
                             train_per_class: int = 12, val_per_class: int = 4,
                             test_per_class: int = 4, seed: int = 0,
                             labels_dir: Union[None, str, Path] = None) -> dict:
    """Write a toy decathlon tree at ``root`` (the ``decathlon-1.0`` folder).

    ``num_classes`` (an int or a per-task dict) is how many classes receive images; the
    category list always holds every class of the task, as in the real files.  With
    ``labels_dir``, the labelled ``<task>_test.json`` files are written there too.
    Returns ``{"root", "labels_dir", "tasks": {task: {"classes", "train", "val", "test",
    "test_ids"}}}``.
    """
    root = Path(root)
    mark_synthetic(root)
    names = list(TASK_NAMES if tasks is None else tasks)
    summary = {"root": str(root), "labels_dir": str(labels_dir) if labels_dir else None,
               "tasks": {}}
    for name in names:
        spec = get_task(name)
        k = min(spec.num_classes, int(_per_task(num_classes, name, DEFAULT_CLASSES)))
        if k < 1:
            raise UsageError(f"num_classes for {name!r} must be >= 1, got {k}")
        rng = np.random.default_rng([seed, TASK_NAMES.index(name)])
        cat_names = _category_names(name, spec.num_classes)
        categories = [{"id": spec.prefix + i + 1, "name": n, "supercategory": name}
                      for i, n in enumerate(cat_names)]
        next_id = spec.prefix + 200000
        split_records = {}
        for split, per_class in (("train", train_per_class), ("val", val_per_class),
                                 ("test", test_per_class)):
            labels = np.repeat(np.arange(k), per_class)
            rng.shuffle(labels)
            images, annotations = [], []
            for n, c in enumerate(labels, start=1):
                next_id += 1
                if split == "test":
                    rel = f"data/{name}/test/{n:06d}.jpg"
                else:
                    folder = cat_names[c].replace("/", "_")
                    rel = f"data/{name}/{split}/{folder}/{next_id - spec.prefix:07d}.jpg"
                w, h = _image_size(name, rng)
                _write_jpeg(root / rel, _render(name, int(c), k, (w, h), rng))
                images.append({"id": next_id, "width": w, "height": h, "file_name": rel})
                annotations.append({"id": next_id, "image_id": next_id,
                                    "category_id": spec.prefix + int(c) + 1})
            split_records[split] = (images, annotations)
        ann_dir = root / "annotations"
        for split in ("train", "val"):
            images, annotations = split_records[split]
            write_annotation_file(ann_dir / f"{name}_{split}.json", images, categories, annotations)
        test_images, test_annotations = split_records["test"]
        write_annotation_file(ann_dir / f"{name}_test_stripped.json", test_images, categories)
        if labels_dir is not None:
            write_annotation_file(Path(labels_dir) / f"{name}_test.json", test_images,
                                  categories, test_annotations)
        summary["tasks"][name] = {
            "classes": k, "train": len(split_records["train"][0]),
            "val": len(split_records["val"][0]), "test": len(test_images),
            "test_ids": [im["id"] for im in test_images]}
    return summary
