"""Piggyback masked layers and the model converter (paper section 3).

A masked layer keeps the pretrained ``weight`` (and ``bias``) frozen and learns a
real-valued mask ``mask_real`` of the same shape. The forward pass uses
``weight * m`` where ``m`` is the hard-thresholded mask (eq. 4); the backward pass hands
the gradient of ``m`` straight to ``mask_real`` (eq. 5-7): d(loss)/d(mask_real) =
d(loss)/d(weight * m) * weight.

Conversion works on any torchvision or timm model by changing the class of each
``nn.Conv2d`` / ``nn.Linear`` in place (the module object, its hooks and every reference
to it survive), so no model file is ever forked. ``fold_masks`` turns a masked model back
into a plain one. The multi-task wrapper lives in :mod:`common.multitask`.
"""
from __future__ import annotations

import copy
import hashlib
import warnings
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MaskedLayer", "MaskedConv2d", "MaskedLinear", "binarize", "apply_mask", "piggyback", "masked_modules",
    "mask_parameters", "task_parameters", "task_state_modules", "fold_masks",
    "backbone_fingerprint", "is_piggybacked", "set_binary_mask", "MASK_INITS", "NORM_TYPES",
    "MultiTaskModel",
]

# Normalisation layers whose affine parameters (and running statistics) are per-task
# state when train_bn=True (paper section 5.3) and frozen backbone state otherwise.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# Attribute set on modules whose own parameters/buffers belong to the task (new heads,
# task-specific normalisation); common.maskfile saves exactly these.
TASK_STATE_ATTR = "_piggyback_task_state"


def binarize(mask_real: torch.Tensor, threshold: float, ternary: bool = False) -> torch.Tensor:
    """Hard threshold of eq. 4: 1 where mask_real >= threshold, else 0.

    Ternary masks use two cut-offs, +threshold and -threshold: 1 above the first,
    -1 at or below the second, 0 in between.
    """
    on = mask_real >= threshold
    if not ternary:
        return on.to(mask_real.dtype)
    return on.to(mask_real.dtype) - (mask_real <= -threshold).to(mask_real.dtype)


def apply_mask(weight: torch.Tensor, mask_real: torch.Tensor, threshold: float, ternary: bool = False,
               out: torch.Tensor = None) -> torch.Tensor:
    """weight * m with m from eq. 4, in one pass (written into ``out`` when given)."""
    if ternary:
        return torch.mul(weight, binarize(mask_real, threshold, True).to(weight.dtype), out=out)
    return torch.where(mask_real >= threshold, weight, weight.new_zeros(()), out=out)


class _StraightThrough(torch.autograd.Function):
    """Hands the masked weight on unchanged and routes its gradient to mask_real (eq. 5-7).

    The masked weight is computed outside, without autograd, often into a buffer reused
    across steps; only the frozen weight is saved for backward, never the mask.
    """

    @staticmethod
    def forward(ctx, masked, weight, mask_real, layer, owns_buffer):
        ctx.save_for_backward(weight)
        ctx.layer, ctx.owns_buffer = layer, owns_buffer
        return masked.view_as(masked)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        if ctx.owns_buffer:
            ctx.layer._buffer_busy = False  # the graph that read the buffer is done with it
        if not ctx.needs_input_grad[2]:
            return None, None, None, None, None
        # eq. 7: dE/dm = dE/d(W*m) * W, passed unchanged to mask_real. The incoming
        # gradient is the convolution's fresh weight gradient with no other reader, so
        # the product is formed in place unless a higher-order graph is being built.
        if torch.is_grad_enabled() or not grad_output.is_contiguous():
            grad_mask = grad_output * weight
        else:
            grad_mask = grad_output.mul_(weight)
        return None, None, grad_mask, None, None


