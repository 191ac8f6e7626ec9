"""The ways of training a decathlon task: piggyback and the paper's three baselines.

Each :class:`Method` turns a backbone (already fitted with the task's new classifier
``fc``) into a trainable model and says which parameters the two optimisers own: the
"main" ones (masks, or backbone weights) and the "head" ones (the new classifier and,
with task-specific BN, the BN layers).  Defaults per method follow common practice:
Adam 1e-4 for real-valued masks (the paper's recipe), SGD for weights.

- ``piggyback``: binary (or ternary) masks on every conv of the frozen backbone (eq. 4-7).
- ``finetune``: every weight trains.
- ``feature``: the classifier alone trains on frozen features ("classifier only").
- ``scratch``: the same network from random initialisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List

import torch
import torch.nn as nn

from common.masking import mask_parameters, piggyback, task_parameters

__all__ = ["Method", "Prepared", "METHODS", "OPTIMIZERS", "get_method", "make_optimizer",
           "replace_head"]


@dataclass
class Prepared:
    main: List[nn.Parameter]
    head: List[nn.Parameter]
    frozen_modules: List[nn.Module] = field(default_factory=list)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    needs_backbone: bool
    uses_masks: bool
    optimizer: str
    lr: float
    weight_decay: float
    prepare: Callable[[nn.Module, object], Prepared]


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a freshly initialised ``num_classes``-way classifier ``fc``."""
    old = model.fc
    model.fc = nn.Linear(old.in_features, num_classes).to(old.weight.device)
    return model


def _norm_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _split_head(model: nn.Module) -> Prepared:
    main = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    return Prepared(main=main, head=list(model.fc.parameters()))


def _prepare_piggyback(model: nn.Module, args) -> Prepared:
    piggyback(model, threshold=args.threshold, mask_init=args.mask_init,
              mask_scale=args.mask_scale, ternary=args.ternary, train_bn=args.train_bn,
              skip=("fc",))
    return Prepared(main=mask_parameters(model), head=task_parameters(model))


def _prepare_full(model: nn.Module, args) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(True)
    return _split_head(model)


def _prepare_feature(model: nn.Module, args) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(False)
    head = list(model.fc.parameters())
    norms = _norm_modules(model)
    if args.train_bn:  # classifier plus task-specific BN
        head += [p for m in norms for p in m.parameters()]
        norms = []
    for p in head:
        p.requires_grad_(True)
    return Prepared(main=[], head=head, frozen_modules=norms)


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("piggyback", "binary masks on the frozen backbone + new classifier", True, True,
           "adam", 1e-4, 0.0, _prepare_piggyback),
    Method("finetune", "all weights from the backbone + new classifier", True, False,
           "sgd", 1e-2, 5e-4, _prepare_full),
    Method("feature", "new classifier on frozen backbone features", True, False,
           "sgd", 0.0, 0.0, _prepare_feature),
    Method("scratch", "the same network from random initialisation", False, False,
           "sgd", 0.1, 5e-4, _prepare_full),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def _sgd(params, lr, weight_decay):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def _adam(params, lr, weight_decay):
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _adamw(params, lr, weight_decay):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: Dict[str, Callable] = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """``name`` (sgd with momentum 0.9, adam, adamw) over ``params``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](list(params), lr, weight_decay)
