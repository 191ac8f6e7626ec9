"""Piggyback masked layers and the model converter (paper section 3).

A masked layer keeps its pretrained ``weight`` (and ``bias``) frozen and learns a
real-valued mask ``mask_real`` of the same shape. The forward pass uses ``weight * m``
where ``m`` is the thresholded mask (eq. 4); the backward pass hands the gradient of ``m``
straight to ``mask_real`` (eq. 5-7): d(loss)/d(mask_real) = d(loss)/d(weight * m) * weight.
The layer's ``weight`` attribute stays the frozen pretrained tensor. Schemes with trained
values beside the mask (``affine``: four scalars per layer, as one tensor) keep them as
parameters of the layer too, ``mask_abcd`` (:func:`extra_name`).

The masked forward is stateless: it reads the frozen weight and the mask and computes
``weight * m`` through the mask scheme's autograd Function (:mod:`common.schemes`), which
saves only tensors. Nothing is cached on the module, so ``torch.compile``, ``torch.func``,
activation checkpointing, pickling, ``.to()`` and DDP all see an ordinary module.

Conversion works on any torchvision or timm model by changing the class of each
weight-bearing layer in place (the module object, its hooks and every reference to it
survive): ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, ``Linear`` and the input
projection of ``nn.MultiheadAttention``, and their subclasses (timm's same-padding convs
among them). Every other weight is frozen without a mask, and a warning names it.
``fold_masks`` turns a masked model back into a plain one.
"""
from __future__ import annotations

import copy
import hashlib
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError
from .schemes import DEFAULT_SCHEME, MaskScheme, get_scheme

__all__ = [
    "MaskedLayer", "MaskedConv1d", "MaskedConv2d", "MaskedConv3d", "MaskedConvTranspose1d",
    "MaskedConvTranspose2d", "MaskedConvTranspose3d", "MaskedLinear", "MaskedMultiheadAttention",
    "FixedNorm", "binarize", "apply_mask", "piggyback", "masked_modules", "mask_entries", "MaskEntry",
    "mask_parameters", "task_parameters", "task_state_modules", "fold_masks", "backbone_fingerprint",
    "is_piggybacked", "set_binary_mask", "mask_name", "extra_name", "upgrade_scheme_state", "MASK_INITS", "NORM_TYPES",
    "conversion_settings", "scheme_parameters", "set_layer_scheme",
]

# Normalisation layers whose affine parameters (and running statistics) are per-task
# state when train_bn=True (paper section 5.3) and frozen backbone state otherwise.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# Attribute set on modules whose own parameters/buffers belong to the task (new heads,
# task-specific normalisation); common.maskfile saves exactly these.
TASK_STATE_ATTR = "_piggyback_task_state"
# Attribute on the root module recording how it was converted (read by common.maskfile).
SETTINGS_ATTR = "_piggyback_settings"


def mask_name(weight_name: str) -> str:
    """Name of the mask parameter of ``weight_name``: ``mask_real`` for ``weight``,
    ``in_proj_mask_real`` for ``in_proj_weight`` and so on."""
    return "mask_real" if weight_name == "weight" else weight_name.replace("weight", "mask_real")


def extra_name(weight_name: str, key: str) -> str:
    """Name of a scheme's extra ``key`` for ``weight_name``: ``mask_abcd`` for ``weight``,
    ``in_proj_mask_abcd`` for ``in_proj_weight`` and so on."""
    return mask_name(weight_name).replace("mask_real", f"mask_{key}")


def binarize(mask_real: torch.Tensor, threshold: float, scheme=DEFAULT_SCHEME) -> torch.Tensor:
    """Hard threshold of eq. 4 under ``scheme`` (binary: 1 where mask_real >= threshold;
    ternary: -1 at or below -threshold, 0 in between, 1 at or above threshold)."""
    return get_scheme(scheme).binarize(mask_real, threshold)


def apply_mask(weight: torch.Tensor, mask_real: torch.Tensor, threshold: float, scheme=DEFAULT_SCHEME,
               extras=()) -> torch.Tensor:
    """The masked weight of ``scheme`` (``weight * m`` with ``m`` from eq. 4 for plain
    masks), differentiable with respect to ``mask_real`` and the extras."""
    return get_scheme(scheme).masked_weight(weight, mask_real, threshold, extras)


