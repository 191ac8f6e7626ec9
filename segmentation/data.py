"""PASCAL VOC and SBD on disk: label readers, input conventions, splits, datasets.

On-disk formats (see ``../shared/reference/segmentation.md``):

* SBD ``benchmark_RELEASE/dataset``: ``img/<id>.jpg``, ``cls/<id>.mat`` holding a MATLAB
  struct ``GTcls`` whose ``Segmentation`` field is the H x W class map, ``train.txt``,
  ``val.txt``;
* VOC ``VOCdevkit/VOC2012`` (or ``VOC2011``): ``JPEGImages/<id>.jpg``, palette PNGs
  ``SegmentationClass/<id>.png`` read as palette indices (255 = void, ignored),
  ``ImageSets/Segmentation/{train,val}.txt``.

``SPLITS`` maps ``--split`` to its training and evaluation sets: ``sbd`` trains on SBD
train and evaluates on seg11valid (the list ships in ``segmentation/data``), ``voc``
uses the VOC segmentation train/val lists. Every bad or missing file raises
:class:`DataError` naming it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.io
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.errors import DataError, UsageError
from common.images import load_rgb_array

__all__ = [
    "IGNORE_INDEX", "NUM_CLASSES", "DataError", "InputConvention", "CONVENTIONS",
    "read_sbd_label", "read_voc_label", "read_image", "read_id_list", "class_names",
    "seg11valid_path", "find_sbd_root", "find_voc_root", "SegmentationDataset", "SPLITS",
    "build_split", "pad_collate",
]

IGNORE_INDEX = 255
NUM_CLASSES = 21
PACKAGE_DATA = Path(__file__).resolve().parent / "data"


# ----------------------------------------------------------------------------- input scaling

@dataclass(frozen=True)
class InputConvention:
    """How a backbone expects its input: channel order, value scale, mean and std
    (mean/std in the same channel order and scale as the network input)."""

    channel_order: str
    scale: float
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    def to_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 H x W x 3 RGB image -> normalised float 3 x H x W tensor."""
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).to(torch.float32)
        if self.channel_order == "BGR":
            x = x.flip(0)
        x = x * self.scale
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def to_image(self, x: torch.Tensor) -> np.ndarray:
        """Inverse of :meth:`to_tensor`, for pictures: -> uint8 H x W x 3 RGB."""
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        x = (x.detach().cpu().float() * std + mean) / self.scale
        if self.channel_order == "BGR":
            x = x.flip(0)
        return x.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