class MaskedLayer(nn.Module):
    """Mixin for masked conv/linear layers; holds threshold, ternary and mask_scale."""

    threshold: float
    ternary: bool
    mask_scale: float
    _plain_class: type
    _buffer_busy: bool = False

    def masked_weight(self) -> torch.Tensor:
        """weight * m, differentiable with respect to mask_real when it trains."""
        if not (self.mask_real.requires_grad and torch.is_grad_enabled()):
            return apply_mask(self.weight, self.mask_real, self.threshold, self.ternary)
        # Training writes weight * m into a buffer kept across steps: a fresh weight-sized
        # tensor every step costs more than the product itself on large layers (VGG's
        # fc6). While a graph that read the buffer awaits its backward, a new forward
        # gets a fresh tensor instead; autograd's version check guards the rest.
        buf = self.__dict__.get("_masked_buffer")
        owns = not self._buffer_busy
        if owns and (buf is None or buf.shape != self.weight.shape or buf.dtype != self.weight.dtype
                     or buf.device != self.weight.device):
            buf = torch.empty_like(self.weight, memory_format=torch.contiguous_format)
            self.__dict__["_masked_buffer"] = buf
        with torch.no_grad():
            masked = apply_mask(self.weight, self.mask_real, self.threshold, self.ternary, out=buf if owns else None)
        self._buffer_busy = owns or self._buffer_busy
        return _StraightThrough.apply(masked, self.weight, self.mask_real, self, owns)

    def train(self, mode: bool = True):
        # A graph dropped without backward (e.g. a forward for logging) would otherwise
        # keep the buffer marked busy for good.
        self._buffer_busy = False
        return super().train(mode)

    @torch.no_grad()
    def binary_mask(self) -> torch.Tensor:
        """The thresholded mask m (eq. 4), same shape as the weight."""
        return binarize(self.mask_real, self.threshold, self.ternary)

    def forward(self, *args, **kwargs):
        # Generic path for conv/linear subclasses with their own forward (e.g. timm's
        # same-padding conv): present the masked weight under the name `weight` while
        # the original forward runs.
        masked = self.masked_weight()
        frozen = self._parameters.pop("weight")
        try:
            self.__dict__["weight"] = masked
            return self._plain_class.forward(self, *args, **kwargs)
        finally:
            del self.__dict__["weight"]
            self._parameters["weight"] = frozen

    def extra_repr(self) -> str:
        return f"{self._plain_class.extra_repr(self)}, threshold={self.threshold}, ternary={self.ternary}"


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class MaskedLinear(MaskedLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


MaskedConv2d._plain_class = nn.Conv2d
MaskedLinear._plain_class = nn.Linear
_MASKED_CLASSES: Dict[type, type] = {nn.Conv2d: MaskedConv2d, nn.Linear: MaskedLinear}


def _masked_class_for(cls: type) -> type:
    """The masked class for cls: the fast classes for the plain types, a generic
    subclass for conv/linear subclasses (grouped/depthwise convs are plain Conv2d)."""
    if cls not in _MASKED_CLASSES:
        _MASKED_CLASSES[cls] = type(f"Masked{cls.__name__}", (MaskedLayer, cls), {"_plain_class": cls})
    return _MASKED_CLASSES[cls]


def _init_constant(weight: torch.Tensor, scale: float, threshold: float) -> torch.Tensor:
    return torch.full_like(weight, scale)


def _init_uniform(weight: torch.Tensor, scale: float, threshold: float) -> torch.Tensor:
    # Centred on the threshold: half of the mask starts switched off (the paper's
    # random-initialisation variant).
    return torch.empty_like(weight).uniform_(threshold - scale, threshold + scale)


def _init_weight(weight: torch.Tensor, scale: float, threshold: float) -> torch.Tensor:
    # Proportional to |W| with mean `scale`, so |grad m_r| / |m_r| (eq. 7) is alike
    # across layers (the paper's first initialisation option).
    magnitude = weight.detach().abs()
    return magnitude * (scale / magnitude.mean().clamp_min(1e-12))


MASK_INITS: Dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "constant": _init_constant,
    "uniform": _init_uniform,
    "weight": _init_weight,
}


class _FrozenNorm:
    """Mixin: a normalisation layer that stays in eval mode whatever train() says."""

    def train(self, mode: bool = True):
        super().train(False)
        return self


_FROZEN_NORM_CLASSES: Dict[type, type] = {}


def _frozen_norm_class(cls: type) -> type:
    if cls not in _FROZEN_NORM_CLASSES:
        _FROZEN_NORM_CLASSES[cls] = type(f"Frozen{cls.__name__}", (_FrozenNorm, cls), {"_plain_class": cls})
    return _FROZEN_NORM_CLASSES[cls]


