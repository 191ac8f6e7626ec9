"""The ways of training a task on a pretrained network, and the optimizers they use.

One registry for every pipeline. A :class:`Method` turns a network whose new layers
(``head``: the task's classifier, FCN's score layers) are already in place into a
trainable model, and splits the trainable parameters into two groups that get their own
optimizer: ``main`` (masks, or backbone weights) and ``head`` (the new layers and, with
task-specific batch-norm, the norm layers).

- ``piggyback``: binary (or ternary) masks on every conv/linear of the frozen backbone
  (eq. 4-7); its optimizer and learning rate come from the recipe (:mod:`common.recipes`).
- ``finetune``: every weight trains (weights the model builder froze stay frozen, e.g.
  FCN's fixed bilinear upsampling).
- ``feature``: the new layers alone train on frozen features ("classifier only").
- ``scratch``: the same network from random initialisation, every weight trains.

``train_bn`` is a modifier of ``piggyback`` and ``feature``: batch-norm layers become
per-task state (paper section 5.3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from common.errors import UsageError
from common.masking import NORM_TYPES, mask_parameters, piggyback, task_parameters

__all__ = ["Method", "Prepared", "METHODS", "get_method", "OPTIMIZERS", "make_optimizer",
           "build_optimizers", "resolve_training_args", "add_mask_args"]


@dataclass
class Prepared:
    """The two parameter groups of a prepared model, and the modules that must stay in
    eval mode while training (frozen batch-norm of the ``feature`` baseline)."""

    main: List[nn.Parameter]
    head: List[nn.Parameter]
    frozen_modules: List[nn.Module] = field(default_factory=list)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    needs_backbone: bool  # starts from pretrained weights
    uses_masks: bool  # the result is a mask file, not full weights
    supports_train_bn: bool  # --train-bn is meaningful (BN is frozen otherwise)
    optimizer: Optional[str]  # default of the main group; None: from the recipe / no main group
    lr: Optional[float]
    weight_decay: float
    _prepare: Callable[..., Prepared] = field(repr=False, compare=False)

    def prepare(self, model: nn.Module, *, head: Sequence[str], mask_options: Optional[Mapping] = None,
                ternary: bool = False, train_bn: bool = False) -> Prepared:
        """Make ``model`` trainable for this method in place. ``head`` names the task's
        new modules; ``mask_options`` are ``piggyback``'s mask keywords (threshold,
        mask_init, mask_scale, mask_spread)."""
        if train_bn and not self.supports_train_bn:
            raise UsageError(f"train_bn: batch-norm layers already train with method {self.name}")
        if ternary and not self.uses_masks:
            raise UsageError(f"ternary masks need method piggyback, not {self.name}")
        names = dict(model.named_modules())
        missing = [h for h in head if h not in names]
        if missing:
            raise UsageError(f"head modules {missing} are not in {type(model).__name__}")
        return self._prepare(model, tuple(head), dict(mask_options or {}), ternary, train_bn)


def _in_head(name: str, head: Sequence[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in head)


def _split(model: nn.Module, head: Sequence[str]) -> Prepared:
    main, new = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (new if _in_head(name, head) else main).append(p)
    return Prepared(main=main, head=new)


def _prepare_piggyback(model, head, mask_options, ternary, train_bn) -> Prepared:
    piggyback(model, **mask_options, ternary=ternary, train_bn=train_bn, skip=head)
    return Prepared(main=mask_parameters(model), head=task_parameters(model))


def _prepare_full(model, head, mask_options, ternary, train_bn) -> Prepared:
    return _split(model, head)


def _prepare_feature(model, head, mask_options, ternary, train_bn) -> Prepared:
    trainable = {id(p) for name, p in model.named_parameters() if p.requires_grad and _in_head(name, head)}
    norms = [m for name, m in model.named_modules()
             if isinstance(m, NORM_TYPES) and not _in_head(name, head)]
    if train_bn:  # classifier plus task-specific BN
        trainable |= {id(p) for m in norms for p in m.parameters(recurse=False)}
        norms = []
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return Prepared(main=[], head=[p for p in model.parameters() if p.requires_grad],
                    frozen_modules=[m for m in norms if isinstance(m, nn.modules.batchnorm._NormBase)])


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("piggyback", "binary masks on the frozen backbone + new classifier", True, True, True,
           None, None, 0.0, _prepare_piggyback),
    Method("finetune", "all weights from the backbone + new classifier", True, False, False,
           "sgd", 1e-2, 5e-4, _prepare_full),
    Method("feature", "new classifier on frozen backbone features", True, False, True,
           None, None, 0.0, _prepare_feature),
    Method("scratch", "the same network from random initialisation", False, False, False,
           "sgd", 0.1, 5e-4, _prepare_full),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def _sgd(params, lr, weight_decay, momentum, **impl):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **impl)


def _adam(params, lr, weight_decay, momentum, **impl):
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **impl)


def _adamw(params, lr, weight_decay, momentum, **impl):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **impl)


# One signature for all: (params, lr, weight_decay, momentum, **implementation); Adam's
# betas stay at their defaults and momentum only concerns SGD.
OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}


def fused_implementation(params: Sequence[torch.Tensor]) -> Dict[str, bool]:
    """``{"fused": True}`` when every parameter is a floating-point CUDA tensor, else ``{}``
    (torch's default, the multi-tensor "foreach" implementation). The fused kernels update
    all of a group's parameters in one pass instead of one pass per arithmetic operation,
    with a few kernel launches instead of dozens. Under CUDA graphs on two H100s, the
    batch-32 mask training step ran at 1.07x (fp32) and 1.26x (bf16 + channels_last) the
    images/s with fused Adam, and its rounds varied less (BENCHMARKS-gpu.md). The update is
    the same algorithm."""
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def make_optimizer(name: str, params: Iterable[nn.Parameter], *, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """``name`` (sgd with ``momentum``, adam, adamw) over ``params``; fused kernels where
    the parameters are on a CUDA device (:func:`fused_implementation`)."""
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    params = list(params)
    if not params:
        raise UsageError(f"optimizer {name}: no parameters to train")
    return OPTIMIZERS[name](params, lr, weight_decay, momentum, **fused_implementation(params))


def build_optimizers(prepared: Prepared, *, optimizer: str, lr: float, weight_decay: float,
                     head_optimizer: str, head_lr: float, head_weight_decay: float,
                     momentum: float = 0.9) -> Dict[str, torch.optim.Optimizer]:
    """``{"main": ..., "head": ...}`` for the two groups (a group without parameters,
    like ``feature``'s main group, gets no optimizer)."""
    optimizers = {}
    if prepared.main:
        optimizers["main"] = make_optimizer(optimizer, prepared.main, lr=lr, weight_decay=weight_decay,
                                            momentum=momentum)
    if prepared.head:
        optimizers["head"] = make_optimizer(head_optimizer, prepared.head, lr=head_lr,
                                            weight_decay=head_weight_decay, momentum=momentum)
    if not optimizers:
        raise UsageError("the model has no trainable parameters")
    return optimizers


def resolve_training_args(args, uses_masks: bool, defaults: Mapping[str, object], error: Callable[[str], None],
                          non_negative: Sequence[str] = ("weight_decay", "head_weight_decay", "mask_spread")) -> None:
    """Fill ``args`` in place as every training command does: for mask training, the mask
    flags, ``optimizer`` and ``lr`` not given come from ``--recipe``; otherwise from the
    method's ``defaults`` (keys optimizer, lr, weight_decay). Then refuse, through
    ``error`` (``parser.error``), learning rates, thresholds and mask scales that are not
    positive and decays or spreads that are negative."""
    from common.recipes import get_recipe
    if uses_masks:
        recipe = get_recipe(args.recipe)
        for key, value in recipe.mask_options().items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        defaults = dict(defaults, optimizer=recipe.mask_optimizer, lr=recipe.mask_lr)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("lr", "head_lr", "threshold", "mask_scale"):
        value = getattr(args, key, None)
        if value is not None and not value > 0:
            error(f"--{key.replace('_', '-')} must be positive, got {value}")
    for key in non_negative:
        value = getattr(args, key, None)
        if value is not None and value < 0:
            error(f"--{key.replace('_', '-')} must be >= 0, got {value}")


def add_mask_args(parser):
    """The "masks (piggyback)" flags every training command shares: ``--recipe`` and the
    mask flags whose defaults it gives. Returns the argument group for a command's own
    additions (``--ternary``, ``--train-bn``)."""
    from common.masking import MASK_INITS
    from common.recipes import DEFAULT_RECIPE, RECIPES
    m = parser.add_argument_group("masks (piggyback)")
    m.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                   help="mask recipe giving the defaults of the mask flags, --optimizer and --lr of "
                        "mask training: " + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values())
                        + f" (default: {DEFAULT_RECIPE})")
    m.add_argument("--threshold", type=float, default=None,
                   help="binarizer threshold tau of eq. 4 (default: from --recipe)")
    m.add_argument("--mask-init", choices=sorted(MASK_INITS), default=None,
                   help="initialisation of the real-valued masks (default: from --recipe)")
    m.add_argument("--mask-scale", type=float, default=None,
                   help="initial real-valued mask value (default: from --recipe)")
    m.add_argument("--mask-spread", type=float, default=None,
                   help="half-width of the uniform spread around --mask-scale of --mask-init "
                        "spread (default: from --recipe)")
    return m
