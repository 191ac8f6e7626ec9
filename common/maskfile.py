"""The mask file: one task's binary masks, its trained layers and its metadata.

Format: safetensors (no pickle, safe to open from anyone). Tensors:

- ``mask/<layer>``: the thresholded mask of each masked layer, bit-packed (1 bit per
  weight, 2 for ternary masks, see :mod:`common.bits`) or, with ``compress=True``,
  entropy-coded (:mod:`common.entropy`), as uint8;
- ``sign/<layer>``: ternary masks saved compressed: one packed sign bit per non-zero entry;
- ``state/<key>``: the task's own trained tensors (new heads, task-specific norm layers).

Metadata (strings): ``format``, ``format_version``, ``threshold``, ``ternary``,
``fingerprint`` (hash of the frozen backbone it was trained on), ``layers`` (JSON: shape
and encoding per layer) and ``user`` (JSON of the keyword arguments given to save_masks:
task, arch, ...). Files are written to a temporary file and renamed into place.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .bits import pack_bits, pack_mask, unpack_bits, unpack_mask
from .runlog import atomic_write_bytes
from .masking import (MaskedLayer, backbone_fingerprint, masked_modules, set_binary_mask,
                      task_state_modules)

FORMAT = "piggyback-masks"
FORMAT_VERSION = 1
__all__ = ["save_masks", "load_masks", "read_mask_metadata", "read_mask_file", "task_state",
           "MaskFileError", "FORMAT_VERSION", "safetensors_metadata"]


class MaskFileError(ValueError):
    """A mask file that cannot be used: unreadable, wrong format, or another backbone."""


def task_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The per-task trained tensors (heads, task-specific norm layers) by state_dict key."""
    state = {}
    for name, module in task_state_modules(model):
        prefix = f"{name}." if name else ""
        for key, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is not None:
                state[prefix + key] = t.detach()
    return state


def save_masks(model: torch.nn.Module, path, *, compress: bool = False, **metadata) -> Path:
    """Write the model's thresholded masks, task state and metadata to ``path``.

    ``metadata`` must be JSON-serialisable (e.g. task="svhn", arch="wrn28_4").
    ``compress=True`` entropy-codes each mask close to the binary entropy of its zero
    fraction instead of storing 1 bit per weight.
    """
    path = Path(path)
    layers = list(masked_modules(model))
    if not layers:
        raise ValueError("model has no masked layers: convert it with common.masking.piggyback first")
    try:
        user = json.dumps(metadata, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"save_masks metadata must be JSON-serialisable: {e}") from None
    tensors: Dict[str, torch.Tensor] = {}
    info = {}
    ternary = layers[0][1].ternary
    for name, layer in layers:
        m = layer.binary_mask().cpu()
        if compress:
            from .entropy import encode_mask
            nonzero = (m != 0).reshape(-1).numpy()
            tensors[f"mask/{name}"] = torch.frombuffer(bytearray(encode_mask(nonzero)), dtype=torch.uint8)
            if layer.ternary:
                tensors[f"sign/{name}"] = pack_bits(m.reshape(-1)[m.reshape(-1) != 0] < 0)
        else:
            tensors[f"mask/{name}"] = pack_mask(m, layer.ternary)
        info[name] = {"shape": list(m.shape), "encoding": "entropy" if compress else "packed"}
    for key, t in task_state(model).items():
        tensors[f"state/{key}"] = t.cpu().contiguous().clone()
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "threshold": repr(layers[0][1].threshold),
        "ternary": str(bool(ternary)),
        "fingerprint": backbone_fingerprint(model),
        "layers": json.dumps(info),
        "user": user,
    }
    atomic_write_bytes(path, st_save(tensors, metadata=header))
    return path


