"""The decathlon's view of the method registry (:mod:`common.methods`): the new classifier
is the network's classifier (``common.heads``), and mask settings come from the command
line's resolved namespace.

``METHODS[name].prepare(model, args)`` prepares a network that already has the task's
classifier (:func:`replace_head`) from ``args.threshold``, ``mask_init``, ``mask_scale``,
``mask_spread`` (optional), ``ternary`` and ``train_bn``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch.nn as nn

from common.heads import classifier_name, reset_classifier
from common.methods import METHODS as _COMMON_METHODS
from common.methods import OPTIMIZERS, Method, Prepared, build_optimizers, get_method as _get_method
from common.methods import make_optimizer

__all__ = ["Method", "Prepared", "METHODS", "OPTIMIZERS", "get_method", "make_optimizer",
           "build_optimizers", "replace_head", "mask_options"]

_MASK_KEYS = ("threshold", "mask_init", "mask_scale", "mask_spread")


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a freshly initialised ``num_classes``-way classifier (in place)."""
    reset_classifier(model, num_classes)
    return model


def mask_options(args) -> Dict[str, object]:
    """``piggyback``'s mask keywords from a namespace (those it has)."""
    return {k: getattr(args, k) for k in _MASK_KEYS if getattr(args, k, None) is not None}


@dataclass(frozen=True)
class _FromArgs:
    """A common :class:`Method` whose ``prepare`` reads a command-line namespace."""

    method: Method

    def __getattr__(self, name):
        if name == "method":  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.method, name)

    def prepare(self, model: nn.Module, args) -> Prepared:
        return self.method.prepare(model, head=(classifier_name(model),),
                                   mask_options=mask_options(args) if self.method.uses_masks else None,
                                   ternary=bool(getattr(args, "ternary", False)),
                                   train_bn=bool(getattr(args, "train_bn", False)))


METHODS: Dict[str, _FromArgs] = {name: _FromArgs(m) for name, m in _COMMON_METHODS.items()}


def get_method(name: str) -> _FromArgs:
    return METHODS[_get_method(name).name]