CONVENTIONS: Dict[str, InputConvention] = {
    # torchvision's ImageNet weights: RGB in [0, 1], normalised per channel.
    "torchvision": InputConvention("RGB", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Caffe-converted VGG-16: BGR in 0-255 minus the per-channel mean (BGR order), no std.
    "caffe": InputConvention("BGR", 1.0, (104.00699, 116.66877, 122.67892), (1.0, 1.0, 1.0)),
}


# ----------------------------------------------------------------------------- file readers

def _check_label(label: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    if label.ndim != 2:
        raise DataError(f"{path}: label map has shape {label.shape}, expected H x W")
    bad = np.unique(label[(label >= num_classes) & (label != IGNORE_INDEX)])
    if bad.size:
        raise DataError(f"{path}: label values {bad[:10].tolist()} are outside 0..{num_classes - 1} "
                        f"and not the ignore value {IGNORE_INDEX}")
    return label.astype(np.uint8)


def read_sbd_label(path, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Class map of an SBD ``cls/<id>.mat``: ``GTcls.Segmentation`` as uint8 H x W."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SBD label file {path} does not exist")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises several types for corrupt files
        raise DataError(f"{path}: not a readable MATLAB .mat file ({e})") from None
    if "GTcls" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: no MATLAB struct 'GTcls' (variables: {keys}); expected an SBD cls/*.mat file")
    gt = mat["GTcls"]
    names = gt.dtype.names or ()
    if "Segmentation" not in names:
        raise DataError(f"{path}: struct GTcls has fields {list(names)}, expected a 'Segmentation' field")
    label = np.asarray(gt[0]["Segmentation"][0])
    if not np.issubdtype(label.dtype, np.integer):
        raise DataError(f"{path}: GTcls.Segmentation has dtype {label.dtype}, expected integer class ids")
    return _check_label(label, path, num_classes)


def read_voc_label(path, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Class map of a VOC ``SegmentationClass/<id>.png``: palette indices, 255 = void."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"VOC label file {path} does not exist")
    try:
        with Image.open(path) as img:
            mode = img.mode
            # Palette indices, not colours: converting to RGB would lose the class ids.
            label = np.array(img) if mode in ("P", "L") else None
    except OSError as e:
        raise DataError(f"{path}: not a readable PNG ({e})") from None
    if label is None:
        raise DataError(f"{path}: image mode {mode!r}, expected a palette ('P') PNG whose indices are class ids")
    return _check_label(label, path, num_classes)


def read_image(path) -> np.ndarray:
    """uint8 H x W x 3 RGB array of a JPEG (or any image PIL reads), decoded by
    :func:`common.images.load_rgb_array`; no EXIF rotation, so pixels stay aligned with
    the label map drawn on the stored image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    return load_rgb_array(path)


LABEL_READERS: Dict[str, Callable[..., np.ndarray]] = {".mat": read_sbd_label, ".png": read_voc_label}


def read_id_list(path) -> List[str]:
    """Image ids of a split list, one per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split list {path} does not exist")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [i for i in ids if len(i.split()) != 1]
    if bad:
        raise DataError(f"{path}: lines {bad[:3]} are not single image ids")
    if not ids:
        raise DataError(f"split list {path} is empty")
    return ids


def seg11valid_path() -> Path:
    return PACKAGE_DATA / "seg11valid.txt"


def class_names() -> List[str]:
    """The 21 class names in model output order (first block of classes.txt)."""
    lines = (PACKAGE_DATA / "classes.txt").read_text().splitlines()
    names = []
    for line in lines:
        if not line.strip():
            break
        names.append(line.strip())
    return names


# ----------------------------------------------------------------------------- folder layout

def _first_dir(candidates: Sequence[Path], marker: str, what: str) -> Path:
    for c in candidates:
        if (c / marker).is_dir():
            return c
    tried = "\n  ".join(str(c) for c in candidates)
    raise DataError(f"no {what} found; looked for a folder containing {marker}/ at:\n  {tried}\n"
                    f"--data-root must be the folder holding benchmark_RELEASE/ (SBD) and VOCdevkit/ (VOC)")


def find_sbd_root(data_root) -> Path:
    """The SBD ``dataset`` folder (holding ``img/`` and ``cls/``) under ``data_root``."""
    r = Path(data_root)
    return _first_dir([r / "benchmark_RELEASE" / "dataset", r / "SBD" / "benchmark_RELEASE" / "dataset",
                       r / "SBD" / "dataset", r / "sbd" / "dataset", r / "dataset", r], "cls", "SBD dataset")


def find_voc_root(data_root) -> Path:
    """The VOC year folder (holding ``JPEGImages/`` and ``SegmentationClass/``)."""
    r = Path(data_root)
    return _first_dir([r / "VOCdevkit" / "VOC2012", r / "VOCdevkit" / "VOC2011", r / "VOC2012",
                       r / "VOC2011", r], "SegmentationClass", "PASCAL VOC folder")


# ----------------------------------------------------------------------------- datasets

class SegmentationDataset(Dataset):
    """(normalised image, label map) pairs from lists of image and label files."""

    def __init__(self, ids: Sequence[str], images: Sequence[Path], labels: Sequence[Path],
                 convention: InputConvention, num_classes: int = NUM_CLASSES):
        self.ids, self.images, self.labels = list(ids), list(images), list(labels)
        self.convention = convention
        self.num_classes = num_classes
        for p in self.labels:
            if p.suffix not in LABEL_READERS:
                raise DataError(f"{p}: unknown label format {p.suffix!r}; expected one of {sorted(LABEL_READERS)}")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """Raw (uint8 RGB image, uint8 label map) of one example."""
        image = read_image(self.images[index])
        label = LABEL_READERS[self.labels[index].suffix](self.labels[index], self.num_classes)
        if image.shape[:2] != label.shape:
            raise DataError(f"image {self.images[index]} is {image.shape[1]}x{image.shape[0]} but its label "
                            f"{self.labels[index]} is {label.shape[1]}x{label.shape[0]}")
        return image, label

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        return self.convention.to_tensor(image), torch.from_numpy(label.astype(np.int64))


def _checked_pairs(ids: Sequence[str], image_dir: Path, label_dir: Path, label_ext: str,
                   list_path: Path) -> Tuple[List[Path], List[Path]]:
    images = [image_dir / f"{i}.jpg" for i in ids]
    labels = [label_dir / f"{i}{label_ext}" for i in ids]
    missing = [str(p) for pair in zip(images, labels) for p in pair if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} file(s) listed by {list_path} are missing, e.g. {missing[:3]}")
    bad = [f"{p} ({why})" for p in labels for why in [_label_header_problem(p)] if why]
    if bad:
        raise DataError(f"{len(bad)} label file(s) listed by {list_path} cannot be read as class-id maps: "
                        f"{'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}")
    return images, labels


def _label_header_problem(path: Path) -> Optional[str]:
    """What is wrong with a label file that its header shows (cheap: nothing is decoded):
    a VOC PNG that is not a palette or gray image, a .mat file that is not MATLAB's."""
    if path.suffix == ".png":
        try:
            with Image.open(path) as img:
                return None if img.mode in ("P", "L") else \
                    f"image mode {img.mode!r}, expected a palette ('P') PNG whose indices are class ids"
        except (OSError, ValueError) as exc:
            return f"not a readable PNG: {exc}"
    with open(path, "rb") as f:
        head = f.read(128)
    if not head.startswith(b"MATLAB"):
        return "not a MATLAB .mat file"
    return None


def sbd_set(data_root, list_name: str, convention: InputConvention, **_) -> SegmentationDataset:
    root = find_sbd_root(data_root)
    ids = read_id_list(root / list_name)
    images, labels = _checked_pairs(ids, root / "img", root / "cls", ".mat", root / list_name)
    return SegmentationDataset(ids, images, labels, convention)


def voc_set(data_root, list_name: str, convention: InputConvention, **_) -> SegmentationDataset:
    root = find_voc_root(data_root)
    list_path = root / "ImageSets" / "Segmentation" / list_name
    ids = read_id_list(list_path)
    images, labels = _checked_pairs(ids, root / "JPEGImages", root / "SegmentationClass", ".png", list_path)
    return SegmentationDataset(ids, images, labels, convention)


def seg11valid_set(data_root, convention: InputConvention, val_list: Optional[Path] = None,
                   **_) -> SegmentationDataset:
    """VOC 2011 val images not in SBD train, read from the VOC tree.

    The shipped list names 736 images; ids without a ground-truth PNG in the VOC tree are
    left out with a warning (the count goes into metrics.json) so that partial copies of
    VOC can still be evaluated, but an id whose PNG exists and JPEG does not is an error.
    """
    root = find_voc_root(data_root)
    list_path = Path(val_list) if val_list else seg11valid_path()
    ids = read_id_list(list_path)
    present = [i for i in ids if (root / "SegmentationClass" / f"{i}.png").is_file()]
    if not present:
        raise DataError(f"none of the {len(ids)} images of {list_path} has a label in "
                        f"{root / 'SegmentationClass'}")
    if len(present) < len(ids):
        have = set(present)
        absent = [i for i in ids if i not in have]
        warnings.warn(f"{len(absent)} of {len(ids)} images of {list_path.name} have no label in "
                      f"{root / 'SegmentationClass'} (e.g. {absent[:3]}); evaluating on the other {len(present)}")
    images, labels = _checked_pairs(present, root / "JPEGImages", root / "SegmentationClass", ".png", list_path)
    dataset = SegmentationDataset(present, images, labels, convention)
    dataset.listed = len(ids)
    return dataset


@dataclass(frozen=True)
class SplitSpec:
    train: Callable[..., SegmentationDataset]
    val: Callable[..., SegmentationDataset]
    description: str


SPLITS: Dict[str, SplitSpec] = {
    "sbd": SplitSpec(lambda root, conv, **kw: sbd_set(root, "train.txt", conv, **kw),
                     lambda root, conv, **kw: seg11valid_set(root, conv, **kw),
                     "train on SBD train, evaluate on VOC 2011 seg11valid"),
    "voc": SplitSpec(lambda root, conv, **kw: voc_set(root, "train.txt", conv, **kw),
                     lambda root, conv, **kw: voc_set(root, "val.txt", conv, **kw),
                     "train on VOC train, evaluate on VOC val"),
}


def build_split(split: str, part: str, data_root, convention: str = "torchvision",
                val_list: Optional[os.PathLike] = None) -> SegmentationDataset:
    """The ``part`` ("train" or "val") of ``split`` under ``data_root``."""
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; valid names: {', '.join(sorted(SPLITS))}")
    if convention not in CONVENTIONS:
        raise UsageError(f"unknown input convention {convention!r}; valid names: {', '.join(sorted(CONVENTIONS))}")
    if part not in ("train", "val"):
        raise UsageError(f"part must be 'train' or 'val', got {part!r}")
    factory = getattr(SPLITS[split], part)
    return factory(data_root, CONVENTIONS[convention], val_list=val_list)


def pad_collate(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack images of different sizes by padding bottom/right: image 0 (the mean after
    normalisation), label 255 so padded pixels count in neither loss nor metrics."""
    h = max(img.shape[1] for img, _ in batch)
    w = max(img.shape[2] for img, _ in batch)
    images = torch.zeros(len(batch), 3, h, w)
    labels = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.int64)
    for k, (img, lab) in enumerate(batch):
        images[k, :, :img.shape[1], :img.shape[2]] = img
        labels[k, :lab.shape[0], :lab.shape[1]] = lab
    return images, labels
