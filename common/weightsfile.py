"""Full-weight files: every tensor of a model trained without masks (the finetune,
feature and scratch baselines), as safetensors.

Header (string metadata): ``format`` (which network the file holds, e.g.
``decathlon-weights``; readers check it), ``format_version`` and ``meta`` (JSON of the
keyword arguments given to :func:`save_weights_file`: task, arch, method ...). Files are
written to a temporary file and renamed into place. Files written before this module
kept their metadata under ``user`` instead of ``meta``; they are still read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.errors import MaskFileError, MissingFileError, WeightsFileError
from common.atomic import atomic_write_bytes

__all__ = ["save_weights_file", "read_weights_file", "read_weights_metadata", "load_weights_file",
           "WEIGHTS_FILE_VERSION", "safetensors_metadata"]

WEIGHTS_FILE_VERSION = 1
PathLike = Union[str, os.PathLike]


def save_weights_file(path: PathLike, model: Union[nn.Module, Mapping[str, torch.Tensor]], *,
                      format: str, **meta) -> Path:
    """Write every tensor of ``model`` (a module or a state dict) and ``meta``."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"save_weights_file metadata must be JSON-serialisable: {exc}") from None
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    header = {"format": format, "format_version": str(WEIGHTS_FILE_VERSION), "meta": meta_json}
    return atomic_write_bytes(path, st_save(tensors, metadata=header))


def safetensors_metadata(path: PathLike, what: str = "safetensors") -> Dict[str, str]:
    """The string metadata of a safetensors file, without reading its tensors (the one
    header reader of the toolkit); a clear error naming the file when it is missing, a
    folder or not safetensors."""
    path = Path(path)
    if path.is_dir():
        raise MissingFileError(f"{what} file {path} is a folder, not a file")
    if not path.is_file():
        raise MissingFileError(f"{what} file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        error = MaskFileError if what == "mask" else WeightsFileError
        raise error(f"{path} is not a readable {what} file: {exc}") from None


def read_weights_metadata(path: PathLike, format: Optional[str] = None) -> dict:
    """The ``meta`` of a weights file without reading its tensors; with ``format``, a file
    of another format is refused."""
    path = Path(path)
    header = safetensors_metadata(path, "weights")
    legacy = "format" not in header and "user" in header
    if format is not None and not legacy and header.get("format") != format:
        raise WeightsFileError(f"{path} is not a {format} file (format={header.get('format')!r})")
    try:
        return json.loads(header.get("meta", header.get("user", "{}")))
    except json.JSONDecodeError as exc:
        raise WeightsFileError(f"{path} has unreadable metadata: {exc}") from None


def read_weights_file(path: PathLike, format: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a weights file."""
    meta = read_weights_metadata(path, format)
    try:
        tensors = st_load(Path(path).read_bytes())
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsFileError(f"{path} is not a readable safetensors weights file: {exc}") from None
    return tensors, meta


def load_weights_file(model: nn.Module, path: PathLike, format: Optional[str] = None) -> dict:
    """Load a weights file into ``model``; its keys and shapes must be exactly the model's.
    Returns the file's meta."""
    state, meta = read_weights_file(path, format)
    own = model.state_dict()
    shapes = sorted(k for k in set(state) & set(own) if own[k].shape != state[k].shape)
    if set(state) != set(own) or shapes:
        raise WeightsFileError(f"{path} does not fit this model: keys only in the file "
                               f"{sorted(set(state) - set(own))[:5]}, only in the model "
                               f"{sorted(set(own) - set(state))[:5]}, other shapes {shapes[:5]}")
    model.load_state_dict(state)
    return meta