def safetensors_metadata(path, what: str = "safetensors") -> Dict[str, str]:
    """The string metadata of a safetensors file, without reading its tensors; a clear
    error naming the file when it is missing or not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise MaskFileError(f"{path} is not a readable {what} file: {e}") from None


def _header(path: Path) -> Dict[str, str]:
    header = safetensors_metadata(path, "mask")
    if header.get("format") != FORMAT:
        raise MaskFileError(f"{path} is not a piggyback mask file (format={header.get('format')!r}, expected {FORMAT!r})")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise MaskFileError(f"{path} has mask-file version {header.get('format_version')}, this toolkit reads {FORMAT_VERSION}")
    return header


def read_mask_metadata(path) -> dict:
    """Metadata of a mask file without loading it: the user's keys (task, arch, ...)
    plus threshold, ternary, fingerprint, layers (shape and encoding) and the file's bytes."""
    path = Path(path)
    h = _header(path)
    meta = json.loads(h["user"])
    meta.update(threshold=float(h["threshold"]), ternary=h["ternary"] == "True",
                fingerprint=h["fingerprint"], layers=json.loads(h["layers"]),
                format_version=int(h["format_version"]), file_bytes=path.stat().st_size)
    return meta


def read_mask_file(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], dict]:
    """(masks by layer name as float tensors in {0,1} or {-1,0,1}, task state, metadata)."""
    path = Path(path)
    meta = read_mask_metadata(path)
    tensors = st_load(path.read_bytes())
    masks = {}
    for name, info in meta["layers"].items():
        key = f"mask/{name}"
        if key not in tensors:
            raise MaskFileError(f"{path} lists layer {name!r} but holds no tensor {key!r}")
        shape = tuple(info["shape"])
        if info["encoding"] == "packed":
            masks[name] = unpack_mask(tensors[key], shape, meta["ternary"])
            continue
        from .entropy import decode_mask
        n = int(np.prod(shape))
        nonzero = torch.from_numpy(np.asarray(decode_mask(tensors[key].numpy().tobytes(), n), dtype=bool).copy())
        mask = nonzero.to(torch.float32)
        if meta["ternary"]:
            negative = unpack_bits(tensors[f"sign/{name}"], int(nonzero.sum()))
            mask[nonzero] = 1 - 2 * negative.to(torch.float32)
        masks[name] = mask.view(shape)
    state = {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}
    return masks, state, meta


def _check_compatible(model: torch.nn.Module, path: Path, meta: dict, check_fingerprint: bool) -> Dict[str, MaskedLayer]:
    layers = dict(masked_modules(model))
    if not layers:
        raise MaskFileError(f"cannot load {path}: the model has no masked layers (call common.masking.piggyback first)")
    expected = {n: list(m.weight.shape) for n, m in layers.items()}
    found = {n: i["shape"] for n, i in meta["layers"].items()}
    if expected != found:
        only_file = sorted(set(found) - set(expected))[:5]
        only_model = sorted(set(expected) - set(found))[:5]
        shape = [n for n in set(found) & set(expected) if found[n] != expected[n]][:5]
        raise MaskFileError(
            f"{path} does not fit this model: layers only in the file {only_file}, only in the model "
            f"{only_model}, shape differences {[(n, found[n], expected[n]) for n in shape]}")
    if any(m.ternary != meta["ternary"] for m in layers.values()):
        raise MaskFileError(f"{path} holds {'ternary' if meta['ternary'] else 'binary'} masks; the model was converted otherwise")
    if check_fingerprint:
        fp = backbone_fingerprint(model)
        if fp != meta["fingerprint"]:
            raise MaskFileError(
                f"{path} was trained on another backbone (fingerprint {meta['fingerprint']}, this model's frozen "
                f"weights hash to {fp}); load the backbone it was trained on (arch={meta.get('arch')!r})")
    return layers


@torch.no_grad()
def load_masks(model: torch.nn.Module, path, *, check_fingerprint: bool = True) -> dict:
    """Load a mask file into a piggybacked ``model`` (masks and task state); return its metadata.

    Refused with :class:`MaskFileError` when the file was trained on another backbone
    (fingerprint) or its layers and shapes differ from the model's.
    """
    path = Path(path)
    masks, state, meta = read_mask_file(path)
    layers = _check_compatible(model, path, meta, check_fingerprint)
    own = task_state(model)
    if set(own) != set(state):
        raise MaskFileError(f"{path} holds task state {sorted(state)} but the model's task modules have {sorted(own)}")
    for key, t in state.items():
        if own[key].shape != t.shape:
            raise MaskFileError(f"{path}: task tensor {key!r} has shape {tuple(t.shape)}, the model's is {tuple(own[key].shape)}")
    for name, layer in layers.items():
        set_binary_mask(layer, masks[name])
    for key, t in state.items():
        own[key].copy_(t)
    return meta
