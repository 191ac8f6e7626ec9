"""The ways of training a task on a pretrained network: one record per method.

One registry for every pipeline. A :class:`Method` owns, for its method:

- how a network whose new layers (``head``: the task's classifier, FCN's score layers)
  are already in place becomes trainable, and which parameter groups it trains: ``main``
  (masks, or backbone weights), ``head`` (the new layers and, with task-specific
  batch-norm, the norm layers) and ``extras`` (a mask scheme's trained values beside the
  mask, e.g. ``affine``'s scalars), each with its own optimizer;
- its optimizer defaults;
- the artifact a finished run writes (``masks.safetensors`` or ``weights.safetensors``),
  how it is saved and how evaluation loads it back.

- ``piggyback``: masks of a registered scheme (``binary`` by default) on every
  conv/linear of the frozen backbone (eq. 4-7); its optimizer and learning rate come from
  the recipe (:mod:`common.recipes`).
- ``finetune``: every weight trains (weights the model builder froze stay frozen, e.g.
  FCN's fixed bilinear upsampling).
- ``feature``: the new layers alone train on frozen features ("classifier only").
- ``scratch``: the same network from random initialisation, every weight trains.

``train_bn`` is a modifier of ``piggyback`` and ``feature``: batch-norm layers become
per-task state (paper section 5.3). A pipeline names its new modules and builds its
network; everything else about a method is asked of its record. :func:`save_task` and
:func:`load_task` are the run-level pair every command uses: a run folder or a task file
in, a trained task out, whatever the method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from common.errors import MissingFileError, UsageError, WeightsFileError
from common.masking import (NORM_TYPES, mask_parameters, piggyback, scheme_parameter_scales, scheme_parameters,
                            task_parameters)
from common.schemes import DEFAULT_SCHEME, get_scheme

__all__ = ["Method", "Prepared", "MaskSettings", "METHODS", "get_method", "register_method", "OPTIMIZERS",
           "make_optimizer", "flat_group", "build_optimizers", "make_schedulers", "save_task", "load_task",
           "task_file", "WEIGHTS_FILE", "MASKS_FILE", "WEIGHTS_FORMAT"]

MASKS_FILE = "masks.safetensors"
WEIGHTS_FILE = "weights.safetensors"
# The one format of full-weight files; the names earlier pipelines wrote are still read.
WEIGHTS_FORMAT = "piggyback-toolkit-weights"
_LEGACY_WEIGHTS_FORMATS = ("decathlon-weights", "classification-weights", "fcn32s-weights")
_LEGACY_WEIGHTS_FILES = ("model.safetensors",)


@dataclass(frozen=True)
class MaskSettings:
    """``piggyback``'s mask keywords: the scheme and how the real-valued masks start."""

    scheme: str = DEFAULT_SCHEME
    threshold: float = 5e-3
    mask_init: str = "spread"
    mask_scale: float = 1e-2
    mask_spread: float = 3e-3

    def as_kwargs(self) -> Dict[str, object]:
        return {"scheme": self.scheme, "threshold": self.threshold, "mask_init": self.mask_init,
                "mask_scale": self.mask_scale, "mask_spread": self.mask_spread}


@dataclass
class Prepared:
    """The parameter groups of a prepared model (``main``, ``head``, ``extras``: the mask
    scheme's trained values), and the modules that must stay in eval mode while training
    (frozen batch-norm of the ``feature`` baseline)."""

    main: List[nn.Parameter]
    head: List[nn.Parameter]
    frozen_modules: List[nn.Module] = field(default_factory=list)
    extras: List[nn.Parameter] = field(default_factory=list)
    # the learning-rate factor of each extra (common.masking.scheme_parameter_scales)
    extras_lr_scales: List[Union[float, Tuple[float, ...]]] = field(default_factory=list)

    def trainable_values(self) -> int:
        return sum(p.numel() for p in self.main + self.head + self.extras)


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
    artifact: str = WEIGHTS_FILE  # the file a finished run holds

    def prepare(self, model: nn.Module, *, head: Sequence[str], masks: Optional[MaskSettings] = None,
                train_bn: bool = False) -> Prepared:
        """Make ``model`` trainable for this method in place. ``head`` names the task's
        new modules; ``masks`` are the mask settings (methods that train masks; default
        :class:`MaskSettings`)."""
        if train_bn and not self.supports_train_bn:
            raise UsageError(f"train_bn: batch-norm layers already train with method {self.name}")
        if masks is not None and not self.uses_masks:
            raise UsageError(f"mask settings only apply to a method that trains masks, not {self.name}")
        names = dict(model.named_modules())
        missing = [h for h in head if h not in names]
        if missing:
            raise UsageError(f"head modules {missing} are not in {type(model).__name__}")
        return self._prepare(model, tuple(head), masks or MaskSettings(), train_bn)

    def save(self, model: nn.Module, run_dir, **meta) -> Path:
        """Write the trained task into ``run_dir`` as this method's artifact."""
        from common.maskfile import save_masks
        from common.weightsfile import save_weights_file
        path = Path(run_dir) / self.artifact
        if self.uses_masks:
            return save_masks(model, path, **meta)
        return save_weights_file(path, model, format=WEIGHTS_FORMAT, **dict(meta, method=self.name))


