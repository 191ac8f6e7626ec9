"""Resumable training checkpoints and the random-number-generator state inside them.

A checkpoint is a plain dict (the unwrapped model's ``state_dict``, optimizer, scheduler,
epoch, RNG state ...) saved with ``torch.save`` to a temporary file in the destination
folder and moved into place with ``os.replace``, so a run killed mid-write leaves the
previous checkpoint intact. Files are read back with ``weights_only=True``; everything
stored must therefore be tensors or basic Python types, which is why numpy's RNG state
is converted to a tensor here.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from common.runlog import atomic_write_bytes

__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "rng_state", "set_rng_state"]

# Bump when the meaning of stored keys changes; older files are then refused.
CHECKPOINT_VERSION = 1
_VERSION_KEY = "format_version"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or of another format version."""


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


def rng_state() -> Dict[str, Any]:
    """Current state of python ``random``, numpy, torch CPU and (if present) CUDA RNGs.

    Only tensors, ints, lists and strings, so it loads under ``weights_only=True``.
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
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA only when present on both sides)."""
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
        # A run resumed on fewer GPUs restores the devices it has.
        for index, s in enumerate(cuda_states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device=index)
