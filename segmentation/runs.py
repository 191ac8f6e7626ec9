"""Building a run's model, and the files a run folder keeps for it.

A run is described by a few settings (``arch``, ``method``, backbone source, ``seed``,
``learn_upsample``) that ``train`` writes into config.json and ``evaluate`` reads back,
so both build the model through :func:`build_model`. The methods themselves are the
common registry's (:mod:`common.methods`) with FCN-32s's new layers (``score_fr``,
``upscore``) as the head; segmentation offers ``piggyback`` and ``finetune``.

Saved weights, by method:

* ``piggyback``: ``masks.safetensors`` (common.maskfile): bit-packed masks of the 13 convs
  and fc6/fc7 plus the new layers as task state; the frozen backbone is loaded again
  from its source, and the file refuses any other backbone (fingerprint);
* ``finetune``: ``model.safetensors`` (common.weightsfile), every tensor of the FCN.

Checkpoints hold only what training changes (masks, new layers, or all finetuned
weights); the frozen backbone is rebuilt from its source on resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from common.checkpoint import load_trainable_state, trainable_state
from common.errors import UsageError, WeightsFileError
from common.maskfile import load_masks, save_masks
from common.methods import Prepared
from common.methods import get_method as get_common_method
from common.weightsfile import load_weights_file, save_weights_file

from .model import NEW_LAYERS, FCN32s, build_fcn32s
from .weights import BackboneSource, load_backbone_state

__all__ = ["Method", "METHODS", "WeightsFileError", "WEIGHTS_FORMAT", "get_method", "build_model",
           "prepare_model", "trainable_state", "load_trainable_state", "save_task_weights",
           "load_task_weights"]

WEIGHTS_FORMAT = "fcn32s-weights"


def _save_piggyback(model: nn.Module, path: Path, metadata: Mapping) -> None:
    save_masks(model, path, **metadata)


def _load_piggyback(model: nn.Module, path: Path) -> dict:
    return load_masks(model, path)


def _save_finetune(model: nn.Module, path: Path, metadata: Mapping) -> None:
    save_weights_file(path, model, format=WEIGHTS_FORMAT, **metadata)


def _load_finetune(model: nn.Module, path: Path) -> dict:
    return load_weights_file(model, path, WEIGHTS_FORMAT)


@dataclass(frozen=True)
class Method:
    """A common method and how segmentation stores its trained task."""

    name: str
    weights_file: str
    save: Callable[[nn.Module, Path, Mapping], None]
    load: Callable[[nn.Module, Path], dict]

    def prepare(self, model: FCN32s, mask_options: Optional[Mapping] = None) -> Prepared:
        return get_common_method(self.name).prepare(
            model, head=NEW_LAYERS, mask_options=dict(mask_options or {}) if self.name == "piggyback" else None)


METHODS: Dict[str, Method] = {
    "piggyback": Method("piggyback", "masks.safetensors", _save_piggyback, _load_piggyback),
    "finetune": Method("finetune", "model.safetensors", _save_finetune, _load_finetune),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; valid names: {sorted(METHODS)}")
    return METHODS[name]


def prepare_model(arch: str, method: str, source: BackboneSource, *, seed: int = 0,
                  learn_upsample: bool = False, num_classes: int = 21,
                  mask_options: Optional[Mapping] = None) -> Tuple[FCN32s, Prepared]:
    """The FCN-32s of a run, prepared for ``method``, on the CPU, and its parameter groups.

    Random initialisation draws from a generator seeded by ``seed`` alone, so training
    and a later evaluation (and every process of a distributed run) get the same backbone.
    """
    state = load_backbone_state(source, arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_fcn32s(arch, num_classes, state, learn_upsample=learn_upsample)
        # mask initialisation may draw random numbers too
        prepared = get_method(method).prepare(model, mask_options)
    return model, prepared


def build_model(arch: str, method: str, source: BackboneSource, *, seed: int = 0,
                learn_upsample: bool = False, num_classes: int = 21,
                mask_options: Optional[Mapping] = None) -> FCN32s:
    """:func:`prepare_model` without the parameter groups."""
    return prepare_model(arch, method, source, seed=seed, learn_upsample=learn_upsample,
                         num_classes=num_classes, mask_options=mask_options)[0]


def save_task_weights(model: nn.Module, run_dir: Path, method: str, metadata: Mapping) -> Path:
    m = get_method(method)
    path = Path(run_dir) / m.weights_file
    m.save(model, path, metadata)
    return path


def load_task_weights(model: nn.Module, run_dir: Path, method: str, path: Optional[Path] = None) -> dict:
    m = get_method(method)
    return m.load(model, Path(path) if path else Path(run_dir) / m.weights_file)
