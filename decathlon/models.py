"""Decathlon backbones: the pre-activation Wide ResNet family, its checkpoint file and the
import of externally trained weights.

``wrn28_4`` is the paper's network: a stride-1 3x3 stem with 16 channels, three groups of
pre-activation basic blocks (64, 128, 256 channels) whose first block has stride 2 and a
1x1 projection shortcut, then BN-ReLU, average pooling over the 8x8 map of a 64x64 input
and a linear classifier ``fc``.  No conv has a bias: 5,839,280 conv and 7,200 BN
parameters are shared by every task.  Smaller members of the same family (``wrn10_1``,
...) exercise the same code in tests and the demo.

Backbone checkpoints (``save_backbone`` / ``load_backbone``) hold the architecture name
with the weights, so ``decathlon.train --backbone`` needs nothing else.  External weights
are adapted by :func:`remap_external_state_dict`, a pure key-renaming function, and
loaded by :func:`load_external_weights`, which reports exactly the keys that did not match.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from common.maskfile import safetensors_metadata
from common.runlog import atomic_write_bytes

__all__ = ["WideResNet", "MODELS", "register_model", "create_model", "model_names",
           "save_backbone", "load_backbone", "open_backbone", "remap_external_state_dict",
           "load_external_weights", "LoadReport", "save_weights", "load_weights",
           "BACKBONE_FORMAT", "WEIGHTS_FORMAT"]

BACKBONE_FORMAT = "decathlon-backbone"
WEIGHTS_FORMAT = "decathlon-weights"


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; the projection shortcut (when the shape changes) takes
    the pre-activated input, as in the original wide residual networks."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False)
                         if stride != 1 or in_ch != out_ch else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-width with stride 2 in the first block of every group."""

    def __init__(self, depth: int, width: int, num_classes: int, stem: int = 16):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        blocks = (depth - 4) // 6
        channels = [stem] + [c * width for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        for g in range(3):
            layers = [PreActBlock(channels[g] if b == 0 else channels[g + 1], channels[g + 1],
                                  2 if b == 0 else 1) for b in range(blocks)]
            self.add_module(f"layer{g + 1}", nn.Sequential(*layers))
        self.bn = nn.BatchNorm2d(channels[-1])
        self.fc = nn.Linear(channels[-1], num_classes)
        self.num_features = channels[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


MODELS: Dict[str, Callable[[int], nn.Module]] = {}


def register_model(name: str, builder: Callable[[int], nn.Module]) -> None:
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = builder


for _depth, _width in ((28, 4), (10, 1), (10, 2), (16, 1), (16, 2), (16, 4), (28, 1)):
    register_model(f"wrn{_depth}_{_width}", partial(WideResNet, _depth, _width))


def model_names() -> List[str]:
    return sorted(MODELS)


def create_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised backbone ``name`` with a ``num_classes``-way classifier ``fc``."""
    if name not in MODELS:
        raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(model_names())}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return MODELS[name](num_classes)


def save_backbone(path, model: nn.Module, arch: str, **meta) -> None:
    """Write a backbone checkpoint (atomically): weights, architecture and ``meta``
    (e.g. val_top1, epochs, task) as JSON-friendly values."""
    num_classes = model.fc.out_features
    state = {"format": BACKBONE_FORMAT, "arch": arch, "num_classes": num_classes,
             "meta": dict(meta, arch=arch, num_classes=num_classes),
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    save_checkpoint(path, state)


def load_backbone(path, map_location="cpu") -> Tuple[nn.Module, dict]:
    """The model stored by :func:`save_backbone` and its metadata (arch, num_classes, ...)."""
    try:
        state = load_checkpoint(path, map_location=map_location)
    except CheckpointError as exc:
        raise ValueError(f"{path} is not a backbone checkpoint written by decathlon.pretrain: "
                         f"{exc}") from None
    if state.get("format") != BACKBONE_FORMAT:
        raise ValueError(f"{path} is not a backbone checkpoint written by decathlon.pretrain "
                         f"(no format={BACKBONE_FORMAT!r}); weights from elsewhere are "
                         f"imported by open_backbone()")
    model = create_model(state["arch"], int(state["num_classes"]))
    model.load_state_dict(state["model"])
    return model, dict(state["meta"])


# ---------------------------------------------------------------- external weights
# Renaming rules for the two common wide-ResNet code bases: (pattern, replacement).
_KEY_RULES: List[Tuple[str, str]] = [
    (r"^(module|model|net)\.", ""),  # DataParallel / wrapper prefixes
    # Module-style WRN: conv1, block{g}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc
    (r"^block([123])\.layer\.(\d+)\.convShortcut\.", r"layer\1.\2.shortcut."),
    (r"^block([123])\.layer\.(\d+)\.", r"layer\1.\2."),
    (r"^bn1\.", "bn."),
    # Functional-style WRN: conv0, group{g}.block{i}.{conv0,conv1,bn0,bn1,convdim}, bn, fc
    (r"^conv0(\.weight)?$", "conv1.weight"),
    (r"^group(\d)\.block(\d+)\.convdim(\.weight)?$", "SHORTCUT:\\1.\\2"),
    (r"^group(\d)\.block(\d+)\.conv(\d)(\.weight)?$", "CONV:\\1.\\2.\\3"),
    (r"^group(\d)\.block(\d+)\.bn(\d)\.", "BN:\\1.\\2.\\3:"),
]


def _finish(key: str) -> str:
    # Zero-based group / layer numbers of the functional style become this model's names.
    m = re.match(r"^(SHORTCUT|CONV|BN):(\d)\.(\d+)(?:\.(\d))?:?(.*)$", key)
    if not m:
        return key
    kind, g, b, j, rest = m.groups()
    base = f"layer{int(g) + 1}.{b}."
    if kind == "SHORTCUT":
        return base + "shortcut.weight"
    if kind == "CONV":
        return base + f"conv{int(j) + 1}.weight"
    return base + f"bn{int(j) + 1}.{rest}"


def remap_external_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the keys of an external pre-activation WRN checkpoint to this module's names.

    Pure: returns a new dict with the same tensors.  Keys no rule recognises pass through
    unchanged (and are then reported as unexpected by :func:`load_external_weights`).
    """
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _KEY_RULES:
            new = re.sub(pattern, repl, new)
        out[_finish(new)] = value
    return out


@dataclass
class LoadReport:
    """What an import matched: model keys left unset, file keys left unused, and keys
    whose shapes disagree (``{key: (file shape, model shape)}``)."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: Dict[str, Tuple[tuple, tuple]] = field(default_factory=dict)

    def describe(self) -> str:
        return (f"missing from the file: {self.missing or 'none'}; unused file keys: "
                f"{self.unexpected or 'none'}; shape mismatches: {self.mismatched or 'none'}")


def load_external_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                          ignore: Tuple[str, ...] = ("fc.",)) -> LoadReport:
    """Load an external state dict into ``model`` through the key mapping.

    Keys starting with an ``ignore`` prefix (the classifier, replaced for every task) may
    be missing or of another shape.  Any other unmatched key raises, naming all of them.
    """
    if isinstance(state_dict.get("state_dict"), dict):  # a training checkpoint around it
        state_dict = state_dict["state_dict"]
    mapped = remap_external_state_dict(state_dict)
    own = model.state_dict()
    report = LoadReport()
    usable = {}
    for key, value in mapped.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched[key] = (tuple(value.shape), tuple(own[key].shape))
        else:
            usable[key] = value
    report.missing = sorted(k for k in own if k not in usable and k not in report.mismatched)
    report.unexpected.sort()
    model.load_state_dict(usable, strict=False)

    def fatal(k: str) -> bool:
        return not k.startswith(ignore) and not k.endswith("num_batches_tracked")

    if any(map(fatal, report.missing)) or report.unexpected or any(map(fatal, report.mismatched)):
        raise ValueError(f"external weights do not fit {type(model).__name__}: {report.describe()}")
    return report


def open_backbone(path, arch: Optional[str] = None, log: Callable[[str], None] = print
                  ) -> Tuple[nn.Module, dict]:
    """The backbone in ``path``: a :func:`save_backbone` file, or else an external state
    dict of a ``arch`` network (default wrn28_4) imported through the key mapping, whose
    unmatched keys are logged.  The file is only read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file {path} does not exist; train one with "
                                f"python -m decathlon.pretrain")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing
        raise ValueError(f"backbone file {path} is not a torch file readable with "
                         f"weights_only=True: {exc}") from None
    if isinstance(raw, dict) and raw.get("format") == BACKBONE_FORMAT:
        model, meta = load_backbone(path)
        if arch is not None and arch != meta["arch"]:
            raise ValueError(f"--arch {arch} differs from the architecture {meta['arch']!r} "
                             f"stored in backbone file {path}")
        return model, meta
    if not isinstance(raw, dict):
        raise ValueError(f"backbone file {path} holds a {type(raw).__name__}, expected a state dict")
    arch = arch or "wrn28_4"
    sd = raw.get("state_dict", raw)
    fc = remap_external_state_dict(sd).get("fc.weight")
    model = create_model(arch, int(fc.shape[0]) if fc is not None else 1000)
    report = load_external_weights(model, sd)
    log(f"imported external weights from {path} into {arch}: {report.describe()}")
    return model, {"arch": arch, "num_classes": model.fc.out_features, "source": "external",
                   "import_report": {"missing": report.missing, "unexpected": report.unexpected}}


def save_weights(path, model: nn.Module, **meta) -> None:
    """All weights of a plainly trained model (the finetune / feature / scratch baselines)
    as safetensors, with JSON metadata (arch, num_classes, task, method, ...)."""
    header = {"format": WEIGHTS_FORMAT, "meta": json.dumps(meta, sort_keys=True)}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, st_save(tensors, metadata=header))


def load_weights(path, map_location="cpu") -> Tuple[nn.Module, dict]:
    """The model written by :func:`save_weights` (its metadata must name arch and
    num_classes) and that metadata."""
    path = Path(path)
    header = safetensors_metadata(path, "weights")
    if header.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a decathlon weights file (format="
                         f"{header.get('format')!r}, expected {WEIGHTS_FORMAT!r})")
    meta = json.loads(header["meta"])
    model = create_model(meta["arch"], int(meta["num_classes"]))
    model.load_state_dict(st_load(path.read_bytes()))
    return model.to(map_location), meta
