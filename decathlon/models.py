"""Decathlon backbones: the pre-activation Wide ResNet family, its checkpoint file, the
import of externally trained weights, and what ``--backbone`` says about a wrong file.

``wrn28_4`` is the paper's network: a stride-1 3x3 stem with 16 channels, three groups of
pre-activation basic blocks (64, 128, 256 channels) whose first block has stride 2 and a
1x1 projection shortcut, then BN-ReLU, average pooling over the 8x8 map of a 64x64 input
and a linear classifier ``fc``.  No conv has a bias: 5,839,280 conv and 7,200 BN
parameters are shared by every task.  Smaller members of the same family (``wrn10_1``,
...) exercise the same code in tests and the demo.

Backbone checkpoints (``save_backbone`` / ``load_backbone``) hold the architecture name
with the weights, so ``decathlon.train --backbone`` needs nothing else.  External weights
are adapted by :func:`remap_external_state_dict`, a pure key-renaming function, and
loaded by :func:`load_external_weights`, which reports the keys that did not match.

:func:`open_backbone` is what every ``--backbone`` flag of the decathlon commands goes
through. Given another file of a run folder (the resumable ``checkpoint.pt`` beside
``backbone.pt``, a task's ``masks.safetensors`` or ``weights.safetensors``, a JSON file, the
folder itself) it says in one line what the file is and which file to pass instead
(:func:`describe_run_file`).
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

from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import MissingFileError, UsageError, WeightsFileError
from common.heads import get_classifier
from common.maskfile import MASK_FORMAT
from common.methods import WEIGHTS_FORMAT, _LEGACY_WEIGHTS_FORMATS
from common.weightsfile import safetensors_metadata

__all__ = ["WideResNet", "MODELS", "register_model", "create_model", "model_names",
           "save_backbone", "load_backbone", "open_backbone", "describe_run_file",
           "remap_external_state_dict", "load_external_weights", "LoadReport",
           "BACKBONE_FORMAT", "BACKBONE_FILE"]

BACKBONE_FORMAT = "decathlon-backbone"
BACKBONE_FILE = "backbone.pt"  # the name decathlon.pretrain gives it in its run folder


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
            raise UsageError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
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
    """The registered architecture names, sorted (what ``--arch`` accepts)."""
    return sorted(MODELS)


def create_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised backbone ``name`` with a ``num_classes``-way classifier ``fc``."""
    if name not in MODELS:
        raise UsageError(f"unknown architecture {name!r}; valid: {', '.join(model_names())}")
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    return MODELS[name](num_classes)