# --------------------------------------------------------------------------- layers

class MaskedLayer(nn.Module):
    """Mixin of every masked layer: frozen weights, one ``mask_real`` per masked weight.

    Class attributes: ``_plain_class`` (the class it was converted from) and
    ``_weight_names`` (which of its weights carry a mask). Instance attributes:
    ``threshold``, ``scheme`` and ``mask_scale``.
    """

    _plain_class: type = nn.Module
    _weight_names: Tuple[str, ...] = ("weight",)
    threshold: float
    scheme: MaskScheme
    mask_scale: float

    def masked_weights(self) -> Tuple[str, ...]:
        """Names of this layer's weights that carry a mask."""
        return tuple(n for n in self._weight_names if self._parameters.get(mask_name(n)) is not None)

    def masked_weight(self, name: str = "weight") -> torch.Tensor:
        """``weight * m`` for the weight called ``name`` (eq. 4), with the eq. 7 gradient."""
        return self.scheme.masked_weight(self._parameters[name], self._parameters[mask_name(name)], self.threshold,
                                         [self._parameters[extra_name(name, k)] for k in self.scheme.extras])

    @torch.no_grad()
    def binary_mask(self, name: str = "weight") -> torch.Tensor:
        """The thresholded mask m (eq. 4) of the weight called ``name``."""
        return self.scheme.binarize(self._parameters[mask_name(name)], self.threshold)

    def extra_repr(self) -> str:
        return f"{self._plain_class.extra_repr(self)}, threshold={self.threshold}, scheme={self.scheme.name}"

    def __reduce_ex__(self, protocol):
        # Classes made for arbitrary conv/linear subclasses are rebuilt by the converter,
        # so any masked model pickles, whatever class it was converted from.
        return _rebuild, ("masked", self._plain_class, self.__getstate__())


class _ConvMixin(MaskedLayer):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)


_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _ConvTransposeMixin(MaskedLayer):
    def forward(self, input: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise UsageError(f"only zero padding is supported for {type(self).__name__}")
        dims = len(self.kernel_size)
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, dims, self.dilation)
        return _TRANSPOSED[dims](input, self.masked_weight(), self.bias, self.stride, self.padding,
                                 output_padding, self.groups, self.dilation)


class _LinearMixin(MaskedLayer):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.masked_weight(), self.bias)


