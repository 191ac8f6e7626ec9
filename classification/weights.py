"""Pretrained weight files: where they are, how they are read, and how their keys are
adapted to the model they are loaded into.

A weight file is a state dict saved with ``torch.save`` (``.pth``, ``.pt``, ``.bin``, any
layout since torch 0.2, a whole pickled network included; read by
:func:`common.torchfile.read_torch_file`, which runs nothing the file names) or a safetensors
file, possibly wrapped (``{"state_dict": ...}``, ``{"model": ...}``) and possibly with
DataParallel's ``module.`` prefix. A file whose
keys follow another layout of the same architecture is adapted by a registered *layout*:
a pure function from state dict to state dict (see :func:`register_layout`). The first
layout after which every model key but the classifier is present, nothing is left over
and every shape agrees is used; when none fits, :class:`WeightsFileError` names the file
and the keys that do not fit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from common.errors import MissingFileError, WeightsFileError
from common.heads import classifier_name
from common.torchfile import read_state_dict, read_torch_file, sniff_file

__all__ = ["Layout", "LAYOUTS", "register_layout", "resolve_weights", 
           "check_weights_file", "fit_state_dict", "load_pretrained", "hub_checkpoint_dir"]

StateDict = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    name: str
    archs: Tuple[str, ...]  # architectures it applies to; () means every one
    summary: str
    convert: Callable[[StateDict], StateDict]


LAYOUTS: Dict[str, Layout] = {}


def register_layout(name: str, archs: Tuple[str, ...] = (), summary: str = ""):
    """Decorator registering ``fn(state_dict) -> state_dict`` as a key layout."""
    def wrap(fn: Callable[[StateDict], StateDict]):
        if name in LAYOUTS:
            raise ValueError(f"layout {name!r} is registered twice")
        LAYOUTS[name] = Layout(name, tuple(archs), summary, fn)
        return fn
    return wrap


@register_layout("plain", summary="the model's own key names")
def _plain(sd: StateDict) -> StateDict:
    return dict(sd)


_FLAT_BLOCK = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(.+)$")
# Older MobileNetV2 files hold each inverted-residual block as one flat ``conv``
# Sequential; torchvision nests conv+BN(+ReLU6) pairs. Expand-ratio-1 blocks have
# conv.{0,1,3,4} (depthwise conv, BN, project conv, BN); the others have
# conv.{0,1,3,4,6,7} (expand conv, BN, depthwise conv, BN, project conv, BN).
_FLAT_T1 = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_FLAT_T6 = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}


@register_layout("mobilenet_v2_flat", archs=("mobilenet_v2",),
                 summary="MobileNetV2 blocks as one flat conv Sequential (older layout)")
def _mobilenet_v2_flat(sd: StateDict) -> StateDict:
    expanding = {int(m.group(1)) for k in sd if (m := _FLAT_BLOCK.match(k)) and m.group(2) == "6"}
    out = {}
    for key, value in sd.items():
        m = _FLAT_BLOCK.match(key)
        if m is None:
            out[key] = value
            continue
        block, index, rest = int(m.group(1)), m.group(2), m.group(3)
        table = _FLAT_T6 if block in expanding else _FLAT_T1
        if index not in table:
            out[key] = value  # left over: reported as unexpected
            continue
        out[f"features.{block}.conv.{table[index]}.{rest}"] = value
    return out


def hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints``, where torchvision keeps the weight files it has."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(value: Union[str, Path], arch: Optional[str] = None) -> Path:
    """The weight file named by ``value``: a path, a file name in the torchvision cache
    (``$TORCH_HOME/hub/checkpoints``), or ``imagenet`` for torchvision's default ImageNet
    file of ``arch`` in that cache. Nothing is downloaded."""
    value = str(value)
    cache = hub_checkpoint_dir()
    if value == "imagenet":
        if arch is None:
            raise WeightsFileError("--weights imagenet needs --arch")
        name = _torchvision_default_file(arch)
        path = cache / name
        if not path.is_file():
            raise MissingFileError(f"torchvision's ImageNet weights of {arch} are not in the cache: "
                                   f"expected {path} (nothing is downloaded; copy the file there or "
                                   f"pass --weights FILE)")
        return path
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if path.name == value and (cache / value).is_file():
        return cache / value
    looked = f"{path}" + (f" or {cache / value}" if path.name == value else "")
    raise MissingFileError(f"weight file {value} not found (looked at {looked})")


def _torchvision_default_file(arch: str) -> str:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise WeightsFileError(f"--weights imagenet: {arch!r} is not a torchvision model; pass "
                               f"--weights FILE") from None
    return Path(weights.DEFAULT.url).name


def check_weights_file(path: Union[str, Path]) -> None:
    """Refuse, with one line saying what the file is, a file that is not pretrained weights:
    a mask file or a full-weights file of a trained task, a text or other file."""
    from common.maskfile import MASK_FORMAT
    from common.weightsfile import safetensors_metadata
    path = Path(path)
    kind = sniff_file(path)
    if kind not in ("safetensors", "zip", "pickle"):
        read_torch_file(path, "--weights")  # names what the file is instead
    if kind != "safetensors":
        return
    header = safetensors_metadata(path, "weights")
    if header.get("format") == MASK_FORMAT:
        import json
        user = json.loads(header.get("user") or "{}")
        named = user.get("backbone")
        raise WeightsFileError(f"--weights {path} is a piggyback mask file (task {user.get('task', '?')!r}), not "
                               f"ImageNet weights; pass the weight file it was trained on"
                               + (f", {named}" if named else "")
                               + f", and evaluate the mask with python -m classification.evaluate {path}")


def _sample(keys: List[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _problems(model_sd: StateDict, sd: StateDict, head: str):
    is_head = lambda k: k.startswith(head + ".")  # noqa: E731
    unexpected = [k for k in sd if k not in model_sd]
    missing = [k for k in model_sd if k not in sd and not is_head(k)
               and not k.endswith("num_batches_tracked")]
    shapes = [f"{k}: {tuple(sd[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in model_sd.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)
              and not is_head(k)]
    return unexpected, missing, shapes


def fit_state_dict(model: nn.Module, sd: StateDict, arch: str, what: str) -> Tuple[StateDict, dict]:
    """``sd`` renamed by the first layout that fits ``model``; returns (state dict to load
    with ``strict=False``, report). A classifier of another shape, or none, is left out:
    the task gets a new one."""
    model_sd = model.state_dict()
    head = classifier_name(model)
    layouts = [l for l in LAYOUTS.values() if arch in l.archs] + [l for l in LAYOUTS.values() if not l.archs]
    tried = []
    for layout in layouts:
        converted = layout.convert(sd)
        unexpected, missing, shapes = _problems(model_sd, converted, head)
        if not (unexpected or missing or shapes):
            keep = {k: v for k, v in converted.items()
                    if not k.startswith(head + ".") or tuple(v.shape) == tuple(model_sd[k].shape)}
            skipped = sorted(k for k in model_sd if k not in keep)
            return keep, {"layout": layout.name, "loaded": len(keep), "not_in_file": skipped}
        tried.append((len(unexpected) + len(missing) + len(shapes), layout.name, unexpected, missing, shapes))
    _, name, unexpected, missing, shapes = min(tried)
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} file keys the model lacks ({_sample(unexpected)})")
    if missing:
        parts.append(f"{len(missing)} model keys missing from the file ({_sample(missing)})")
    if shapes:
        parts.append(f"{len(shapes)} of other shape ({'; '.join(shapes[:2])})")
    raise WeightsFileError(f"{what} does not fit {arch}: {', '.join(parts)} "
                           f"[closest layout: {name}; tried {', '.join(t[1] for t in tried)}]")


def load_pretrained(model: nn.Module, path: Union[str, Path], arch: str) -> dict:
    """Load the weight file ``path`` into ``model`` (built for ``arch``); returns a report
    with the layout used, the file's metadata and the model keys the file did not set
    (the classifier at most)."""
    sd, meta = read_state_dict(path)
    if meta.get("arch") and meta["arch"] != arch:
        raise WeightsFileError(f"{path} holds weights of {meta['arch']}, not {arch}")
    state, report = fit_state_dict(model, sd, arch, what=str(path))
    result = model.load_state_dict(state, strict=False)
    allowed = set(report["not_in_file"])
    left = [k for k in result.missing_keys if k not in allowed]
    assert not result.unexpected_keys and not left, (result.unexpected_keys, left)
    report.update(file=str(path), metadata=meta)
    return report