def save_backbone(path, model: nn.Module, arch: str, **meta) -> None:
    """Write a backbone checkpoint (atomically): weights, architecture and ``meta``
    (e.g. val_top1, epochs, task) as JSON-friendly values."""
    num_classes = get_classifier(model)[1].out_features
    state = {"format": BACKBONE_FORMAT, "arch": arch, "num_classes": num_classes,
             "meta": dict(meta, arch=arch, num_classes=num_classes),
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    save_checkpoint(path, state)


def load_backbone(path, map_location="cpu") -> Tuple[nn.Module, dict]:
    """The model stored by :func:`save_backbone` and its metadata (arch, num_classes, ...)."""
    try:
        state = load_checkpoint(path, map_location=map_location)
    except ValueError as exc:  # common.checkpoint's CheckpointError: unreadable, other version
        raise WeightsFileError(f"{path} is not a backbone checkpoint written by decathlon.pretrain: "
                               f"{_first_line(exc)}") from None
    if state.get("format") != BACKBONE_FORMAT:
        raise WeightsFileError(f"{path} is not a backbone checkpoint written by decathlon.pretrain "
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


def _key_summary(keys, limit: int = 4) -> str:
    """``n keys ['a', 'b', ...] and m more``: a few names instead of all of them."""
    keys = list(keys)
    if len(keys) <= limit + 1:
        return repr(keys)
    return f"{len(keys)} keys {keys[:limit]!r} and {len(keys) - limit} more"


@dataclass
class LoadReport:
    """What an import matched: model keys left unset, file keys left unused, and keys
    whose shapes disagree (``{key: (file shape, model shape)}``)."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: Dict[str, Tuple[tuple, tuple]] = field(default_factory=dict)

    def describe(self) -> str:
        """One line; long key lists are cut to a count and a few names."""
        shapes = [f"{k}: file {a} vs model {b}" for k, (a, b) in self.mismatched.items()]
        return (f"missing from the file: {_key_summary(self.missing) if self.missing else 'none'}; "
                f"unused file keys: {_key_summary(self.unexpected) if self.unexpected else 'none'}; "
                f"shape mismatches: {_key_summary(shapes, 3) if shapes else 'none'}")


def load_external_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                          ignore: Optional[Tuple[str, ...]] = None, source: str = "external weights"
                          ) -> LoadReport:
    """Load an external state dict into ``model`` through the key mapping.

    Keys starting with an ``ignore`` prefix (default: the classifier, replaced for every
    task) may be missing or of another shape.  Any other unmatched key raises
    :class:`WeightsFileError`, naming a few of them and their counts; ``source`` (e.g. the
    file name) starts the message.
    """
    if isinstance(state_dict.get("state_dict"), dict):  # a training checkpoint around it
        state_dict = state_dict["state_dict"]
    if ignore is None:
        ignore = (get_classifier(model)[0] + ".",)
    mapped = remap_external_state_dict(state_dict)
    own = model.state_dict()
    report = LoadReport()
    usable = {}
    for key, value in mapped.items():
        if key not in own or not isinstance(value, torch.Tensor):
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched[key] = (tuple(value.shape), tuple(own[key].shape))
        else:
            usable[key] = value
    report.missing = sorted(k for k in own if k not in usable and k not in report.mismatched)
    report.unexpected.sort()

    def fatal(k: str) -> bool:
        return not k.startswith(ignore) and not k.endswith("num_batches_tracked")

    fatal_missing = [k for k in report.missing if fatal(k)]
    if fatal_missing or report.unexpected or any(map(fatal, report.mismatched)):
        if len(fatal_missing) == len([k for k in own if fatal(k)]):
            hint = ("; not one key fits: expected a pre-activation WRN state dict "
                    "(keys like conv1.weight, layer1.0.conv1.weight, bn.weight)")
        else:
            hint = ""
        raise WeightsFileError(f"{source} do not fit {type(model).__name__}: {report.describe()}{hint}")
    model.load_state_dict(usable, strict=False)
    return report


# ---------------------------------------------------------------- what --backbone was given


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _sniff(path: Path) -> str:
    """'safetensors', 'json', 'torch' or 'unknown', from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    stripped = head.lstrip()
    if path.suffix in (".json", ".jsonl") or stripped[:1] in (b"{", b"["):
        return "json"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"  # torch.save's zip container, or a legacy pickle
    return "unknown"


def _named_backbone(folder: Path) -> Optional[str]:
    """The backbone file a task run folder names: in config.json, else in its mask or
    weights file's metadata."""
    config = _read_json(folder / "config.json")
    if isinstance(config, dict) and config.get("backbone"):
        return str(config["backbone"])
    for name, key in (("masks.safetensors", "user"), ("weights.safetensors", "meta")):
        if (folder / name).is_file():
            try:
                named = _loads(safetensors_metadata(folder / name).get(key)).get("backbone")
            except WeightsFileError:
                continue
            if named:
                return str(named)
    return None


def _pass_instead(folder: Path, named: Optional[str] = None) -> str:
    """Which backbone file to pass: the one a run names, else backbone.pt beside it."""
    named = named or _named_backbone(folder)
    if named:
        exists = "" if Path(named).is_file() else " (not found there now)"
        return f"pass the backbone it was trained on, {named}{exists}"
    beside = folder / BACKBONE_FILE
    if beside.is_file():
        return f"pass {beside} instead"
    return f"pass the {BACKBONE_FILE} that python -m decathlon.pretrain writes in its --out folder"


def _describe_folder(path: Path) -> str:
    if (path / BACKBONE_FILE).is_file():
        return f"{path} is a folder; pass the backbone file in it: {path / BACKBONE_FILE}"
    found = sorted(path.glob(f"*/{BACKBONE_FILE}"))[:3]
    if found:
        return (f"{path} is a folder; pass a backbone file, e.g. "
                f"{', '.join(str(p) for p in found)}")
    tasks = sorted(p.parent for p in path.glob("*/*.safetensors"))
    if tasks:
        named = next((n for n in map(_named_backbone, tasks) if n), None)
        return (f"{path} is a folder of decathlon.train task runs, not a backbone; "
                f"{_pass_instead(path, named)}")
    if (path / "checkpoint.pt").is_file():
        return (f"{path} is a run folder without {BACKBONE_FILE} (the pretraining has not "
                f"finished: run the same decathlon.pretrain command again to complete it)")
    return (f"{path} is a folder; pass a backbone file ({BACKBONE_FILE} from "
            f"python -m decathlon.pretrain, or an external WRN state dict)")


def _describe_safetensors(path: Path) -> Optional[str]:
    header = safetensors_metadata(path)
    fmt = header.get("format")
    if fmt == MASK_FORMAT:
        user = _loads(header.get("user"))
        return (f"{path} is the piggyback mask file of task {user.get('task', '?')!r} (masks, "
                f"classifier and task BN from decathlon.train), not a backbone; "
                f"{_pass_instead(path.parent, user.get('backbone'))}")
    if fmt == WEIGHTS_FORMAT or fmt in _LEGACY_WEIGHTS_FORMATS:
        meta = _loads(header.get("meta"))
        return (f"{path} holds the full weights of a --method {meta.get('method', '?')} model of "
                f"task {meta.get('task', '?')!r} (decathlon.train), not a backbone; "
                f"{_pass_instead(path.parent, meta.get('backbone'))}")
    return None  # a plain safetensors state dict: imported like any external weights


def _loads(text) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _describe_checkpoint(path: Path, raw: dict) -> str:
    settings = raw.get("settings") if isinstance(raw.get("settings"), dict) else {}
    epoch = raw.get("epoch", "?")
    if settings.get("method") is not None:
        return (f"{path} is the resumable training checkpoint of a decathlon.train run (task "
                f"{settings.get('task', '?')!r}, --method {settings['method']}, epoch {epoch}), not "
                f"a backbone; {_pass_instead(path.parent)}")
    beside = path.parent / BACKBONE_FILE
    where = (f"pass {beside} instead" if beside.is_file() else
             f"{BACKBONE_FILE} is written beside it when the run finishes: run the same "
             f"decathlon.pretrain command again to complete it")
    return (f"{path} is the resumable training checkpoint of decathlon.pretrain (epoch {epoch}; "
            f"model, optimizer and RNG state), not the backbone file; {where}")


def _is_training_checkpoint(raw) -> bool:
    return (isinstance(raw, dict) and raw.get("format") != BACKBONE_FORMAT
            and {"model", "epoch", "optimizers"} <= set(raw))


def describe_run_file(path) -> Optional[str]:
    """One line saying what ``path`` is and which file to pass as ``--backbone`` instead,
    when it is a folder or a file of a run folder other than a backbone; None when it may
    be a backbone (a :func:`save_backbone` file or an external state dict)."""
    path = Path(path)
    if path.is_dir():
        return _describe_folder(path)
    kind = _sniff(path)
    if kind == "safetensors":
        return _describe_safetensors(path)
    if kind == "json":
        name = {"config.json": "resolved configuration", "metrics.json": "final metrics",
                "log.jsonl": "per-epoch log", "summary.json": "summary"}.get(path.name, "JSON data")
        return f"{path} is a JSON file (the run's {name}), not weights; {_pass_instead(path.parent)}"
    if kind == "torch":
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - not readable: open_backbone says so
            return None
        if _is_training_checkpoint(raw):
            return _describe_checkpoint(path, raw)
    return None


def _read_weights(path: Path):
    if _sniff(path) == "safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise WeightsFileError(f"backbone file {path} is not a readable safetensors file: "
                                   f"{_first_line(exc)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing
        raise WeightsFileError(f"backbone file {path} is not a torch file readable with "
                               f"weights_only=True: {_first_line(exc)}") from None


def open_backbone(path, arch: Optional[str] = None, log: Callable[[str], None] = print
                  ) -> Tuple[nn.Module, dict]:
    """The backbone in ``path``: a :func:`save_backbone` file, or else an external state
    dict (torch or safetensors) of a ``arch`` network (default wrn28_4) imported through
    the key mapping, whose unmatched keys are logged.  Any other file of a run folder is
    refused with one line naming the file to pass instead.  The file is only read."""
    path = Path(path)
    if not path.exists():
        hint = f"; did you mean {path.parent / BACKBONE_FILE}?" if (path.parent / BACKBONE_FILE).is_file() \
            else "; train one with python -m decathlon.pretrain"
        raise MissingFileError(f"backbone file {path} does not exist{hint}")
    problem = describe_run_file(path) if path.is_dir() or _sniff(path) != "torch" else None
    if problem is not None:
        raise WeightsFileError(f"--backbone {problem}")
    raw = _read_weights(path)
    if _is_training_checkpoint(raw):
        raise WeightsFileError(f"--backbone {_describe_checkpoint(path, raw)}")
    if isinstance(raw, dict) and raw.get("format") == BACKBONE_FORMAT:
        model, meta = load_backbone(path)
        if arch is not None and arch != meta["arch"]:
            raise UsageError(f"--arch {arch} differs from the architecture {meta['arch']!r} "
                             f"stored in backbone file {path}")
        return model, meta
    if not isinstance(raw, dict):
        raise WeightsFileError(f"backbone file {path} holds a {type(raw).__name__}, expected a "
                               f"state dict (parameter name -> tensor)")
    arch = arch or "wrn28_4"
    sd = raw.get("state_dict", raw)
    fc = remap_external_state_dict(sd).get("fc.weight")
    model = create_model(arch, int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.dim() == 2 else 1000)
    report = load_external_weights(model, sd, source=f"weights in backbone file {path}")
    log(f"imported external weights from {path} into {arch}: {report.describe()}")
    return model, {"arch": arch, "num_classes": get_classifier(model)[1].out_features,
                   "source": "external",
                   "import_report": {"missing": report.missing, "unexpected": report.unexpected}}
