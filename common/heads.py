"""The classifier of any torchvision or timm model, found and replaced in one place.

Follows timm's ``get_classifier`` / ``reset_classifier`` contract: models that provide
those methods (every timm model) are asked directly; for the others (torchvision's
ResNet ``fc``, VGG/MobileNet/EfficientNet ``classifier[-1]``, ViT ``heads.head``, the
decathlon WRN ``fc``) the classifier is the last ``nn.Linear`` under a conventional head
attribute, else the last ``nn.Linear`` of the model.
"""
from __future__ import annotations

from typing import Tuple

import torch.nn as nn

from .errors import UsageError

__all__ = ["get_classifier", "classifier_name", "reset_classifier"]

_HEAD_ATTRS = ("fc", "classifier", "head", "heads", "last_linear")


def _last_linear(module: nn.Module, prefix: str = "") -> Tuple[str, nn.Module]:
    found = None
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, nn.Linear):
            found = (name, sub)
    return found


def get_classifier(model: nn.Module) -> Tuple[str, nn.Module]:
    """(qualified name, module) of ``model``'s final classifier."""
    if callable(getattr(model, "get_classifier", None)):
        head = model.get_classifier()
        for name, sub in model.named_modules():
            if sub is head and name:
                return name, sub
    for attr in _HEAD_ATTRS:
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module):
            found = _last_linear(sub, attr)
            if found is not None:
                return found
    found = _last_linear(model)
    if found is None:
        raise UsageError(f"{type(model).__name__} has no nn.Linear classifier; name the task's new "
                         f"layers explicitly (skip=...)")
    return found


def classifier_name(model: nn.Module) -> str:
    return get_classifier(model)[0]


def reset_classifier(model: nn.Module, num_classes: int) -> str:
    """Replace the classifier by a freshly initialised ``num_classes``-way one on the same
    device and dtype; returns its qualified name."""
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    name, old = get_classifier(model)
    if callable(getattr(model, "reset_classifier", None)) and callable(getattr(model, "get_classifier", None)):
        model.reset_classifier(num_classes)
        new_name, new = get_classifier(model)
        return new_name
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
    return name