def _effective(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    if isinstance(module, MaskedLayer) and module._parameters.get(mask_name(name)) is not None:
        return module.masked_weight(name)
    return getattr(module, name)


class _MultiheadAttentionMixin(MaskedLayer):
    """Masks the input projection (``in_proj_weight``, or ``q/k/v_proj_weight`` when the
    key and value sizes differ); ``out_proj`` is a masked Linear of its own."""

    _weight_names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        separate = not self._qkv_same_embed_dim
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads,
            None if separate else self.masked_weight("in_proj_weight"), self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            _effective(self.out_proj, "weight"), self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=self.masked_weight("q_proj_weight") if separate else None,
            k_proj_weight=self.masked_weight("k_proj_weight") if separate else None,
            v_proj_weight=self.masked_weight("v_proj_weight") if separate else None,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights


class _GenericMixin(MaskedLayer):
    """For conv/linear subclasses with a forward of their own (timm's same-padding and
    weight-standardised convs): their forward runs unchanged and reads ``weight``, which
    for these classes alone is a property giving ``weight * m``; the frozen tensor stays
    the ``weight`` parameter (``_parameters["weight"]``, the key in ``state_dict``).
    Nothing is written to the module during the call, which ``torch.compile`` needs."""

    @property
    def weight(self) -> torch.Tensor:
        return self.masked_weight()

    def forward(self, *args, **kwargs):
        return self._plain_class.forward(self, *args, **kwargs)


_FAMILIES: Tuple[Tuple[type, type], ...] = (
    (nn.modules.conv._ConvTransposeNd, _ConvTransposeMixin),
    (nn.modules.conv._ConvNd, _ConvMixin),
    (nn.Linear, _LinearMixin),
    (nn.MultiheadAttention, _MultiheadAttentionMixin),
)
_MASKED_CLASSES: Dict[type, type] = {}


def _family(cls: type) -> Optional[Tuple[type, type]]:
    for base, mixin in _FAMILIES:
        if issubclass(cls, base):
            return base, mixin
    return None


def _masked_class_for(cls: type) -> type:
    """The masked class of ``cls``, made once and cached."""
    if cls not in _MASKED_CLASSES:
        base, mixin = _family(cls)
        # The family's own forward applies where the subclass keeps its base's forward
        # (grouped and depthwise convs are plain Conv2d; MultiheadAttention's out_proj).
        own_forward = next(c for c in cls.__mro__ if "forward" in c.__dict__)
        if own_forward.__module__.startswith("torch.nn.") or mixin is _MultiheadAttentionMixin:
            chosen = mixin
        else:
            chosen = _GenericMixin
        _MASKED_CLASSES[cls] = type(f"Masked{cls.__name__}", (chosen, cls), {
            "_plain_class": cls, "__module__": __name__,
            "__doc__": f"{cls.__name__} with a piggyback mask on its weights (common.masking)."})
    return _MASKED_CLASSES[cls]


MaskedConv1d = _masked_class_for(nn.Conv1d)
MaskedConv2d = _masked_class_for(nn.Conv2d)
MaskedConv3d = _masked_class_for(nn.Conv3d)
MaskedConvTranspose1d = _masked_class_for(nn.ConvTranspose1d)
MaskedConvTranspose2d = _masked_class_for(nn.ConvTranspose2d)
MaskedConvTranspose3d = _masked_class_for(nn.ConvTranspose3d)
MaskedLinear = _masked_class_for(nn.Linear)
MaskedMultiheadAttention = _masked_class_for(nn.MultiheadAttention)


class FixedNorm(nn.Module):
    """Mixin: a backbone normalisation layer whose statistics and affine parameters are
    frozen; it stays in eval mode whatever ``train()`` says (the paper trains masks with
    the backbone's batch-norm fixed)."""

    _plain_class: type = nn.Module

    def train(self, mode: bool = True):
        return super().train(False)

    def __reduce_ex__(self, protocol):
        return _rebuild, ("fixed", self._plain_class, self.__getstate__())


_FIXED_CLASSES: Dict[type, type] = {}


def _fixed_class_for(cls: type) -> type:
    if cls not in _FIXED_CLASSES:
        _FIXED_CLASSES[cls] = type(f"Fixed{cls.__name__}", (FixedNorm, cls), {
            "_plain_class": cls, "__module__": __name__})
    return _FIXED_CLASSES[cls]


for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    globals()[f"Fixed{_cls.__name__}"] = _fixed_class_for(_cls)
    __all__.append(f"Fixed{_cls.__name__}")


def _rebuild(kind: str, plain: type, state: dict) -> nn.Module:
    cls = _masked_class_for(plain) if kind == "masked" else _fixed_class_for(plain)
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


# ---------------------------------------------------------------------- conversion

def _init_constant(weight, scale, spread, threshold):
    return torch.full_like(weight, scale)


def _init_spread(weight, scale, spread, threshold):
    # Spread around `scale`: masks whose gradients share a sign then cross the threshold
    # over many steps instead of all in the same step (the collapse of the constant init).
    return torch.empty_like(weight).uniform_(scale - spread, scale + spread)


def _init_uniform(weight, scale, spread, threshold):
    # Centred on the threshold: half of the mask starts switched off (the paper's
    # random-initialisation variant).
    return torch.empty_like(weight).uniform_(threshold - scale, threshold + scale)


def _init_weight(weight, scale, spread, threshold):
    # Proportional to |W| with mean `scale`, so |grad m_r| / |m_r| (eq. 7) is alike
    # across layers.
    magnitude = weight.detach().abs()
    return magnitude * (scale / magnitude.mean().clamp_min(1e-12))


MASK_INITS: Dict[str, Callable[..., torch.Tensor]] = {
    "constant": _init_constant,
    "spread": _init_spread,
    "uniform": _init_uniform,
    "weight": _init_weight,
}


def mask_init_names() -> List[str]:
    return sorted(MASK_INITS)


def _in_skip(name: str, skip: Tuple[str, ...]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def _masked_weight_names(module: nn.Module) -> Tuple[str, ...]:
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight",) if module._qkv_same_embed_dim else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        return tuple(n for n in names if isinstance(module._parameters.get(n), torch.Tensor))
    if _family(type(module)) is not None and isinstance(module._parameters.get("weight"), torch.Tensor):
        return ("weight",)
    return ()


def _register_extras(module: "MaskedLayer", scheme: MaskScheme,
                     values: Optional[Dict[str, Dict[str, torch.Tensor]]] = None, trainable: bool = True) -> None:
    """Give ``module`` the extras of ``scheme`` for each masked weight (``values[wname][key]``
    when given, else the scheme's initial values)."""
    for wname in module.masked_weights():
        w = module._parameters[wname]
        given = (values or {}).get(wname, {})
        for key, start in scheme.init_extras(w).items():
            t = given.get(key, start).to(device=w.device, dtype=torch.float32)
            module.register_parameter(extra_name(wname, key), nn.Parameter(t.clone(), requires_grad=trainable))


def set_layer_scheme(module: "MaskedLayer", scheme, threshold: Optional[float] = None,
                     extras: Optional[Dict[str, Dict[str, torch.Tensor]]] = None, trainable: bool = False) -> None:
    """Switch a masked layer to ``scheme`` (and ``threshold``): the extras of its former
    scheme go, the new scheme's come (from ``extras[wname][key]`` when given). Masked
    layers hold no other state, so this is all a task of another scheme needs."""
    scheme = get_scheme(scheme)
    for wname in module.masked_weights():
        for key in module.scheme.extras:
            module._parameters.pop(extra_name(wname, key), None)
    module.scheme = scheme
    if threshold is not None:
        module.threshold = scheme.check_threshold(threshold)
    _register_extras(module, scheme, extras, trainable)


def piggyback(model: nn.Module, *, threshold: float = 5e-3, mask_init: str = "spread",
              mask_scale: float = 1e-2, mask_spread: float = 3e-3, scheme=DEFAULT_SCHEME,
              train_bn: bool = False, skip: Iterable[str] = ()) -> nn.Module:
    """Convert ``model`` in place for piggyback mask training and return it.

    Every conv/linear layer (and attention input projection) outside ``skip`` becomes a
    masked layer with a frozen weight/bias and a trainable ``mask_real``. Modules named in
    ``skip`` (and their children) stay untouched and trainable: they are the task's new
    layers. All other parameters are frozen. Normalisation layers are frozen and kept in
    eval mode, unless ``train_bn`` makes them task-specific (affine parameters and running
    statistics train). ``scheme`` names a registered mask scheme (:mod:`common.schemes`:
    ``binary``, the default, ``ternary``, ``affine`` ...). ``mask_init``: ``spread`` (uniform in
    ``mask_scale +- mask_spread``, the default), ``constant`` (all ``mask_scale``: the
    paper), ``uniform`` (centred on the threshold) or ``weight`` (proportional to |W|).
    """
    scheme_obj = get_scheme(scheme)
    threshold = scheme_obj.check_threshold(threshold)
    if mask_init not in MASK_INITS:
        raise UsageError(f"mask_init={mask_init!r} is not one of {sorted(MASK_INITS)}")
    if not mask_spread >= 0:
        raise UsageError(f"mask_spread must be >= 0, got {mask_spread}")
    if is_piggybacked(model):
        raise UsageError("model already holds masked layers; piggyback() converts a plain model once")
    skip = tuple(skip)
    names = dict(model.named_modules())
    missing = [s for s in skip if s not in names]
    if missing:
        raise UsageError(f"skip names {missing} are not modules of {type(model).__name__}; "
                         f"top-level children are {[n for n, _ in model.named_children()]}")
    init = MASK_INITS[mask_init]
    unmasked: List[str] = []
    for name, module in names.items():
        if _in_skip(name, skip):
            for sub in module.modules():
                setattr(sub, TASK_STATE_ATTR, True)
            continue
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
        weight_names = _masked_weight_names(module)
        if weight_names:
            module.__class__ = _masked_class_for(type(module))
            module.threshold = threshold
            module.scheme = scheme_obj
            module.mask_scale = float(mask_scale)
            for wname in weight_names:
                w = module._parameters[wname]
                module.register_parameter(mask_name(wname), nn.Parameter(
                    init(w, mask_scale, mask_spread, threshold).to(w.dtype)))
            _register_extras(module, scheme_obj)
            covered = set(weight_names) | {mask_name(w) for w in weight_names} | {"bias", "in_proj_bias"} \
                | {extra_name(w, k) for w in weight_names for k in scheme_obj.extras}
        elif isinstance(module, NORM_TYPES):
            covered = set(module._parameters)
            if train_bn:
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
                setattr(module, TASK_STATE_ATTR, True)
            elif isinstance(module, nn.modules.batchnorm._NormBase):
                module.__class__ = _fixed_class_for(type(module))
                module.train(False)
        else:
            covered = set()
        prefix = f"{name}." if name else ""
        unmasked += [prefix + k for k, p in module._parameters.items() if p is not None and k not in covered]
    if unmasked:
        warnings.warn(f"{len(unmasked)} weight(s) stay frozen without a mask: {unmasked}", stacklevel=2)
    model.__dict__[SETTINGS_ATTR] = {"scheme": scheme_obj.name, "threshold": threshold, "skip": list(skip),
                                     "train_bn": bool(train_bn), "mask_init": mask_init,
                                     "mask_scale": float(mask_scale), "mask_spread": float(mask_spread)}
    return model


def conversion_settings(model: nn.Module) -> dict:
    """How ``model`` was converted: scheme, threshold, skip, train_bn, mask_init, mask_scale.

    For a model converted piece by piece (no record on the root), what its layers say."""
    recorded = model.__dict__.get(SETTINGS_ATTR)
    if recorded is not None:
        return dict(recorded)
    layers = [m for _, m in masked_modules(model)]
    if not layers:
        raise UsageError(f"{type(model).__name__} holds no masked layers: convert it with common.masking.piggyback")
    skip = sorted({n for n, m in model.named_modules() if getattr(m, TASK_STATE_ATTR, False)
                   and not isinstance(m, NORM_TYPES)})
    skip = [n for n in skip if not any(n.startswith(s + ".") for s in skip)]
    return {"scheme": layers[0].scheme.name, "threshold": layers[0].threshold, "skip": skip,
            "train_bn": any(getattr(m, TASK_STATE_ATTR, False) for m in model.modules() if isinstance(m, NORM_TYPES)),
            "mask_init": None, "mask_scale": layers[0].mask_scale, "mask_spread": None}


def is_piggybacked(model: nn.Module) -> bool:
    return any(isinstance(m, MaskedLayer) for m in model.modules())


def masked_modules(model: nn.Module) -> Iterator[Tuple[str, MaskedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, MaskedLayer):
            yield name, module


@dataclass(frozen=True)
class MaskEntry:
    """One masked weight: its key in mask files (the module's name, plus ``.in_proj_weight``
    and the like for weights not called ``weight``), its module and the weight's name."""

    key: str
    module: MaskedLayer
    weight_name: str = "weight"

    @property
    def weight(self) -> torch.Tensor:
        return self.module._parameters[self.weight_name]

    @property
    def mask_real(self) -> nn.Parameter:
        return self.module._parameters[mask_name(self.weight_name)]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.module._parameters.get("bias" if self.weight_name == "weight" else "in_proj_bias")

    @property
    def extras(self) -> Dict[str, nn.Parameter]:
        """The scheme's extras of this weight by key (``{}`` for plain masks)."""
        return {k: self.module._parameters[extra_name(self.weight_name, k)] for k in self.module.scheme.extras}

    def binary(self) -> torch.Tensor:
        return self.module.binary_mask(self.weight_name)

    def set(self, mask: torch.Tensor) -> None:
        set_binary_mask(self.module, mask, self.weight_name)


def mask_entries(model: nn.Module) -> List[MaskEntry]:
    """Every masked weight of ``model``, in module order."""
    out = []
    for name, module in masked_modules(model):
        for wname in module.masked_weights():
            key = name if wname == "weight" else (f"{name}.{wname}" if name else wname)
            out.append(MaskEntry(key, module, wname))
    return out


def mask_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [e.mask_real for e in mask_entries(model)]


def upgrade_scheme_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` (state-dict keys of ``model``) with each masked weight's scheme extras in
    the layout ``model`` has: those saved in an earlier layout of its scheme (``affine``'s
    ``mask_a`` ... ``mask_d``, now the rows of ``mask_abcd``) converted; the rest as it is."""
    state = dict(state)
    for name, module in masked_modules(model):
        prefix = f"{name}." if name else ""
        for wname in module.masked_weights():
            current = [prefix + extra_name(wname, k) for k in module.scheme.extras]
            legacy = module.scheme.legacy_extras_shapes(module._parameters[wname].shape)
            if not legacy or all(k in state for k in current):
                continue
            old = {k: prefix + extra_name(wname, k) for k in legacy}
            if all(v in state for v in old.values()):
                upgraded = module.scheme.upgrade_extras({k: state.pop(v) for k, v in old.items()})
                state.update({prefix + extra_name(wname, k): t for k, t in upgraded.items()})
    return state


def scheme_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The trained extras of the mask scheme (``affine``'s a, b, c, d), in module order."""
    return [t for e in mask_entries(model) for t in e.extras.values()]


def scheme_parameter_scales(model: nn.Module) -> List[Union[float, Tuple[float, ...]]]:
    """The learning-rate factor of each of :func:`scheme_parameters` (same order), or its
    factor per row, from its scheme's ``extras_lr_scale`` (``affine``: 1 for rows a and b,
    the RMS of the layer's frozen weight for rows c and d)."""
    return [e.module.scheme.extras_lr_scale(k, e.weight) for e in mask_entries(model) for k in e.extras]


def task_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Trainable parameters that are neither masks nor scheme extras: new heads,
    task-specific norm layers."""
    own = {id(p) for p in mask_parameters(model) + scheme_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in own]


def task_state_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Modules whose own parameters and buffers are per-task state."""
    for name, module in model.named_modules():
        if getattr(module, TASK_STATE_ATTR, False):
            yield name, module


@torch.no_grad()
def set_binary_mask(layer: MaskedLayer, mask: torch.Tensor, name: str = "weight") -> None:
    """Set the mask of ``layer``'s weight ``name`` so that it thresholds to ``mask``
    (values in the scheme's set, e.g. {0, 1} or {-1, 0, 1})."""
    mask_real = layer._parameters[mask_name(name)]
    if tuple(mask.shape) != tuple(mask_real.shape):
        raise UsageError(f"mask of shape {tuple(mask.shape)} for a weight of shape {tuple(mask_real.shape)}")
    layer.scheme.set_real_values(mask_real, mask.to(device=mask_real.device), layer.threshold, layer.mask_scale)


def fold_masks(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` (its original layer classes) whose weights are
    ``weight * m``: the same outputs with no masking cost at inference. The input model is
    left unchanged; real-valued masks are not copied."""
    memo = {}
    for e in mask_entries(model):
        extras = e.extras
        with torch.no_grad():
            folded = e.module.scheme.masked_weight(e.weight, e.mask_real, e.module.threshold, list(extras.values()))
        memo[id(e.weight)] = nn.Parameter(folded)
        memo[id(e.mask_real)] = None
        for t in extras.values():
            memo[id(t)] = None
    plain = copy.deepcopy(model, memo)
    for module in plain.modules():
        if isinstance(module, MaskedLayer):
            for wname in module._weight_names:
                module._parameters.pop(mask_name(wname), None)
                for key in module.scheme.extras:
                    module._parameters.pop(extra_name(wname, key), None)
            for attr in ("threshold", "scheme", "mask_scale"):
                module.__dict__.pop(attr, None)
            module.__class__ = module._plain_class
        elif isinstance(module, FixedNorm):
            module.__class__ = module._plain_class
        module.__dict__.pop(TASK_STATE_ATTR, None)
    plain.__dict__.pop(SETTINGS_ATTR, None)
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain.train(model.training)


@torch.no_grad()
def backbone_fingerprint(model: nn.Module) -> str:
    """A hash of the frozen backbone: names, shapes, dtypes and bytes of the masked weights
    and their biases. Norm layers are left out so that the same backbone has the same
    fingerprint with or without train_bn."""
    h = hashlib.blake2b(digest_size=16)
    for e in mask_entries(model):
        pairs = [(f"{e.key}.weight" if e.weight_name == "weight" else e.key, e.weight)]
        if e.bias is not None:
            pairs.append((f"{e.key}.bias" if e.weight_name == "weight" else f"{e.key}.bias", e.bias))
        for key, tensor in pairs:
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