def _in_skip(name: str, skip: Tuple[str, ...]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def piggyback(model: nn.Module, *, threshold: float = 5e-3, mask_init: str = "constant",
              mask_scale: float = 1e-2, ternary: bool = False, train_bn: bool = False,
              skip: Iterable[str] = ()) -> nn.Module:
    """Convert ``model`` in place for piggyback mask training and return it.

    Every nn.Conv2d / nn.Linear outside ``skip`` becomes a masked layer with a frozen
    weight/bias and a trainable ``mask_real``. Modules named in ``skip`` (and their
    children) stay untouched and trainable: they are the task's new layers. All other
    parameters are frozen. Normalisation layers are frozen and kept in eval mode, unless
    ``train_bn`` makes them task-specific (affine parameters and running statistics train).
    """
    if mask_init not in MASK_INITS:
        raise ValueError(f"mask_init={mask_init!r} is not one of {sorted(MASK_INITS)}")
    if ternary and threshold <= 0:
        raise ValueError(f"ternary masks need threshold > 0 (cut-offs at +-threshold), got {threshold}")
    if is_piggybacked(model):
        raise ValueError("model already holds masked layers; piggyback() converts a plain model once")
    skip = tuple(skip)
    names = dict(model.named_modules())
    missing = [s for s in skip if s not in names]
    if missing:
        raise KeyError(f"skip names {missing} are not modules of {type(model).__name__}; "
                       f"top-level children are {[n for n, _ in model.named_children()]}")
    init = MASK_INITS[mask_init]
    multihead_children = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    unmasked = []
    for name, module in names.items():
        if _in_skip(name, skip):
            for sub in module.modules():
                setattr(sub, TASK_STATE_ATTR, True)
            continue
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if id(module) in multihead_children:
                unmasked.append(name)  # nn.MultiheadAttention reads out_proj.weight itself
                continue
            module.__class__ = _masked_class_for(type(module))
            module.threshold = float(threshold)
            module.ternary = bool(ternary)
            module.mask_scale = float(mask_scale)
            module.mask_real = nn.Parameter(init(module.weight, mask_scale, threshold).to(module.weight.dtype))
        elif isinstance(module, NORM_TYPES):
            if train_bn:
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
                setattr(module, TASK_STATE_ATTR, True)
            elif isinstance(module, nn.modules.batchnorm._NormBase):
                module.__class__ = _frozen_norm_class(type(module))
                module.train(False)
    if unmasked:
        warnings.warn(f"left unmasked (their parent reads the weight directly): {unmasked}")
    return model


def is_piggybacked(model: nn.Module) -> bool:
    return any(isinstance(m, MaskedLayer) for m in model.modules())


def masked_modules(model: nn.Module) -> Iterator[Tuple[str, MaskedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, MaskedLayer):
            yield name, module


def mask_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [m.mask_real for _, m in masked_modules(model)]


def task_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Trainable parameters that are not masks: new heads, task-specific norm layers."""
    masks = {id(p) for p in mask_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in masks]


def task_state_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Modules whose own parameters and buffers are per-task state."""
    for name, module in model.named_modules():
        if getattr(module, TASK_STATE_ATTR, False):
            yield name, module


@torch.no_grad()
def set_binary_mask(layer: MaskedLayer, mask: torch.Tensor) -> None:
    """Set ``mask_real`` so that it thresholds to ``mask`` (values in {0,1} or {-1,0,1})."""
    if mask.shape != layer.weight.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} for a weight of shape {tuple(layer.weight.shape)}")
    delta = abs(layer.mask_scale - layer.threshold) or 1e-3
    if layer.ternary:
        values = mask.to(layer.mask_real.dtype) * (layer.threshold + delta)
    else:
        values = torch.where(mask.to(layer.mask_real.device) > 0, layer.threshold + delta, layer.threshold - delta)
    layer.mask_real.copy_(values)


def fold_masks(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` (ordinary nn.Conv2d/nn.Linear/norm classes) whose
    weights are ``weight * m``: the same outputs with no masking cost at inference.
    The input model is left unchanged; real-valued masks are not copied."""
    memo = {}
    for _, layer in masked_modules(model):
        with torch.no_grad():
            folded = apply_mask(layer.weight, layer.mask_real, layer.threshold, layer.ternary)
        memo[id(layer.weight)] = nn.Parameter(folded)
        memo[id(layer.mask_real)] = None
        if "_masked_buffer" in layer.__dict__:
            memo[id(layer.__dict__["_masked_buffer"])] = None
    plain = copy.deepcopy(model, memo)
    for module in plain.modules():
        if isinstance(module, MaskedLayer):
            del module._parameters["mask_real"]
            for attr in ("threshold", "ternary", "mask_scale", "_masked_buffer", "_buffer_busy"):
                module.__dict__.pop(attr, None)
            module.__class__ = module._plain_class
        elif isinstance(module, _FrozenNorm):
            module.__class__ = module._plain_class
        module.__dict__.pop(TASK_STATE_ATTR, None)
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain.train(model.training)


def _backbone_tensors(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """The frozen weights and biases the masks apply to. Norm layers are left out so
    that the same backbone has the same fingerprint with or without train_bn."""
    for name, layer in masked_modules(model):
        yield f"{name}.weight", layer.weight
        if layer.bias is not None:
            yield f"{name}.bias", layer.bias


@torch.no_grad()
def backbone_fingerprint(model: nn.Module) -> str:
    """A hash of the frozen backbone: names, shapes, dtypes and bytes of the masked weights."""
    h = hashlib.blake2b(digest_size=16)
    for key, tensor in _backbone_tensors(model):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def __getattr__(name):
    # MultiTaskModel lives in common.multitask, which builds on this module and on
    # common.maskfile; importing it lazily keeps the import graph acyclic.
    if name == "MultiTaskModel":
        from .multitask import MultiTaskModel
        return MultiTaskModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
