"""The mask file: one task's masks, its trained layers and everything needed to use them.

Format: safetensors (no pickle, safe to open from anyone). Tensors:

- ``mask/<key>``: the thresholded mask of each masked weight, bit-packed by its scheme
  (1 bit per weight for binary masks, 2 for ternary; :mod:`common.schemes`) or, with
  ``compress=True``, entropy-coded (:mod:`common.entropy`), as uint8;
- ``sign/<key>``: signed masks saved compressed: one packed sign bit per non-zero entry;
- ``extra/<key>/<name>``: the scheme's trained values beside the mask (``affine``: one
  tensor ``abcd`` whose rows are a, b, c, d; files of its earlier layout, with ``a`` ...
  ``d`` apart, are read and converted), float32;
- ``state/<key>``: the task's own trained tensors (new heads, task-specific norm layers).

Header (strings; format version 2): ``format``, ``format_version``, ``scheme``,
``threshold``, ``mask_scale``, ``fingerprint`` (hash of the frozen backbone), ``layers``
(JSON: shape, encoding and the shapes of the scheme's extras per masked weight), ``skip`` (JSON list of the task's new
modules), ``train_bn`` (``true``/``false``) and ``user`` (JSON of the keyword arguments
given to :func:`save_masks`: task, arch, ...). With these, :func:`load_masks` converts a
plain model from the file alone. Version-1 files (``ternary`` instead of ``scheme``, no
``skip``/``train_bn``) still load into an already converted model.

Every header key and tensor is checked before anything is computed; a bad file raises
:class:`MaskFileError` naming the file and the key. Files are written to a temporary
file and renamed into place.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .bits import pack_bits, unpack_bits
from .errors import MaskFileError, UsageError
from .masking import (SETTINGS_ATTR, backbone_fingerprint, conversion_settings, is_piggybacked, mask_entries,
                      piggyback, set_layer_scheme, task_state_modules)
from .runlog import atomic_write_bytes
from .weightsfile import safetensors_metadata
from .schemes import SCHEMES, get_scheme

FORMAT = "piggyback-masks"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ENCODINGS = ("packed", "entropy")
RESERVED_KEYS = ("threshold", "ternary", "scheme", "mask_scale", "fingerprint", "layers", "skip", "train_bn",
                 "format_version", "file_bytes")
__all__ = ["save_masks", "load_masks", "read_mask_metadata", "read_mask_file", "MaskFileContents", "task_state",
           "MaskFileError", "FORMAT_VERSION", "MASK_FORMAT"]

MASK_FORMAT = FORMAT


class MaskFileContents(NamedTuple):
    """What a mask file holds: thresholded masks (float, the scheme's values) by key, the
    task's own tensors by state_dict key, the checked metadata, and the scheme's extras
    (``{key: {name: tensor}}``, empty for plain masks)."""

    masks: Dict[str, torch.Tensor]
    state: Dict[str, torch.Tensor]
    meta: dict
    extras: Dict[str, Dict[str, torch.Tensor]]


def task_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The per-task trained tensors (heads, task-specific norm layers) by state_dict key."""
    state = {}
    for name, module in task_state_modules(model):
        prefix = f"{name}." if name else ""
        for key, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is not None:
                state[prefix + key] = t.detach()
    return state


def save_masks(model: nn.Module, path, *, compress: bool = False, **metadata) -> Path:
    """Write the model's thresholded masks, task state and metadata to ``path``.

    ``metadata`` must be JSON-serialisable (e.g. task="svhn", arch="wrn28_4").
    ``compress=True`` entropy-codes each mask close to the binary entropy of its zero
    fraction instead of storing 1 bit per weight.
    """
    path = Path(path)
    entries = mask_entries(model)
    if not entries:
        raise UsageError("model has no masked layers: convert it with common.masking.piggyback first")
    clash = sorted(set(metadata) & set(RESERVED_KEYS))
    if clash:
        raise UsageError(f"save_masks metadata keys {clash} are reserved for the file's own header")
    try:
        user = json.dumps(metadata, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"save_masks metadata must be JSON-serialisable: {e}") from None
    settings = conversion_settings(model)
    scheme = get_scheme(settings["scheme"])
    tensors: Dict[str, torch.Tensor] = {}
    info = {}
    for e in entries:
        m = e.binary().cpu()
        if compress:
            from .entropy import encode_mask
            nonzero = (m != 0).reshape(-1).numpy()
            tensors[f"mask/{e.key}"] = torch.frombuffer(bytearray(encode_mask(nonzero)), dtype=torch.uint8)
            if min(scheme.values) < 0:
                flat = m.reshape(-1)
                tensors[f"sign/{e.key}"] = pack_bits(flat[flat != 0] < 0)
        else:
            tensors[f"mask/{e.key}"] = scheme.pack(m)
        info[e.key] = {"shape": list(m.shape), "encoding": "entropy" if compress else "packed"}
        extras = e.extras
        if extras:
            info[e.key]["extras"] = {k: list(t.shape) for k, t in extras.items()}
            for k, t in extras.items():
                tensors[f"extra/{e.key}/{k}"] = t.detach().to("cpu", torch.float32).contiguous().clone()
    for key, t in task_state(model).items():
        tensors[f"state/{key}"] = t.cpu().contiguous().clone()
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "scheme": scheme.name,
        "threshold": repr(float(settings["threshold"])),
        "mask_scale": repr(float(settings["mask_scale"])),
        "fingerprint": backbone_fingerprint(model),
        "layers": json.dumps(info),
        "skip": json.dumps(list(settings["skip"])),
        "train_bn": "true" if settings["train_bn"] else "false",
        "user": user,
    }
    atomic_write_bytes(path, st_save(tensors, metadata=header))
    return path


