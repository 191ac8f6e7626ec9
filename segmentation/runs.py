"""Building a run's model, and the files a run folder keeps for it.

A run is described by a few settings (``arch``, ``method``, backbone source, ``seed``,
``learn_upsample``) that ``train`` writes into config.json and ``evaluate`` reads back,
so both build the model through :func:`build_model`.

Saved weights, by method (``METHODS``):

* ``piggyback``: ``masks.safetensors`` (common.maskfile): bit-packed masks of the 13 convs
  and fc6/fc7 plus the new layers as task state; the frozen backbone is loaded again
  from its source, and the file refuses any other backbone (fingerprint);
* ``finetune``: ``model.safetensors``, every tensor of the FCN.

Checkpoints hold only what training changes (masks, new layers, or all finetuned
weights); the frozen backbone is rebuilt from its source on resume.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.maskfile import load_masks, save_masks
from common.masking import piggyback
from common.runlog import atomic_write_bytes

from .model import NEW_LAYERS, FCN32s, build_fcn32s
from .weights import BackboneSource, load_backbone_state

__all__ = ["Method", "METHODS", "WeightsFileError", "get_method", "build_model", "trainable_state",
           "load_trainable_state", "save_task_weights", "load_task_weights"]


class WeightsFileError(ValueError):
    """A saved model file that cannot be read or does not fit the model."""


def _prepare_piggyback(model: FCN32s, mask_options: Mapping) -> FCN32s:
    # mask_options: threshold (eq. 4), mask_init, mask_scale; paper defaults when empty.
    piggyback(model, skip=NEW_LAYERS, **mask_options)
    return model


def _prepare_finetune(model: FCN32s, mask_options: Mapping) -> FCN32s:
    return model


def _save_piggyback(model: nn.Module, path: Path, metadata: Mapping) -> None:
    save_masks(model, path, **metadata)


def _load_piggyback(model: nn.Module, path: Path) -> dict:
    return load_masks(model, path)


def _save_finetune(model: nn.Module, path: Path, metadata: Mapping) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, st_save(tensors, metadata={"user": json.dumps(dict(metadata), sort_keys=True)}))


def _load_finetune(model: nn.Module, path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = json.loads((f.metadata() or {}).get("user", "{}"))
        state = st_load(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsFileError(f"{path} is not a readable safetensors weights file: {e}") from None
    own = model.state_dict()
    shapes = [k for k in set(state) & set(own) if own[k].shape != state[k].shape]
    if set(state) != set(own) or shapes:
        raise WeightsFileError(f"{path} does not fit this model: keys only in the file "
                               f"{sorted(set(state) - set(own))[:5]}, only in the model "
                               f"{sorted(set(own) - set(state))[:5]}, other shapes {sorted(shapes)[:5]}")
    model.load_state_dict(state)
    return metadata


@dataclass(frozen=True)
class Method:
    """How a method prepares the FCN and stores the trained task."""

    prepare: Callable[[FCN32s, Mapping], FCN32s]
    weights_file: str
    save: Callable[[nn.Module, Path, Mapping], None]
    load: Callable[[nn.Module, Path], dict]


METHODS: Dict[str, Method] = {
    "piggyback": Method(_prepare_piggyback, "masks.safetensors", _save_piggyback, _load_piggyback),
    "finetune": Method(_prepare_finetune, "model.safetensors", _save_finetune, _load_finetune),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; valid names: {sorted(METHODS)}")
    return METHODS[name]


def build_model(arch: str, method: str, source: BackboneSource, *, seed: int = 0,
                learn_upsample: bool = False, num_classes: int = 21,
                mask_options: Optional[Mapping] = None) -> FCN32s:
    """The FCN-32s of a run, prepared for ``method``, on the CPU.

    Random initialisation draws from a generator seeded by ``seed`` alone, so training
    and a later evaluation (and every process of a distributed run) get the same backbone.
    """
    state = load_backbone_state(source, arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_fcn32s(arch, num_classes, state, learn_upsample=learn_upsample)
    return get_method(method).prepare(model, dict(mask_options or {}))


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors training changes (parameters with requires_grad, and buffers)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keep}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Inverse of :func:`trainable_state`: exactly the trainable keys must be present."""
    expected = set(trainable_state(model))
    if set(state) != expected:
        raise ValueError(f"{where} does not match this model: missing {sorted(expected - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - expected)[:5]} (was it made with other settings?)")
    result = model.load_state_dict(dict(state), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert expected.isdisjoint(result.missing_keys), result.missing_keys


def save_task_weights(model: nn.Module, run_dir: Path, method: str, metadata: Mapping) -> Path:
    m = get_method(method)
    path = Path(run_dir) / m.weights_file
    m.save(model, path, metadata)
    return path


def load_task_weights(model: nn.Module, run_dir: Path, method: str, path: Optional[Path] = None) -> dict:
    m = get_method(method)
    return m.load(model, Path(path) if path else Path(run_dir) / m.weights_file)
