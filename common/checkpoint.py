"""Checkpoint files, the training checkpoint's schema, and the random-number-generator state.

A checkpoint is a plain dict saved with ``torch.save`` to a temporary file in the
destination folder and moved into place with ``os.replace``, so a run killed mid-write
leaves the previous checkpoint intact. Files are read back with ``weights_only=True``;
everything stored must therefore be tensors or basic Python types, which is why numpy's
RNG state is converted to a tensor here.

Every training run (decathlon, segmentation, classification, pretraining) writes the same
training checkpoint (:func:`save_training_checkpoint`), ``training_schema`` 1:

=============== ==============================================================
``epoch``       epochs completed
``model``       the tensors training changes (:func:`trainable_state`)
``optimizers``  ``{name: optimizer.state_dict()}``
``schedulers``  ``{name: scheduler.state_dict()}``
``rng``         one :func:`rng_state` per rank, indexed by rank
``settings``    the run's resolved config, compared on resume (:func:`changed_settings`)
``history``     every epoch's log record so far: log.jsonl is rewritten from it on resume
``monitor``     state of the collapse monitor
``fingerprint`` hash of the frozen backbone for piggyback runs, else None
=============== ==============================================================
"""
from __future__ import annotations

import io
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from common.errors import CheckpointError
from common.atomic import atomic_write_bytes

__all__ = ["CHECKPOINT_VERSION", "TRAINING_SCHEMA", "CheckpointError", "save_checkpoint",
           "load_checkpoint", "save_training_checkpoint", "load_training_checkpoint",
           "changed_settings", "trainable_state", "load_trainable_state", "rng_state",
           "set_rng_state"]

# Bump when the meaning of stored keys changes; older files are then refused.
CHECKPOINT_VERSION = 1
_VERSION_KEY = "format_version"
# Version of the training checkpoint's keys (the table in the module docstring).
TRAINING_SCHEMA = 1
_SCHEMA_KEY = "training_schema"
_TRAINING_KEYS = ("epoch", "model", "optimizers", "schedulers", "rng", "settings", "history",
                  "monitor", "fingerprint")

PathLike = Union[str, os.PathLike]


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` plus ``format_version`` to ``path`` atomically; returns the path."""
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint({path}): state must be a dict, got {type(state).__name__}")
    if _VERSION_KEY in state and state[_VERSION_KEY] != CHECKPOINT_VERSION:
        raise ValueError(f"save_checkpoint({path}): state carries {_VERSION_KEY}="
                         f"{state[_VERSION_KEY]!r}, this code writes {CHECKPOINT_VERSION}")
    payload = dict(state)
    payload[_VERSION_KEY] = CHECKPOINT_VERSION
    buffer = io.BytesIO()
    # Serialise fully in memory first: a failure while pickling never touches the disk.
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file readable "
                              f"with weights_only=True: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    version = state.get(_VERSION_KEY)
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has {_VERSION_KEY}={version!r}, this code "
                              f"reads version {CHECKPOINT_VERSION}; start a fresh run folder")
    return state


def save_training_checkpoint(path: PathLike, *, epoch: int, model: Mapping[str, torch.Tensor],
                             optimizers: Mapping[str, Any], schedulers: Mapping[str, Any],
                             rng: List[Dict[str, Any]], config: Mapping[str, Any],
                             history: List[Dict[str, Any]], monitor: Mapping[str, Any],
                             fingerprint: Any = None) -> Path:
    """Write a training checkpoint (see the module docstring for the keys)."""
    return save_checkpoint(path, {
        _SCHEMA_KEY: TRAINING_SCHEMA, "epoch": int(epoch), "model": dict(model),
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "rng": list(rng), "settings": dict(config), "history": list(history),
        "monitor": dict(monitor), "fingerprint": fingerprint})


def load_training_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a training checkpoint, refusing other schemas and incomplete files."""
    state = load_checkpoint(path, map_location)
    if state.get(_SCHEMA_KEY) != TRAINING_SCHEMA:
        raise CheckpointError(f"checkpoint {path} has {_SCHEMA_KEY}={state.get(_SCHEMA_KEY)!r}, this "
                              f"code resumes schema {TRAINING_SCHEMA}; it was written by another "
                              f"version of the toolkit: start a fresh run folder (--out)")
    missing = [k for k in _TRAINING_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; start a fresh run folder (--out)")
    return state


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested mappings (config.json's ``resolved``) as ``outer.inner`` keys."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any],
                     may_change: Iterable[str] = (), absent: Optional[Mapping[str, Any]] = None) -> List[str]:
    """``"key: saved there, now here"`` for every key whose value differs, except those in
    ``may_change``. Every key counts, so a setting added later is compared automatically:
    a key the saved record lacks counts as ``absent[key]`` when given (what runs written
    before the setting existed did), else as a difference."""
    allowed = set(may_change)
    saved, now = _flatten(saved), _flatten(now)
    for key, value in (absent or {}).items():
        if key not in saved and key in now:
            saved[key] = value
    keys = sorted((set(saved) | set(now)) - allowed)
    missing = object()
    return [f"{k}: {saved.get(k, '<absent>')!r} there, {now.get(k, '<absent>')!r} now"
            for k in keys if saved.get(k, missing) != now.get(k, missing)]


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors training changes: parameters with ``requires_grad`` and every buffer.
    A piggyback run's frozen backbone is left out: it is rebuilt from its source."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keep}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor],
                         where: str = "checkpoint") -> None:
    """Inverse of :func:`trainable_state`: exactly the trainable keys must be present (mask
    scheme extras saved in an earlier layout of their scheme are converted first)."""
    from common.masking import upgrade_scheme_state
    state = upgrade_scheme_state(model, state)
    expected = set(trainable_state(model))
    if set(state) != expected:
        raise CheckpointError(f"{where} does not match this model: missing {sorted(expected - set(state))[:5]}, "
                              f"unexpected {sorted(set(state) - expected)[:5]} (was it made with other settings?)")
    result = model.load_state_dict(dict(state), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert expected.isdisjoint(result.missing_keys), result.missing_keys


def rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Current state of python ``random``, numpy, torch CPU and (if present) CUDA RNGs.

    With a CUDA ``device`` only that device's generator is kept (each rank of a
    distributed run owns one device); otherwise every visible device's. Only tensors,
    ints, lists and strings, so it loads under ``weights_only=True``.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: Dict[str, Any] = {
        "python": {"version": int(py_version),
                   "state": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": str(np_name),
                  "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        state["cuda"] = [torch.cuda.get_rng_state(index)]
        state["cuda_index"] = index
    elif torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], device: Optional[torch.device] = None) -> None:
    """Restore what :func:`rng_state` returned (CUDA only when present on both sides).
    A one-device state goes to ``device`` when that is a CUDA device (a run resumed on
    another GPU), else back to the device it came from."""
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise KeyError(f"rng state lacks {missing}; expected the dict made by rng_state()")
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["name"], keys, int(npst["pos"]), int(npst["has_gauss"]),
                         float(npst["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu().to(torch.uint8) for s in state["cuda"]]
        if "cuda_index" in state:
            target = torch.device(device) if device is not None else None
            index = target.index if target is not None and target.type == "cuda" else int(state["cuda_index"])
            torch.cuda.set_rng_state(cuda_states[0], device=torch.cuda.current_device() if index is None else index)
            return
        # A run resumed on fewer GPUs restores the devices it has.
        for index, s in enumerate(cuda_states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device=index)
