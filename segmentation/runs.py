"""Building a run's model: the FCN-32s of a run from a few settings (``arch``, ``method``,
backbone source, ``seed``, ``learn_upsample``, the mask settings) that ``train`` writes into
config.json and ``evaluate`` reads back, so both build the model through
:func:`build_run_model`. The methods are the common registry's (:mod:`common.methods`) with
FCN-32s's new layers (``score_fr``, ``upscore``) as the head; what a finished run writes
and how it is loaded back is the method's (``masks.safetensors`` for piggyback: masks of
the 13 convs and fc6/fc7 plus the new layers; ``weights.safetensors`` for finetune: every
tensor of the FCN), through :func:`common.methods.save_task` / :func:`~common.methods.load_task`.

Checkpoints hold only what training changes (masks, new layers, or all finetuned
weights); the frozen backbone is rebuilt from its source on resume.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from common.methods import MaskSettings, Prepared, get_method

from .model import NEW_LAYERS, FCN32s, build_fcn32s
from .weights import BackboneSource, load_backbone_state

__all__ = ["build_run_model", "prepare_model"]


def prepare_model(arch: str, method: str, source: BackboneSource, *, seed: int = 0,
                  learn_upsample: bool = False, num_classes: int = 21,
                  masks: Optional[MaskSettings] = None) -> Tuple[FCN32s, Prepared]:
    """The FCN-32s of a run, prepared for ``method``, on the CPU, and its parameter groups.

    Random initialisation draws from a generator seeded by ``seed`` alone, so training
    and a later evaluation (and every process of a distributed run) get the same backbone.
    """
    state = load_backbone_state(source, arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_fcn32s(arch, num_classes, state, learn_upsample=learn_upsample)
        # mask initialisation may draw random numbers too
        m = get_method(method)
        prepared = m.prepare(model, head=NEW_LAYERS, masks=(masks or MaskSettings()) if m.uses_masks else None)
    return model, prepared


def build_run_model(arch: str, method: str, source: BackboneSource, *, seed: int = 0,
                learn_upsample: bool = False, num_classes: int = 21,
                masks: Optional[MaskSettings] = None) -> FCN32s:
    """:func:`prepare_model` without the parameter groups."""
    return prepare_model(arch, method, source, seed=seed, learn_upsample=learn_upsample,
                         num_classes=num_classes, masks=masks)[0]