def _in_head(name: str, head: Sequence[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in head)


def _split(model: nn.Module, head: Sequence[str]) -> Prepared:
    main, new = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (new if _in_head(name, head) else main).append(p)
    return Prepared(main=main, head=new)


def _prepare_piggyback(model, head, masks: MaskSettings, train_bn) -> Prepared:
    piggyback(model, **masks.as_kwargs(), train_bn=train_bn, skip=head)
    return Prepared(main=mask_parameters(model), head=task_parameters(model), extras=scheme_parameters(model),
                    extras_lr_scales=scheme_parameter_scales(model))


def _prepare_full(model, head, masks, train_bn) -> Prepared:
    return _split(model, head)


def _prepare_feature(model, head, masks, train_bn) -> Prepared:
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


METHODS: Dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (refused when its name is taken, unless ``replace``);
    every training command's ``--method`` lists the registry."""
    if method.name in METHODS and not replace:
        raise UsageError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _method in (
    Method("piggyback", "masks (--scheme) on the frozen backbone + new classifier", True, True, True,
           None, None, 0.0, _prepare_piggyback, MASKS_FILE),
    Method("finetune", "all weights from the backbone + new classifier", True, False, False,
           "sgd", 1e-2, 5e-4, _prepare_full),
    Method("feature", "new classifier on frozen backbone features", True, False, True,
           None, None, 0.0, _prepare_feature),
    Method("scratch", "the same network from random initialisation", False, False, False,
           "sgd", 0.1, 5e-4, _prepare_full),
):
    register_method(_method)


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


def build_optimizers(prepared: Prepared, cfg) -> Dict[str, torch.optim.Optimizer]:
    """``{"main": ..., "head": ..., "extras": ...}`` for the groups of ``prepared`` from the
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


# ------------------------------------------------------------------ run-level save / load

def task_file(target) -> Path:
    """The trained task of a run folder (the artifact its method wrote), or ``target``
    itself when it is a file."""
    target = Path(target)
    if target.is_file():
        return target
    if not target.is_dir():
        raise MissingFileError(f"{target} does not exist (expected a run folder or a task file)")
    names = list(dict.fromkeys(m.artifact for m in METHODS.values())) + list(_LEGACY_WEIGHTS_FILES)
    for name in names:
        if (target / name).is_file():
            return target / name
    raise MissingFileError(f"{target} holds no trained task ({', '.join(names)}): the run has not finished "
                           f"(re-run its training command to resume it)")


def save_task(run_dir, model: nn.Module, method: str, **meta) -> Path:
    """Write ``model``'s trained task into ``run_dir`` as ``method``'s artifact; returns the path."""
    return get_method(method).save(model, run_dir, **meta)


def read_task_metadata(target) -> dict:
    """The metadata of a run folder's (or a file's) trained task, with ``method`` and
    ``file``: the mask file's header for masks, the weights file's meta otherwise."""
    from common.maskfile import MASK_FORMAT, read_mask_metadata
    from common.weightsfile import read_weights_metadata, safetensors_metadata
    path = task_file(target)
    header = safetensors_metadata(path, "task")
    if header.get("format") == MASK_FORMAT:
        meta = read_mask_metadata(path)
        meta.setdefault("method", "piggyback")
    else:
        fmt = header.get("format")
        if fmt is not None and fmt != WEIGHTS_FORMAT and fmt not in _LEGACY_WEIGHTS_FORMATS:
            raise WeightsFileError(f"{path} is neither a mask file nor a weights file of this toolkit "
                                   f"(header key 'format' = {fmt!r})")
        meta = read_weights_metadata(path)
    meta["file"] = str(path)
    return meta


def load_task(target, model: nn.Module, *, check_fingerprint: bool = True) -> dict:
    """Load the trained task of a run folder or task file into ``model`` and return its
    metadata (``method`` included). Masks convert a plain network by themselves (as
    :func:`common.maskfile.load_masks`); full weights must fit the network exactly."""
    from common.maskfile import load_masks
    from common.weightsfile import load_weights_file
    meta = read_task_metadata(target)
    path = Path(meta["file"])
    if get_method(meta.get("method", "finetune")).uses_masks:
        loaded = load_masks(model, path, check_fingerprint=check_fingerprint)
        return dict(loaded, method=meta["method"], file=str(path))
    load_weights_file(model, path)
    return meta
