"""Where the VGG backbone weights come from, and how they are read.

Three sources, picked by flags (never by downloading):

* ``torchvision``: torchvision's ImageNet VGG-16 (``vgg16-397923af.pth``) from ``--backbone
  PATH`` or the torchvision cache (``$TORCH_HOME/hub/checkpoints``); RGB input in [0, 1]
  normalised by the ImageNet mean/std;
* ``caffe``: Caffe-converted VGG-16 from ``--caffe-weights PATH``; BGR input in 0-255
  minus the Caffe mean. Both torchvision key names and Caffe layer names (conv1_1 ...
  fc8) are accepted;
* ``random``: a random initialisation, only with ``--random-init``.

When nothing is found the error says where to put the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from common.errors import UsageError, WeightsFileError
from common.torchfile import read_state_dict

from .model import VGGArch, get_arch

__all__ = ["TORCHVISION_VGG16_FILE", "BackboneSource", "BackboneWeightsError", "torchvision_cache_path",
           "resolve_backbone", "caffe_to_torchvision_keys",
           "load_backbone_state"]

TORCHVISION_VGG16_FILE = "vgg16-397923af.pth"
TORCHVISION_VGG16_URL = "https://download.pytorch.org/models/" + TORCHVISION_VGG16_FILE
# Only this architecture has published pretrained weights; others need a file or --random-init.
TORCHVISION_FILES = {"vgg16": TORCHVISION_VGG16_FILE}
_CAFFE_NAME = re.compile(r"^(conv\d+_\d+|fc[678])\.(weight|bias)$")


class BackboneWeightsError(WeightsFileError, FileNotFoundError):
    """Backbone weights that cannot be found or read."""


@dataclass(frozen=True)
class BackboneSource:
    """The resolved backbone: ``kind`` (torchvision | caffe | random), the file (None for
    random) and the input convention the weights expect."""

    kind: str
    path: Optional[Path]
    convention: str

    def describe(self) -> str:
        return f"{self.kind} weights from {self.path}" if self.path else "random initialisation (no pretrained weights)"


def torchvision_cache_path(arch: str = "vgg16") -> Optional[Path]:
    """Where torchvision keeps ``arch``'s ImageNet weights, or None if it has none."""
    name = TORCHVISION_FILES.get(arch)
    return Path(torch.hub.get_dir()) / "checkpoints" / name if name else None


def _missing_message(arch: str) -> str:
    cache = torchvision_cache_path(arch)
    lines = [f"no pretrained weights for --arch {arch}; nothing is downloaded by this toolkit."]
    if cache is not None:
        lines.append(f"Copy torchvision's {cache.name} (from {TORCHVISION_VGG16_URL}, fetched on a "
                     f"machine with internet) to {cache} (set TORCH_HOME to move that folder), "
                     f"or pass --backbone PATH.")
    else:
        lines.append("Pass --backbone PATH with a torchvision-layout VGG state_dict for it.")
    lines.append("Caffe-converted VGG-16 weights: --caffe-weights PATH. "
                 "To train from random weights instead (for testing only): --random-init.")
    return "\n".join(lines)


def resolve_backbone(arch: str, backbone: Optional[str] = None, caffe_weights: Optional[str] = None,
                     random_init: bool = False) -> BackboneSource:
    """Decide where the backbone comes from; raise with instructions when it cannot be found."""
    get_arch(arch)
    given = [n for n, v in (("--backbone", backbone), ("--caffe-weights", caffe_weights),
                            ("--random-init", random_init)) if v]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} exclude each other; give at most one")
    if random_init:
        return BackboneSource("random", None, "torchvision")
    if caffe_weights:
        path = Path(caffe_weights)
        if not path.is_file():
            raise BackboneWeightsError(f"--caffe-weights {path}: file does not exist")
        return BackboneSource("caffe", path, "caffe")
    if backbone:
        path = Path(backbone)
        if not path.is_file():
            raise BackboneWeightsError(f"--backbone {path}: file does not exist")
        return BackboneSource("torchvision", path, "torchvision")
    cache = torchvision_cache_path(arch)
    if cache is not None and cache.is_file():
        return BackboneSource("torchvision", cache, "torchvision")
    raise BackboneWeightsError(_missing_message(arch))


def caffe_to_torchvision_keys(state: Dict[str, torch.Tensor],
                              arch: Union[str, VGGArch] = "vgg16") -> Dict[str, torch.Tensor]:
    """Rename Caffe layer names (conv<stage>_<n>, fc6/fc7/fc8) to torchvision's VGG keys
    (pure function). Convolutional fc6/fc7 kernels are flattened back to linear shape.
    State dicts already in torchvision's layout are returned unchanged (as a copy)."""
    if not any(_CAFFE_NAME.match(k) for k in state):
        return dict(state)
    spec = get_arch(arch) if isinstance(arch, str) else arch
    names: Dict[str, str] = {}
    stage, conv, index = 1, 0, 0
    for item in spec.cfg:
        if item == "M":
            stage, conv, index = stage + 1, 0, index + 1
            continue
        conv += 1
        names[f"conv{stage}_{conv}"] = f"features.{index}"
        index += 2  # conv + ReLU
    names.update(fc6="classifier.0", fc7="classifier.3", fc8="classifier.6")
    out = {}
    for key, value in state.items():
        layer, _, param = key.partition(".")
        if layer not in names:
            raise BackboneWeightsError(f"Caffe-style key {key!r} has no place in {arch!r} "
                                       f"(known layers: {sorted(names)})")
        if layer.startswith("fc") and param == "weight" and value.dim() == 4:
            value = value.reshape(value.shape[0], -1)
        out[f"{names[layer]}.{param}"] = value
    return out


def load_backbone_state(source: BackboneSource, arch: str) -> Optional[Dict[str, torch.Tensor]]:
    """The torchvision-layout VGG state_dict for ``source`` (None for random init)."""
    if source.path is None:
        return None
    try:
        state = read_state_dict(source.path)[0]
    except WeightsFileError as e:
        raise BackboneWeightsError(str(e)) from None
    state = caffe_to_torchvision_keys(state, arch)
    return {k: v.float() for k, v in state.items()}