# ---------------------------------------------------------------- header checks

def _require(path: Path, header: Dict[str, str], key: str, expected: str) -> str:
    if key not in header:
        raise MaskFileError(f"{path}: header key {key!r} is missing (expected {expected})")
    return header[key]


def _json(path: Path, header: Dict[str, str], key: str, kind: type, expected: str):
    text = _require(path, header, key, expected)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise MaskFileError(f"{path}: header key {key!r} is not valid JSON ({text[:60]!r}); expected {expected}") from None
    if not isinstance(value, kind):
        raise MaskFileError(f"{path}: header key {key!r} holds a {type(value).__name__}; expected {expected}")
    return value


def _positive_float(path: Path, header: Dict[str, str], key: str) -> float:
    text = _require(path, header, key, "a positive number")
    try:
        value = float(text)
    except ValueError:
        raise MaskFileError(f"{path}: header key {key!r} = {text!r} is not a number; expected a positive number") from None
    if not (math.isfinite(value) and value > 0):
        raise MaskFileError(f"{path}: header key {key!r} = {text!r}; expected a positive finite number")
    return value


def _check_layers(path: Path, layers: dict) -> None:
    if not layers:
        raise MaskFileError(f"{path}: header key 'layers' lists no masked layer")
    for name, info in layers.items():
        if not isinstance(info, dict):
            raise MaskFileError(f"{path}: layer {name!r} in header key 'layers' is not an object with shape and encoding")
        shape = info.get("shape")
        if not (isinstance(shape, list) and shape and all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                                          for s in shape)):
            raise MaskFileError(f"{path}: layer {name!r} has shape {shape!r}; expected a list of positive integers")
        if info.get("encoding") not in ENCODINGS:
            raise MaskFileError(f"{path}: layer {name!r} has encoding {info.get('encoding')!r}; expected one of {ENCODINGS}")
        extras = info.get("extras", {})
        if not (isinstance(extras, dict) and all(isinstance(k, str) and isinstance(v, list)
                                                 and all(isinstance(s, int) and s > 0 for s in v)
                                                 for k, v in extras.items())):
            raise MaskFileError(f"{path}: layer {name!r} has extras {extras!r}; expected an object of name: shape")


