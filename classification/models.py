"""Backbones of the classification pipeline: any torchvision or timm architecture by name,
built without weights and filled from a local weight file (never downloaded).

Names are torchvision's (``resnet50``, ``mobilenet_v2``, ``vgg16`` ...) or timm's
(``timm:resnet50``, or a bare timm name that torchvision lacks, e.g. ``efficientnet_b0``).
"""
from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple, Union

import torch.nn as nn

from common.errors import UsageError
from common.heads import get_classifier, reset_classifier
from classification.weights import load_pretrained, resolve_weights

__all__ = ["build_network", "pretrained_model", "arch_source", "torchvision_names", "TIMM_PREFIX"]

TIMM_PREFIX = "timm:"


@lru_cache(maxsize=1)
def torchvision_names() -> Tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def arch_source(arch: str) -> Tuple[str, str]:
    """("torchvision" | "timm", the library's own name) for ``arch``."""
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX):]
        import timm

        if not timm.is_model(name):
            raise UsageError(f"--arch {arch!r}: timm has no model {name!r}" + _close(name, timm.list_models()))
        return "timm", name
    if arch in torchvision_names():
        return "torchvision", arch
    import timm

    if timm.is_model(arch):
        return "timm", arch
    raise UsageError(f"--arch {arch!r} is neither a torchvision nor a timm model"
                     + _close(arch, list(torchvision_names()) + timm.list_models()))


def _close(name: str, names: List[str]) -> str:
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return f" (close names: {', '.join(near)})" if near else ""


def build_network(arch: str) -> nn.Module:
    """``arch`` with its library's default classifier and random weights."""
    source, name = arch_source(arch)
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    import timm

    return timm.create_model(name, pretrained=False)


def pretrained_model(arch: str, num_classes: int, weights: Union[None, str, Path] = None) -> Tuple[nn.Module, dict]:
    """``arch`` filled from the weight file ``weights`` (see
    :func:`classification.weights.resolve_weights`; ``None``: random weights) with a new
    ``num_classes``-way classifier. Returns (model, report of what was loaded)."""
    model = build_network(arch)
    report: dict = {"arch": arch, "source": "random"}
    if weights is not None:
        path = resolve_weights(weights, arch_source(arch)[1])
        report.update(load_pretrained(model, path, arch_source(arch)[1]), source=str(path))
    report["classifier"] = reset_classifier(model, num_classes)
    report["feature_dim"] = get_classifier(model)[1].in_features
    return model, report
