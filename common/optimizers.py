"""Optimizers of the training commands: one registry of optimizers by name, fused kernels
where torch has them, a scheme's many small per-layer values trained as one flat tensor
(:func:`flat_group`), the optimizer groups of a prepared model (:func:`build_optimizers`)
and the step schedule of every learning rate.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from common.errors import UsageError

__all__ = ["OPTIMIZERS", "optimizer_names", "make_optimizer", "fused_implementation", "flat_group",
           "build_optimizers", "make_schedulers"]


def _sgd(params, lr, weight_decay, momentum, **impl):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **impl)


def _adam(params, lr, weight_decay, momentum, **impl):
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **impl)


def _adamw(params, lr, weight_decay, momentum, **impl):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **impl)


# One signature for all: (params, lr, weight_decay, momentum, **implementation); Adam's
# betas stay at their defaults and momentum only concerns SGD.
OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}


def optimizer_names() -> List[str]:
    return list(OPTIMIZERS)


# A CPU group of at most this many values updates with torch's multi-tensor ("foreach")
# kernels: one call per arithmetic operation for all its tensors instead of one per tensor,
# and temporaries no larger than the group (torch picks per-tensor updates on the CPU).
SMALL_GROUP = 1 << 20


def fused_implementation(params: Sequence[torch.Tensor]) -> Dict[str, bool]:
    """``{"fused": True}`` when every parameter is a floating-point CUDA tensor; on the CPU
    ``{"foreach": True}`` for a group of at most :data:`SMALL_GROUP` values (a mask scheme's
    scalars when not flattened by :func:`flat_group`, a classifier), else ``{}`` (torch's default). The fused kernels update
    all of a group's parameters in one pass instead of one pass per arithmetic operation,
    with a few kernel launches instead of dozens. Under CUDA graphs on two H100s, the
    batch-32 mask training step ran at 1.07x (fp32) and 1.26x (bf16 + channels_last) the
    images/s with fused Adam, and its rounds varied less (BENCHMARKS-gpu.md). The update is
    the same algorithm."""
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    if params and not any(p.is_cuda for p in params) and sum(p.numel() for p in params) <= SMALL_GROUP:
        return {"foreach": True}
    return {}


def make_optimizer(name: str, params: Iterable[nn.Parameter], *, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """``name`` (sgd with ``momentum``, adam, adamw) over ``params`` (tensors, or param-group
    dicts with their own ``lr``); fused kernels where
    the parameters are on a CUDA device (:func:`fused_implementation`)."""
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    params = list(params)
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    if not flat:
        raise UsageError(f"optimizer {name}: no parameters to train")
    return OPTIMIZERS[name](params, lr, weight_decay, momentum, **fused_implementation(flat))


def _row_scales(scale, param: torch.Tensor):
    """A learning-rate scale as a float, or as a tuple of one float per row (dimension 0) of
    ``param``."""
    if isinstance(scale, (int, float)):
        return float(scale)
    rows = tuple(float(s) for s in scale)
    if param.dim() == 0 or len(rows) != param.shape[0]:
        raise ValueError(f"{len(rows)} learning-rate scales for a tensor of shape {tuple(param.shape)}; "
                         "expected one float, or one per row (its first dimension)")
    return rows[0] if len(set(rows)) == 1 else rows


def flat_group(name: str, params: Sequence[torch.Tensor], *, lr: float,
               scales: Optional[Sequence[Union[float, Sequence[float]]]] = None,
               weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    """Optimizer ``name`` over many small tensors (a mask scheme's values: ``affine``'s
    four scalars of each layer) as one flat tensor, each step of ``params[i]`` times
    ``scales[i]``: a float, or one float per row (dimension 0) of ``params[i]`` (a learning
    rate per tensor or row inside one group, which the schedulers drive as one).

    torch's optimizers pay a fixed cost per tensor and step (about 20 us on a CPU core,
    for list handling and state look-ups, on top of each kernel's own launch): 112 tensors
    (WRN-28-4's affine scalars, one tensor each) cost 3 ms per Adam step. Here the
    optimizer holds one leaf tensor; a step pre-hook copies the parameters' values and
    gradients into it and into one gradient buffer (a multi-tensor copy each, into views
    made once), a post-hook
    applies the scales and copies the values back (one multi-tensor copy) and sets the
    parameters' gradients to None (``zero_grad`` of this optimizer clears only its own
    tensor). For SGD (momentum included), Adam and AdamW every step is proportional to the
    learning rate, weight decay included, so the scaled step is the one a group per scale
    would take. A tensor without a gradient keeps its value (its moments see a zero
    gradient). Tensors of several devices or dtypes get one group per tensor instead, the
    same update without the gathering (scales per row need one device and dtype)."""
    params = list(params)
    if scales is not None and len(scales) != len(params):
        raise ValueError(f"{len(params)} parameters but {len(scales)} learning-rate scales")
    scales = [1.0] * len(params) if scales is None else [_row_scales(s, p) for s, p in zip(scales, params)]
    if not params:
        raise ValueError("flat_group needs at least one parameter")
    if len({(p.device, p.dtype) for p in params}) > 1:
        if any(isinstance(s, tuple) for s in scales):
            raise UsageError("learning-rate scales per row need every parameter on one device and in one dtype; got "
                             + ", ".join(sorted({f"{p.device}/{p.dtype}" for p in params})))
        return make_optimizer(name, [{"params": [p], "lr": lr * s} for p, s in zip(params, scales)], lr=lr,
                              weight_decay=weight_decay, momentum=momentum)
    sizes = [p.numel() for p in params]
    first = params[0]
    flat = torch.zeros(sum(sizes), dtype=first.dtype, device=first.device, requires_grad=True)
    optimizer = make_optimizer(name, [flat], lr=lr, weight_decay=weight_decay, momentum=momentum)
    factor = None
    if any(s != 1.0 for s in scales):
        factor = torch.cat([torch.tensor(s, dtype=first.dtype).repeat_interleave(n // len(s)) if isinstance(s, tuple)
                            else torch.full((n,), s, dtype=first.dtype)
                            for n, s in zip(sizes, scales)]).to(first.device)
    # views of the flat tensor and of one gradient buffer, one per parameter and shaped like
    # it, made once: a step moves values and gradients with one multi-tensor copy each way
    flat_views = [t.view(p.shape) for t, p in zip(flat.detach().split(sizes), params)]
    grad_buffer = torch.zeros_like(flat, requires_grad=False)
    grad_views = [t.view(p.shape) for t, p in zip(grad_buffer.split(sizes), params)]
    step: Dict[str, object] = {}

    def gather(opt, args, kwargs):
        with torch.no_grad():
            torch._foreach_copy_(flat_views, params)
            had = [p.grad is not None for p in params]
            if not any(had):
                flat.grad = None
            else:
                if all(had):
                    torch._foreach_copy_(grad_views, [p.grad for p in params])
                else:
                    grad_buffer.zero_()
                    for v, p in zip(grad_views, params):
                        if p.grad is not None:
                            v.copy_(p.grad)
                flat.grad = grad_buffer
            step.update(old=flat.detach().clone() if factor is not None else None, had=had)

    def scatter(opt, args, kwargs):
        old, had = step.pop("old"), step.pop("had")
        if not any(had):
            return
        with torch.no_grad():
            if factor is not None:
                flat.sub_(old).mul_(factor).add_(old)
            if all(had):
                torch._foreach_copy_(params, flat_views)
            else:
                for p, part, h in zip(params, flat_views, had):
                    if h:
                        p.copy_(part)
        for p in params:
            p.grad = None

    optimizer.register_step_pre_hook(gather)
    optimizer.register_step_post_hook(scatter)
    return optimizer


def build_optimizers(prepared, cfg) -> Dict[str, torch.optim.Optimizer]:
    """``{"main": ..., "head": ..., "extras": ...}`` for the groups of ``prepared`` (a
    :class:`common.methods.Prepared`) from the
    run configuration ``cfg`` (its ``optimizer``, ``lr``, ``weight_decay``, ``head_*``,
    ``extras_*`` and ``momentum``); a group without parameters, like ``feature``'s main
    group, gets no optimizer."""
    momentum = getattr(cfg, "momentum", None)
    momentum = 0.9 if momentum is None else momentum
    optimizers = {}
    if prepared.main:
        optimizers["main"] = make_optimizer(cfg.optimizer, prepared.main, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                            momentum=momentum)
    if prepared.head:
        optimizers["head"] = make_optimizer(cfg.head_optimizer, prepared.head, lr=cfg.head_lr,
                                            weight_decay=cfg.head_weight_decay, momentum=momentum)
    if prepared.extras:
        optimizers["extras"] = flat_group(cfg.extras_optimizer, prepared.extras, lr=cfg.extras_lr,
                                          scales=prepared.extras_lr_scales or None, momentum=momentum)
    if not optimizers:
        raise UsageError("the model has no trainable parameters")
    return optimizers


def make_schedulers(optimizers: Mapping[str, torch.optim.Optimizer], cfg) -> Dict[str, object]:
    """Every learning rate times ``cfg.lr_gamma`` after each epoch of ``cfg.lr_steps``."""
    return {name: torch.optim.lr_scheduler.MultiStepLR(o, milestones=sorted(cfg.lr_steps or ()), gamma=cfg.lr_gamma)
            for name, o in optimizers.items()}