def read_mask_metadata(path) -> dict:
    """Metadata of a mask file without loading its tensors, every header key checked: the
    user's keys (task, arch, ...) plus scheme, threshold, mask_scale, fingerprint,
    layers (shape and encoding), skip, train_bn, format_version and the file's bytes."""
    path = Path(path)
    h = safetensors_metadata(path, "mask")
    if h.get("format") != FORMAT:
        raise MaskFileError(f"{path} is not a piggyback mask file (header key 'format' = {h.get('format')!r}, "
                            f"expected {FORMAT!r})")
    version_text = _require(path, h, "format_version", f"one of {READABLE_VERSIONS}")
    if version_text not in {str(v) for v in READABLE_VERSIONS}:
        raise MaskFileError(f"{path} has mask-file version {version_text!r}; this toolkit reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
    version = int(version_text)
    user = _json(path, h, "user", dict, "a JSON object of user metadata")
    layers = _json(path, h, "layers", dict, "a JSON object of layer shapes and encodings")
    _check_layers(path, layers)
    threshold = _positive_float(path, h, "threshold")
    fingerprint = _require(path, h, "fingerprint", "32 hexadecimal digits")
    if not re.fullmatch(r"[0-9a-f]{32}", fingerprint):
        raise MaskFileError(f"{path}: header key 'fingerprint' = {fingerprint[:40]!r}; expected 32 hexadecimal digits")
    if version == 1:
        ternary = _require(path, h, "ternary", "'True' or 'False'")
        if ternary not in ("True", "False"):
            raise MaskFileError(f"{path}: header key 'ternary' = {ternary!r}; expected 'True' or 'False'")
        scheme, skip, train_bn, mask_scale = ("ternary" if ternary == "True" else "binary"), None, None, 1e-2
    else:
        scheme = _require(path, h, "scheme", f"one of {sorted(SCHEMES)}")
        if scheme not in SCHEMES:
            raise MaskFileError(f"{path}: header key 'scheme' = {scheme!r} is not a registered mask scheme "
                                f"({', '.join(SCHEMES)}); register it with common.schemes.register_scheme first")
        skip = _json(path, h, "skip", list, "a JSON list of module names")
        if not all(isinstance(s, str) for s in skip):
            raise MaskFileError(f"{path}: header key 'skip' = {skip!r}; expected a list of module names")
        train_bn = _require(path, h, "train_bn", "'true' or 'false'")
        if train_bn not in ("true", "false"):
            raise MaskFileError(f"{path}: header key 'train_bn' = {train_bn!r}; expected 'true' or 'false'")
        train_bn = train_bn == "true"
        mask_scale = _positive_float(path, h, "mask_scale")
    scheme_obj = get_scheme(scheme)
    for name, info in layers.items():
        want = {k: list(scheme_obj.extras_shape(info["shape"])) for k in scheme_obj.extras}
        if info.get("extras", {}) not in (want, scheme_obj.legacy_extras_shapes(info["shape"])):
            raise MaskFileError(f"{path}: layer {name!r} lists extras {info.get('extras', {})}; {scheme} masks of "
                                f"shape {info['shape']} have {want}")
    meta = dict(user)
    meta.update(scheme=scheme, threshold=threshold, mask_scale=mask_scale,
                fingerprint=fingerprint, layers=layers, skip=skip, train_bn=train_bn,
                format_version=version, file_bytes=path.stat().st_size)
    return meta


def read_mask_file(path) -> MaskFileContents:
    """(masks by key as float tensors with the scheme's values, task state, metadata, scheme
    extras), every tensor checked against the header (names, dtype, size)."""
    path = Path(path)
    meta = read_mask_metadata(path)
    try:
        tensors = st_load(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as e:
        raise MaskFileError(f"{path} is not a readable mask file: {e}") from None
    scheme = get_scheme(meta["scheme"])
    signed = scheme.signed
    expected = {f"mask/{k}" for k in meta["layers"]}
    expected |= {f"sign/{k}" for k, i in meta["layers"].items() if signed and i["encoding"] == "entropy"}
    expected |= {f"extra/{k}/{e}" for k, i in meta["layers"].items() for e in i.get("extras", {})}
    unknown = sorted(k for k in tensors if k not in expected and not k.startswith("state/"))
    if unknown:
        raise MaskFileError(f"{path} holds tensors {unknown[:5]} that its header does not list")
    masks = {}
    for name, info in meta["layers"].items():
        key = f"mask/{name}"
        if key not in tensors:
            raise MaskFileError(f"{path} lists layer {name!r} but holds no tensor {key!r}")
        t = tensors[key]
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise MaskFileError(f"{path}: tensor {key!r} is {t.dtype} of shape {tuple(t.shape)}; expected 1-D uint8")
        shape = tuple(info["shape"])
        n = int(np.prod(shape))
        if info["encoding"] == "packed":
            if t.numel() != scheme.packed_bytes(n):
                raise MaskFileError(f"{path}: tensor {key!r} has {t.numel()} bytes; a {scheme.name} mask of shape "
                                    f"{list(shape)} packs into {scheme.packed_bytes(n)}")
            masks[name] = scheme.unpack(t, shape)
            continue
        from .entropy import decode_mask
        try:
            nonzero = np.asarray(decode_mask(t.numpy().tobytes(), n), dtype=bool)
        except Exception as e:  # a corrupt bit stream can fail in many ways inside the decoder
            raise MaskFileError(f"{path}: tensor {key!r} does not decode to {n} mask entries: {e}") from None
        mask = torch.from_numpy(nonzero.copy()).to(torch.float32)
        if signed:
            sign_key = f"sign/{name}"
            count = int(nonzero.sum())
            if sign_key not in tensors or tensors[sign_key].numel() != (count + 7) // 8:
                raise MaskFileError(f"{path}: tensor {sign_key!r} is missing or does not hold {count} sign bits")
            negative = unpack_bits(tensors[sign_key], count)
            mask[mask.bool()] = 1 - 2 * negative.to(torch.float32)
        masks[name] = mask.view(shape)
    extras: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, info in meta["layers"].items():
        for k, shape in info.get("extras", {}).items():
            key = f"extra/{name}/{k}"
            t = tensors.get(key)
            if t is None or t.dtype != torch.float32 or list(t.shape) != shape:
                raise MaskFileError(f"{path}: tensor {key!r} is missing or not float32 of shape {shape}")
            if not bool(torch.isfinite(t).all()):
                raise MaskFileError(f"{path}: tensor {key!r} holds non-finite values")
            extras.setdefault(name, {})[k] = t
    for name, layer in extras.items():  # an earlier layout of the scheme's extras, in the current one
        extras[name] = scheme.upgrade_extras(layer)
        meta["layers"][name]["extras"] = {k: list(t.shape) for k, t in extras[name].items()}
    state = {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}
    return MaskFileContents(masks, state, meta, extras)


# ------------------------------------------------------------- model checks

def _check_compatible(model: nn.Module, origin, meta: dict, check_fingerprint: bool, state=None):
    """Refuse a file whose masks, scheme, backbone or task tensors do not fit ``model``."""
    entries = {e.key: e for e in mask_entries(model)}
    if not entries:
        raise MaskFileError(f"cannot load {origin}: the model has no masked layers (call common.masking.piggyback first)")
    expected = {k: list(e.weight.shape) for k, e in entries.items()}
    found = {n: i["shape"] for n, i in meta["layers"].items()}
    if expected != found:
        only_file = sorted(set(found) - set(expected))[:5]
        only_model = sorted(set(expected) - set(found))[:5]
        shape = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])[:5]
        raise MaskFileError(
            f"{origin} does not fit this model: layers only in the file {only_file}, only in the model "
            f"{only_model}, shape differences {[(n, found[n], expected[n]) for n in shape]}")
    if check_fingerprint:
        fp = backbone_fingerprint(model)
        if fp != meta["fingerprint"]:
            raise MaskFileError(
                f"{origin} was trained on another backbone (fingerprint {meta['fingerprint']}, this model's frozen "
                f"weights hash to {fp}); load the backbone it was trained on (arch={meta.get('arch')!r})")
    if state is not None:
        own = task_state(model)
        if set(own) != set(state):
            raise MaskFileError(f"{origin} holds task tensors {sorted(state)[:8]} but the model's task modules have "
                                f"{sorted(own)[:8]}")
        for key, t in state.items():
            if own[key].shape != t.shape:
                raise MaskFileError(f"{origin}: task tensor {key!r} has shape {tuple(t.shape)}, the model's is "
                                    f"{tuple(own[key].shape)}")
            if own[key].dtype != t.dtype:
                raise MaskFileError(f"{origin}: task tensor {key!r} is {t.dtype}, the model's is {own[key].dtype}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MaskFileError(f"{origin}: task tensor {key!r} holds non-finite values")
    return entries


def _fit_heads(model: nn.Module, skip, state: Dict[str, torch.Tensor], path: Path) -> None:
    """Give the task's new Linear layers the shapes the file's tensors have (a classifier
    of another class count), before the model is converted."""
    for name in skip:
        w = state.get(f"{name}.weight")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise MaskFileError(f"{path}: the task module {name!r} (header key 'skip') is not part of this "
                                f"{type(model).__name__}") from None
        if isinstance(module, nn.Linear) and w is not None and w.dim() == 2 and tuple(w.shape) != tuple(module.weight.shape):
            new = nn.Linear(w.shape[1], w.shape[0], bias=f"{name}.bias" in state)
            new = new.to(device=module.weight.device, dtype=module.weight.dtype)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def load_masks(model: nn.Module, path, *, check_fingerprint: bool = True) -> dict:
    """Load a mask file into ``model`` (masks and task state); return its metadata.

    A plain model (not yet converted) is converted as the file says (scheme, threshold,
    task modules, task-specific norm layers), its classifier resized to the file's. Refused
    with :class:`MaskFileError` when the file was trained on another backbone
    (fingerprint), or its layers, shapes or tensor types differ from the model's.
    """
    path = Path(path)
    masks, state, meta, extras = read_mask_file(path)
    if not is_piggybacked(model):
        if meta["skip"] is None:
            raise MaskFileError(f"{path} is a version-1 mask file, which does not record how the model was "
                                f"converted: call common.masking.piggyback on the model first")
        _fit_heads(model, meta["skip"], state, path)
        piggyback(model, scheme=meta["scheme"], threshold=meta["threshold"], mask_init="constant",
                  mask_scale=meta["mask_scale"], skip=meta["skip"], train_bn=meta["train_bn"])
    entries = _check_compatible(model, path, meta, check_fingerprint, state)
    own = task_state(model)
    for key, e in entries.items():
        if e.module.scheme.name != meta["scheme"] or e.module.threshold != meta["threshold"]:
            set_layer_scheme(e.module, meta["scheme"], meta["threshold"])
        for name, t in e.extras.items():
            t.copy_(extras[key][name])
        e.set(masks[key])
    settings = model.__dict__.get(SETTINGS_ATTR)
    if settings is not None:
        settings.update(scheme=meta["scheme"], threshold=meta["threshold"])
    for key, t in state.items():
        own[key].copy_(t)
    return meta
