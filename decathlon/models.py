"""Decathlon backbone files: the toolkit's own, the published ones, and what ``--backbone``
says about a wrong file.

The toolkit's backbone file (:func:`save_backbone`, ``backbone.safetensors`` in a
``decathlon.pretrain`` run folder, or what ``decathlon.import_backbone`` writes) is a
safetensors file of the network's tensors whose metadata names the architecture, its
options and the input preprocessing, so ``decathlon.train --backbone`` needs nothing
else. ``backbone.pt`` files that earlier versions wrote (a pickled dict) still load.

:func:`open_backbone` is what every ``--backbone`` flag of the decathlon commands goes
through, and reads every file through :func:`common.torchfile.read_torch_file` (nothing
in it is run). Besides the toolkit's own files it takes

* the decathlon's ResNet-26 as published: the residual adapters' ``{'net': <model object>,
  'acc', 'epoch'}`` (``.t7``, torch 0.3, Python 2), and state-dict copies of the same
  network (``{'state_dict': ...}``, ``{'net': state_dict, ...}``), with the adapters
  computed when the network carries them; its ImageNet head is the file's ``fc``;
* a Wide ResNet state dict of another code base, imported by key mapping
  (:mod:`decathlon.external`).

Given another file of a run folder (the resumable ``checkpoint.pt``, a task's
``masks.safetensors`` or ``weights.safetensors``, a JSON file, the folder itself) it says in
one line what the file is and which file to pass instead (:func:`describe_run_file`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from common.errors import MissingFileError, UsageError, WeightsFileError
from common.heads import get_classifier
from common.maskfile import MASK_FORMAT
from common.methods import WEIGHTS_FORMAT, _LEGACY_WEIGHTS_FORMATS
from common.atomic import file_sha256
from common.torchfile import LegacyObject, module_state_dict, read_torch_file, sniff_file
from common.weightsfile import read_weights_file, safetensors_metadata, save_weights_file
from decathlon.external import (is_resnet26_layout, load_external_weights, remap_external_state_dict,
                                resnet26_from_state_dict)
from decathlon.networks import create_model, family_of

__all__ = ["save_backbone", "load_backbone", "open_backbone", "describe_run_file", "import_backbone",
           "BACKBONE_FORMAT", "BACKBONE_FILE", "LEGACY_BACKBONE_FILE", "backbone_preprocess"]

BACKBONE_FORMAT = "decathlon-backbone"
BACKBONE_FILE = "backbone.safetensors"  # the name decathlon.pretrain gives it in its run folder
LEGACY_BACKBONE_FILE = "backbone.pt"  # what earlier versions wrote there


def backbone_preprocess(arch: Optional[str]) -> str:
    """The input preprocessing a backbone was trained with: ``resnet26`` (the published
    ResNet-26's: shorter side 72, 64 px crops, centre 72 px for gtsrb, omniglot and svhn)
    or ``square`` (this toolkit's: whole image to a 72 px square, 64 px crops)."""
    return "resnet26" if family_of(arch) == "resnet26" else "square"


def _options(model: nn.Module) -> dict:
    return dict(getattr(model, "arch_options", {}) or {})


def save_backbone(path, model: nn.Module, arch: str, **meta) -> Path:
    """Write a backbone file (safetensors, atomically): the network's tensors, its
    architecture and options, its preprocessing and ``meta`` (JSON-friendly values)."""
    num_classes = get_classifier(model)[1].out_features
    meta = dict(meta, arch=arch, num_classes=num_classes, arch_options=_options(model))
    meta.setdefault("preprocess", backbone_preprocess(arch))
    return save_weights_file(path, model, format=BACKBONE_FORMAT, **meta)


def _legacy_backbone(path: Path, raw: dict) -> Tuple[nn.Module, dict]:
    model = create_model(raw["arch"], int(raw["num_classes"]))
    model.load_state_dict(raw["model"])
    meta = dict(raw.get("meta") or {})
    meta.setdefault("preprocess", backbone_preprocess(raw["arch"]))
    return model, meta


def load_backbone(path) -> Tuple[nn.Module, dict]:
    """The network stored by :func:`save_backbone` (or an earlier ``backbone.pt``) and its
    metadata (arch, num_classes, arch_options, preprocess, ...)."""
    path = Path(path)
    if sniff_file(path) == "safetensors":
        state, meta = read_weights_file(path, BACKBONE_FORMAT)
        model = create_model(meta["arch"], int(meta["num_classes"]), **meta.get("arch_options", {}))
        model.load_state_dict(state)
        return model, meta
    raw = read_torch_file(path, "backbone file")
    if not (isinstance(raw, dict) and raw.get("format") == BACKBONE_FORMAT):
        raise WeightsFileError(f"{path} is not a backbone file written by this toolkit (no format="
                               f"{BACKBONE_FORMAT!r}); weights from elsewhere are imported by open_backbone()")
    return _legacy_backbone(path, raw)


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


def _loads(text) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _is_json(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(16).lstrip()
    return path.suffix in (".json", ".jsonl") or head[:1] in (b"{", b"[")


def _beside(folder: Path) -> Optional[Path]:
    """The backbone file of a pretrain run folder, under its current or earlier name."""
    for name in (BACKBONE_FILE, LEGACY_BACKBONE_FILE):
        if (folder / name).is_file():
            return folder / name
    return None


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
    """Which backbone file to pass: the one a run names, else the backbone file beside it."""
    named = named or _named_backbone(folder)
    if named:
        exists = "" if Path(named).is_file() else " (not found there now)"
        return f"pass the backbone it was trained on, {named}{exists}"
    beside = _beside(folder)
    if beside is not None:
        return f"pass {beside} instead"
    return f"pass the {BACKBONE_FILE} that python -m decathlon.pretrain writes in its --out folder"


def _describe_folder(path: Path) -> str:
    beside = _beside(path)
    if beside is not None:
        return f"{path} is a folder; pass the backbone file in it: {beside}"
    found = sorted(path.glob(f"*/{BACKBONE_FILE}"))[:3] or sorted(path.glob(f"*/{LEGACY_BACKBONE_FILE}"))[:3]
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
    return (f"{path} is a folder; pass a backbone file ({BACKBONE_FILE} from python -m decathlon.pretrain, "
            f"the decathlon's ResNet-26 file, or an external WRN state dict)")


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
    return None  # a backbone file, or a plain safetensors state dict


def _describe_checkpoint(path: Path, raw: dict) -> str:
    settings = raw.get("settings") if isinstance(raw.get("settings"), dict) else {}
    epoch = raw.get("epoch", "?")
    if settings.get("method") is not None:
        return (f"{path} is the resumable training checkpoint of a decathlon.train run (task "
                f"{settings.get('task', '?')!r}, --method {settings['method']}, epoch {epoch}), not "
                f"a backbone; {_pass_instead(path.parent)}")
    beside = _beside(path.parent)
    where = (f"pass {beside} instead" if beside is not None else
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
    be a backbone."""
    path = Path(path)
    if path.is_dir():
        return _describe_folder(path)
    kind = sniff_file(path)
    if kind == "safetensors":
        return _describe_safetensors(path)
    if kind in ("empty", "html", "lfs", "tar") or (kind == "unknown" and not _is_json(path)):
        return None  # read_torch_file names what it is
    if _is_json(path):
        name = {"config.json": "resolved configuration", "metrics.json": "final metrics",
                "log.jsonl": "per-epoch log", "summary.json": "summary"}.get(path.name, "JSON data")
        return f"{path} is a JSON file (the run's {name}), not weights; {_pass_instead(path.parent)}"
    try:
        raw = read_torch_file(path, "backbone file")
    except WeightsFileError:
        return None  # open_backbone reports it
    if _is_training_checkpoint(raw):
        return _describe_checkpoint(path, raw)
    return None


# ---------------------------------------------------------------- published files

def _published(raw, path: Path) -> Optional[Tuple[dict, dict]]:
    """(state dict, what the file says besides: acc, epoch) of a published decathlon file:
    the residual adapters' pickled network or a state-dict copy; None for other dicts."""
    extra = {k: raw.get(k) for k in ("acc", "epoch") if isinstance(raw, dict)
             and isinstance(raw.get(k), (int, float)) and not isinstance(raw.get(k), bool)}
    net = raw.get("net") if isinstance(raw, dict) else None
    if isinstance(net, LegacyObject):
        if not net.is_module or net.name != "ResNet":
            raise WeightsFileError(f"backbone file {path} holds a pickled {net.type_name}, not the decathlon's "
                                   f"ResNet-26 (models.ResNet)")
        return module_state_dict(net), extra
    if isinstance(raw, LegacyObject):
        raise WeightsFileError(f"backbone file {path} holds a pickled {raw.type_name}; expected a state dict, the "
                               f"residual adapters' {{'net': <models.ResNet>, ...}} or a backbone file of this toolkit")
    for key in ("state_dict", "net", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict) and not isinstance(raw.get(key), LegacyObject):
            return {k: v for k, v in raw[key].items() if isinstance(v, torch.Tensor)}, extra
    return None


def _state_dict(raw, path: Path) -> dict:
    if not isinstance(raw, dict):
        raise WeightsFileError(f"backbone file {path} holds a {type(raw).__name__}, expected a state dict "
                               f"(parameter name -> tensor)")
    return {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def _external(path: Path, raw, arch: Optional[str], log) -> Tuple[nn.Module, dict]:
    found = _published(raw, path)
    sd, extra = found if found is not None else (_state_dict(raw, path), {})
    source = {"source": "external", "source_file": str(path), "source_sha256": file_sha256(path)}
    if (arch is None and is_resnet26_layout(sd)) or family_of(arch) == "resnet26":
        model, info = resnet26_from_state_dict(sd, f"backbone file {path}")
        name = "resnet26" if info["blocks"] == 4 else "resnet8"
        if arch is not None and arch != name:
            raise UsageError(f"--arch {arch} differs from the network in backbone file {path}: a {name} "
                             f"({info['blocks']} blocks per stage)")
        adapters = f", {info['adapters']} adapters (proj {info['proj']})" if info["adapters"] else ""
        log(f"read the decathlon ResNet-26 from {path}: width {info['width']}{adapters}, {info['num_classes']}-way "
            f"head" + (f", task {info['task']} of a multi-task file" if info["ignored"] else ""))
        meta = dict(source, arch=name, num_classes=info["num_classes"], arch_options=_options(model),
                    preprocess=backbone_preprocess(name), **extra)
        if "acc" in extra:
            meta["val_top1"] = float(extra["acc"])  # the file's own ImageNet validation accuracy
        return model, meta
    arch = arch or "wrn28_4"
    fc = remap_external_state_dict(sd).get("fc.weight")
    model = create_model(arch, int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.dim() == 2 else 1000)
    report = load_external_weights(model, sd, source=f"weights in backbone file {path}")
    log(f"imported external weights from {path} into {arch}: {report.describe()}")
    return model, dict(source, arch=arch, num_classes=get_classifier(model)[1].out_features,
                       preprocess=backbone_preprocess(arch),
                       import_report={"missing": report.missing, "unexpected": report.unexpected})


def open_backbone(path, arch: Optional[str] = None, log: Callable[[str], None] = print
                  ) -> Tuple[nn.Module, dict]:
    """The backbone in ``path`` and its metadata: a toolkit backbone file, the decathlon's
    ResNet-26 as published (pickled model or state dict, adapters computed), or an
    external WRN state dict of ``arch`` (default wrn28_4). Any other file of a run folder
    is refused with one line naming the file to pass instead. The file is only read, and
    nothing in it is run."""
    path = Path(path)
    if not path.exists():
        beside = _beside(path.parent)
        hint = f"; did you mean {beside}?" if beside is not None else "; train one with python -m decathlon.pretrain"
        raise MissingFileError(f"backbone file {path} does not exist{hint}")
    problem = describe_run_file(path)
    if problem is not None:
        raise WeightsFileError(f"--backbone {problem}")
    if sniff_file(path) == "safetensors" and safetensors_metadata(path).get("format") == BACKBONE_FORMAT:
        model, meta = load_backbone(path)
    else:
        raw = read_torch_file(path, "backbone file")
        if isinstance(raw, dict) and raw.get("format") == BACKBONE_FORMAT:
            model, meta = _legacy_backbone(path, raw)
        else:
            return _external(path, raw, arch, log)
    if arch is not None and arch != meta["arch"]:
        raise UsageError(f"--arch {arch} differs from the architecture {meta['arch']!r} stored in backbone file {path}")
    return model, meta


def import_backbone(source, out, arch: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Convert a backbone file of any kind :func:`open_backbone` reads into this toolkit's
    backbone file ``out``, with the source file's name and SHA-256; returns its metadata."""
    model, meta = open_backbone(source, arch, log=log)
    meta = dict(meta)
    meta.setdefault("source_file", str(Path(source).resolve()))
    meta.setdefault("source_sha256", file_sha256(source))
    arch = meta.pop("arch")
    kept = {k: meta.pop(k) for k in ("num_classes", "arch_options") if k in meta}
    save_backbone(out, model, arch, **meta)
    return dict(meta, arch=arch, **kept)
