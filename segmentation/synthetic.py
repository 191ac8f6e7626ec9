"""Small synthetic SBD and VOC trees written in the real on-disk formats.

Used by the demo and the tests, on machines with no dataset. Each image is a grey,
slightly noisy background with one or two large shapes filled with their class's VOC
palette colour: cues that even a small randomly initialised backbone passes on, so a
piggyback FCN learns to segment them within a minute on a CPU. Files are written exactly
as the real datasets ship them:

* SBD: ``benchmark_RELEASE/dataset/img/<id>.jpg``, ``cls/<id>.mat`` with a MATLAB struct
  ``GTcls`` (``Segmentation`` uint8 map, ``Boundaries`` 20 x 1 cell of sparse logical
  matrices, ``CategoriesPresent``), ``train.txt``, ``val.txt``;
* VOC: ``VOCdevkit/VOC2012/JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
  palette PNGs with 255 on a band around every object, ``ImageSets/Segmentation``;
* ``seg11valid.txt``: the VOC val ids that are not in SBD train, as the real list is.

Images and ids are shared between the two trees, as SBD annotates VOC images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import scipy.io
import scipy.ndimage
import scipy.sparse
from PIL import Image

from common.synthetic import mark_synthetic
from common.errors import UsageError

from .data import IGNORE_INDEX, NUM_CLASSES
from .palette import save_label_png, voc_palette

__all__ = ["SyntheticLayout", "make_scene", "write_sbd_label", "write_synthetic_pascal"]

# Width in pixels of the void band VOC draws along object outlines.
VOID_BAND = 2
# Grey level and noise of the background, noise on the shapes (0-255 scale). The noise
# stays well below the distance between the palette colours and the grey, so that the
# class is plain even to a random backbone seen through a stride-32 FCN.
BACKGROUND_MEAN, BACKGROUND_STD, SHAPE_STD = 110.0, 10.0, 5.0


@dataclass(frozen=True)
class SyntheticLayout:
    """Where :func:`write_synthetic_pascal` put things (pass ``root`` as --data-root)."""

    root: Path
    sbd: Path
    voc: Path
    seg11valid: Path
    ids: Dict[str, List[str]]


def make_scene(rng: np.random.Generator, height: int, width: int,
               classes: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image, uint8 class map) with 1-2 shapes on a noisy grey background.

    Shapes are ellipses or rectangles with half-axes of 20-40 % of the image sides (a
    later shape covers an earlier one), filled with the class's VOC palette colour.
    """
    colours = voc_palette().astype(np.float32)
    image = rng.normal(BACKGROUND_MEAN, BACKGROUND_STD, size=(height, width, 3)).astype(np.float32)
    label = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(1, 3))):
        cls = int(rng.choice(classes))
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.2, 0.4) * height, rng.uniform(0.2, 0.4) * width
        if rng.random() < 0.5:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        label[inside] = cls
        image[inside] = colours[cls] + rng.normal(0, SHAPE_STD, size=(int(inside.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_sbd_label(label: np.ndarray, path) -> Path:
    """Write ``label`` as an SBD ``cls/<id>.mat`` (MATLAB struct ``GTcls``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    boundaries = np.empty((NUM_CLASSES - 1, 1), dtype=object)
    for cls in range(1, NUM_CLASSES):
        region = label == cls
        edge = region & ~scipy.ndimage.binary_erosion(region)
        boundaries[cls - 1, 0] = scipy.sparse.csc_matrix(edge)
    present = np.array([c for c in np.unique(label) if 0 < c < NUM_CLASSES], dtype=np.uint8).reshape(-1, 1)
    gtcls = {"Boundaries": boundaries, "Segmentation": label.astype(np.uint8), "CategoriesPresent": present}
    scipy.io.savemat(str(path), {"GTcls": gtcls}, do_compression=True)
    return path


def _voc_label(label: np.ndarray) -> np.ndarray:
    """The VOC version of a class map: a void band of 255 along every outline."""
    out = label.copy()
    band = np.zeros(label.shape, dtype=bool)
    for cls in np.unique(label):
        if cls == 0:
            continue
        region = label == cls
        band |= scipy.ndimage.binary_dilation(region, iterations=VOID_BAND) & \
            ~scipy.ndimage.binary_erosion(region, iterations=VOID_BAND)
    out[band] = IGNORE_INDEX
    return out


def _write_list(path: Path, ids: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def write_synthetic_pascal(root, *, n_sbd_train: int = 24, n_sbd_val: int = 6, n_voc_train: int = 8,
                           n_voc_val: int = 10, n_overlap: int = 2, size: Tuple[int, int] = (48, 80),
                           classes: Sequence[int] = (1, 2, 3, 4), seed: int = 0) -> SyntheticLayout:
    """Write an SBD tree and a VOC2012 tree under ``root``; see the module docstring.

    ``n_overlap`` VOC val images are also SBD train images, and are therefore left out
    of the generated seg11valid list. Image sides are drawn from ``size`` (inclusive),
    odd sizes included.
    """
    if not 0 <= n_overlap <= min(n_voc_val, n_sbd_train):
        raise UsageError(f"n_overlap={n_overlap} must be between 0 and min(n_voc_val, n_sbd_train)")
    bad = [c for c in classes if not 0 < c < NUM_CLASSES]
    if bad:
        raise UsageError(f"classes {bad} are outside 1..{NUM_CLASSES - 1}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    mark_synthetic(root)
    sbd, voc = root / "benchmark_RELEASE" / "dataset", root / "VOCdevkit" / "VOC2012"
    total = n_sbd_train + n_sbd_val + n_voc_train + n_voc_val - n_overlap
    all_ids = [f"{2007 + k % 5}_{k:06d}" for k in range(total)]
    ids = {"sbd_train": all_ids[:n_sbd_train],
           "sbd_val": all_ids[n_sbd_train:n_sbd_train + n_sbd_val]}
    rest = all_ids[n_sbd_train + n_sbd_val:]
    ids["voc_train"] = rest[:n_voc_train]
    ids["voc_val"] = ids["sbd_train"][:n_overlap] + rest[n_voc_train:]
    sbd_train = set(ids["sbd_train"])
    ids["seg11valid"] = [i for i in ids["voc_val"] if i not in sbd_train]

    in_sbd = set(ids["sbd_train"]) | set(ids["sbd_val"])
    in_voc = set(ids["voc_train"]) | set(ids["voc_val"])
    for image_id in all_ids:
        h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, size=2))
        image, label = make_scene(rng, h, w, classes)
        if image_id in in_sbd:
            (sbd / "img").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(sbd / "img" / f"{image_id}.jpg", quality=95)
            write_sbd_label(label, sbd / "cls" / f"{image_id}.mat")
        if image_id in in_voc:
            (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
            save_label_png(_voc_label(label), voc / "SegmentationClass" / f"{image_id}.png")
    _write_list(sbd / "train.txt", ids["sbd_train"])
    _write_list(sbd / "val.txt", ids["sbd_val"])
    seg = voc / "ImageSets" / "Segmentation"
    _write_list(seg / "train.txt", ids["voc_train"])
    _write_list(seg / "val.txt", ids["voc_val"])
    _write_list(seg / "trainval.txt", ids["voc_train"] + ids["voc_val"])
    seg11valid = root / "seg11valid.txt"
    _write_list(seg11valid, ids["seg11valid"])
    return SyntheticLayout(root, sbd, voc, seg11valid, ids)
