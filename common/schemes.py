"""Mask schemes: what a mask entry can be, and everything that follows from it.

A scheme owns, in one place:

- the hard threshold of eq. 4 (``binarize``) and the masked weight with its
  straight-through gradient (eq. 5-7), as an autograd Function that saves only tensors;
- the trained per-layer values it adds beside the mask (``extras``: none for ``binary``
  and ``ternary``; ``affine``'s four scalars, as one tensor), their initial values and the
  optimizer settings they train with by default;
- the inverse used when a mask is loaded (``real_values``: a ``mask_real`` that
  thresholds back to a given mask);
- the storage: bits per entry, bit-packing and unpacking.

``binary`` (m in {0, 1}, the paper), ``ternary`` (m in {-1, 0, 1}, cut-offs at
+-threshold) and ``affine`` / ``affine-channel`` (a binary mask M and real scalars per
layer or per output channel: ``W' = a W + b (M W) + c M + d``) are defined here. A new
scheme is one subclass and one :func:`register_scheme` call; the masked layers, the mask
file, the multi-task model, accounting and every training command's ``--scheme`` take
it from the registry.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .bits import pack_bits, unpack_bits
from .errors import UsageError

__all__ = ["MaskScheme", "BinaryScheme", "TernaryScheme", "AffineScheme", "SCHEMES", "get_scheme",
           "register_scheme", "scheme_names", "DEFAULT_SCHEME"]

DEFAULT_SCHEME = "binary"


_WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def _is_transformed(t: torch.Tensor) -> bool:
    return bool(_WRAPPED is not None and _WRAPPED(t))


def _transforms_active(*tensors: torch.Tensor) -> bool:
    """True inside a torch.func transform (one global check where torch has it, else any of
    ``tensors`` wrapped by one)."""
    if _TRANSFORMS_ACTIVE is not None:
        return bool(_TRANSFORMS_ACTIVE())
    return any(_is_transformed(t) for t in tensors)


def _reusable(grad: torch.Tensor, like: torch.Tensor) -> bool:
    """True when the incoming gradient may be overwritten in place: it is the layer's fresh
    weight gradient, read by nothing else. Not when a higher-order graph is being built,
    nor under torch.func transforms or torch.compile (which fuses the product anyway)."""
    return not (torch.compiler.is_compiling() or torch.is_grad_enabled() or not grad.is_contiguous()
                or grad.shape != like.shape or _is_transformed(grad))


class _StraightThrough(torch.autograd.Function):
    """Forward: ``weight * m(mask_real)``. Backward (eq. 5-7): the gradient of ``m`` is
    handed unchanged to ``mask_real``, so dE/d(mask_real) = dE/d(W*m) * W. The frozen
    weight gets no gradient. Only the weight tensor is saved; no module is touched."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, mask_real, _ = inputs
        ctx.save_for_backward(weight)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        # Forming eq. 7 in the incoming gradient saves a weight-sized allocation per layer
        # and step (103 M values for VGG's fc6).
        if not _reusable(grad_output, weight):
            return None, grad_output * weight, None
        return None, grad_output.mul_(weight), None


class _BinaryMaskedWeight(_StraightThrough):
    @staticmethod
    def forward(weight, mask_real, threshold):
        # eq. 4: m = 1 where mask_real >= threshold; selecting is one pass, no product
        return torch.where(mask_real >= threshold, weight, 0.0)


class _TernaryMaskedWeight(_StraightThrough):
    @staticmethod
    def forward(weight, mask_real, threshold):
        m = (mask_real >= threshold).to(weight.dtype) - (mask_real <= -threshold).to(weight.dtype)
        return weight * m


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dimensions where ``shape`` has size 1 (the broadcast of a scalar
    or per-channel extra over the weight), into a new tensor: a copy when there is nothing
    to sum (per-channel values of a 1x1 depthwise kernel), since the backward reuses ``t``."""
    dims = [i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t.clone()


def _dot_to(x: torch.Tensor, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``_reduce_to(x * y, shape)`` without the weight-sized product: one dot product for a
    per-layer value, one per output channel for per-channel values."""
    if x.dtype == y.dtype and x.shape == y.shape and x.dim() >= 1:
        if shape.numel() == 1:
            return torch.dot(x.reshape(-1), y.reshape(-1)).reshape(shape)
        if shape[0] == x.shape[0] and shape.numel() == shape[0]:
            return torch.linalg.vecdot(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)).reshape(shape)
    return _reduce_to(x * y, shape)


def _stacked_sums(grad: torch.Tensor, weight: torch.Tensor, on: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The gradients of a, b, c, d (sums of dE/dW' times W, M W, M and 1 over the entries
    each covers), shape ``(4, *shape)``, as one reduction of the four products stacked, for
    compiled steps: the compiler makes one reduction of it instead of one per value, and
    the per-layer launches, not the weight-sized work, are what these values cost on a GPU
    (BENCHMARKS-gpu.md, 6f)."""
    on_grad = torch.where(on, grad, 0.0)
    stacked = torch.stack([grad * weight, on_grad * weight, on_grad, grad])
    dims = [i + 1 for i, s in enumerate(shape) if s == 1 and weight.shape[i] != 1]
    return stacked.sum(dim=dims, keepdim=True) if dims else stacked


def _cpu_eager(*tensors: torch.Tensor) -> bool:
    """True for plain CPU tensors outside torch.compile and torch.func transforms: there the
    affine scheme takes :class:`_AffineMaskedWeightCPU`, which writes eq. 4 as a float mask
    and its scalars as products with one broadcast operand or a Python number, which torch's
    CPU kernels vectorise. A select (``where``) branches on each mask entry, and a
    multiply-add with two broadcast operands is not vectorised (the forms table of
    BENCHMARKS.md, section 1)."""
    if torch.compiler.is_compiling() or _transforms_active(*tensors):
        return False
    for t in tensors:
        if t.device.type != "cpu":
            return False
    return True


def _mask_values(mask_real: torch.Tensor, threshold: float, dtype: torch.dtype) -> torch.Tensor:
    """eq. 4 as 0.0 / 1.0 in ``dtype``: one comparison written straight into a new float
    tensor (converting a boolean tensor to floats is a slower kernel on the CPU)."""
    return torch.ge(mask_real, threshold, out=torch.empty_like(mask_real, dtype=dtype))


def _times_plus(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x * s + t`` for scalars or per-channel values ``s``, ``t``: a product, then an
    in-place sum (for the CPU path of :func:`_cpu_eager`)."""
    return torch.mul(x, s, out=out).add_(t) if out is not None else torch.mul(x, s).add_(t)


def _rows(abcd: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """a, b, c, d: the rows of ``abcd`` in the weight's ``dtype``."""
    return (abcd if abcd.dtype == dtype else abcd.to(dtype)).unbind(0)


def _abcd_grad(grad: torch.Tensor, weight: torch.Tensor, on_grad: torch.Tensor, shape: torch.Size,
               dtype: torch.dtype) -> torch.Tensor:
    """The gradients of a, b, c, d stacked like ``abcd``: sums of dE/dW' times W, M W, M and
    1 over the entries each value covers, from dE/dW' and dE/dW' where M is on (``on_grad``):
    dot products for a and b, sums for c and d (for per-layer values of contiguous tensors,
    on flat views: four operations fewer per layer and step)."""
    if (shape.numel() == 1 and grad.dtype == weight.dtype == on_grad.dtype
            and grad.is_contiguous() and weight.is_contiguous() and on_grad.is_contiguous()):
        g, w, o = grad.view(-1), weight.view(-1), on_grad.view(-1)
        sums = torch.stack([torch.dot(g, w), torch.dot(o, w), o.sum(), g.sum()]).view((4,) + shape)
    else:
        sums = torch.stack([_dot_to(grad, weight, shape), _dot_to(on_grad, weight, shape),
                            _reduce_to(on_grad, shape), _reduce_to(grad, shape)])
    return sums if sums.dtype == dtype else sums.to(dtype)


class _AffineMaskedWeight(torch.autograd.Function):
    """``W' = a W + b (M W) + c M + d`` with M the binary mask of eq. 4 and a, b, c, d the
    rows of one tensor (``abcd``, shape ``(4, *values)``: one tensor per layer, so autograd
    and the optimizer handle one tensor, not four). Backward: the straight-through estimator
    of eq. 7 applied to W', dE/d(mask_real) = dE/dW' * (b W + c), and the exact gradients of
    a, b, c, d (:func:`_abcd_grad`), stacked like ``abcd``. The frozen weight gets no gradient.

    This is the form for GPUs, compiled steps and torch.func transforms; CPU eager steps take
    :class:`_AffineMaskedWeightCPU` (:meth:`AffineScheme.masked_weight` chooses). Written for
    few weight-sized passes and few operations per layer (small layers, such as depthwise
    convolutions, cost their operations' fixed overhead, not their size). Forward: two fused
    multiply-adds and one select (``where(M, W (a + b) + (c + d), W a + d)``). Backward: when
    compiled, one reduction of the four products stacked (:func:`_stacked_sums`); otherwise
    dE/dW' where M is on (a select), dot products and sums. Then the slope ``b W + c`` into the
    buffer of dE/dW' where M is on, once it is read, and one product for the mask's gradient
    (in place when the incoming gradient allows)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, mask_real, threshold, abcd):
        a, b, c, d = _rows(abcd, weight.dtype)
        return torch.where(mask_real >= threshold, torch.addcmul(c + d, weight, a + b), torch.addcmul(d, weight, a))

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, mask_real, threshold, abcd = inputs
        ctx.threshold = threshold
        ctx.save_for_backward(weight, mask_real, abcd)

    @staticmethod
    def backward(ctx, grad):
        weight, mask_real, abcd = ctx.saved_tensors
        need = ctx.needs_input_grad
        shape = abcd.shape[1:]
        grads, on_grad = [None] * 4, None
        if need[3] and torch.compiler.is_compiling():
            grads[3] = _stacked_sums(grad, weight, mask_real >= ctx.threshold, shape).to(abcd.dtype)
        elif need[3]:
            on_grad = torch.where(mask_real >= ctx.threshold, grad, 0.0)
            grads[3] = _abcd_grad(grad, weight, on_grad, shape, abcd.dtype)
        if need[1]:
            _, b, c, _ = _rows(abcd, weight.dtype)
            # the slope b W + c goes into the buffer of dE/dW' where M is on, read by now
            free = on_grad if on_grad is not None and _reusable(on_grad, weight) else None
            slope = torch.addcmul(c, weight, b, out=free)
            grads[1] = grad.mul_(slope) if _reusable(grad, weight) else grad * slope
        return tuple(grads)


class _AffineMaskedWeightCPU(torch.autograd.Function):
    """:class:`_AffineMaskedWeight` for CPU eager steps (:func:`_cpu_eager`): the same values
    and gradients, written for the CPU's vectorised kernels and few weight-sized passes.

    Forward: M as a float tensor (one comparison), then ``W a + d``, plus ``b (M W)`` and
    ``c M`` in place, with a, b, c, d as Python numbers for per-layer values (one product
    operand, no broadcast tensor; per-channel values: ``(W a + d) + M (W b + c)``). The
    float M is kept for the backward, which needs it: one weight-sized tensor per masked
    layer from the forward to the backward, in exchange for a comparison, an allocation and
    a pass over the weights fewer per layer and step (BENCHMARKS.md, the affine scheme's
    cost). Backward, when the incoming gradient may be overwritten (:func:`_reusable`):
    dE/dW' where M is on written into M, dot products and sums for the scalars
    (:func:`_abcd_grad`), and the mask's gradient ``c dE/dW' + b (dE/dW' W)`` into the same
    buffer. Otherwise (a graph for higher-order gradients, a non-contiguous gradient) the
    out-of-place form with a, b, c, d as tensors, so that their own gradients flow, and M
    only read. The mask is handed over once: a second backward through a retained graph
    computes it again."""

    @staticmethod
    def forward(ctx, weight, mask_real, threshold, abcd):
        mask = _mask_values(mask_real, threshold, weight.dtype)
        values = abcd.reshape(4).tolist() if abcd.numel() == 4 else None
        if values is not None:
            a, b, c, d = values
            out = torch.mul(weight, a).add_(d).addcmul_(mask, weight, value=b).add_(mask, alpha=c)
        else:
            a, b, c, d = _rows(abcd, weight.dtype)
            out = _times_plus(weight, a, d).addcmul_(mask, _times_plus(weight, b, c))
        ctx.threshold, ctx.values, ctx.mask = threshold, values, mask
        ctx.save_for_backward(weight, mask_real, abcd)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, mask_real, abcd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = ctx.__dict__.pop("mask", None)
        if mask is None:
            mask = _mask_values(mask_real, ctx.threshold, weight.dtype)
        reuse = _reusable(grad, weight)
        grads, on_grad = [None] * 4, None
        if need[3]:
            on_grad = mask.mul_(grad) if reuse else mask * grad
            grads[3] = _abcd_grad(grad, weight, on_grad, abcd.shape[1:], abcd.dtype)
        if need[1]:
            free = (on_grad if on_grad is not None else mask) if reuse else None
            if ctx.values is not None and reuse:
                _, b, c, _ = ctx.values
                grads[1] = torch.mul(grad, c, out=free).addcmul_(grad, weight, value=b)
            else:
                _, b, c, _ = _rows(abcd, weight.dtype)
                slope = _times_plus(weight, b, c, out=free)
                grads[1] = grad.mul_(slope) if reuse else grad * slope
        return None, grads[1], None, grads[3]


class MaskScheme:
    """What a mask entry can be; see the module docstring. Subclass, then
    :func:`register_scheme` an instance."""

    name: str = ""
    summary: str = ""
    values: Tuple[int, ...] = ()
    bits: int = 1
    function = _StraightThrough
    # trained values per masked weight beside the mask (none for plain mask schemes)
    extras: Tuple[str, ...] = ()
    # default optimizer and learning rate of the extras (schemes that have some)
    extras_optimizer: Optional[str] = None
    extras_lr: Optional[float] = None
    # what the scheme gained on real images against binary masks and finetuning, in words
    # (``--help`` shows it; the figures are in BENCHMARKS.md)
    gain: str = ""

    def extras_lr_scale(self, name: str, weight: torch.Tensor) -> Union[float, Tuple[float, ...]]:
        """Factor on the extras' learning rate for extra ``name`` of ``weight``, or one
        factor per row (dimension 0) of the extra: 1 for a dimensionless value; values in
        the weight's own units (a shift added to it) take the weight's scale, so that one
        learning rate fits every layer."""
        return 1.0

    @property
    def cost(self) -> str:
        """What a task's mask costs on disk, in words (``--help`` lists it)."""
        return f"{self.bits} bit{'s' if self.bits > 1 else ''} per masked weight"

    def check_threshold(self, threshold: float) -> float:
        threshold = float(threshold)
        if not (threshold > 0 and threshold != float("inf")):
            raise UsageError(f"{self.name} masks need a finite threshold > 0, got {threshold}")
        return threshold

    def masked_weight(self, weight: torch.Tensor, mask_real: torch.Tensor, threshold: float,
                      extras: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The weight the layer computes with (``weight * m``, eq. 4, for plain masks),
        differentiable with respect to ``mask_real`` (eq. 7) and the extras."""
        return self.function.apply(weight, mask_real, threshold, *extras)

    def init_extras(self, weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Initial values of the extras for a weight (float32, on the weight's device)."""
        return {}

    def extras_shape(self, weight_shape: Sequence[int]) -> Tuple[int, ...]:
        """Shape of each extra for a weight of ``weight_shape``."""
        return ()

    def legacy_extras_shapes(self, weight_shape: Sequence[int]) -> Optional[Dict[str, List[int]]]:
        """The extras (key: shape) an earlier layout of this scheme stored for a weight of
        ``weight_shape``, still read by :meth:`upgrade_extras`; None when there is none."""
        return None

    def upgrade_extras(self, extras: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``extras`` (one weight's, by key) in this scheme's current layout: those of an
        earlier layout converted, current ones as they are."""
        return dict(extras)

    def binarize(self, mask_real: torch.Tensor, threshold: float) -> torch.Tensor:
        raise NotImplementedError

    def real_values(self, mask: torch.Tensor, threshold: float, scale: float) -> torch.Tensor:
        """A ``mask_real`` that thresholds to ``mask``: on-entries at ``threshold + d``,
        off-entries at ``threshold - d`` with ``d = |scale - threshold|`` (or 1e-3)."""
        raise NotImplementedError

    def pack(self, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self, packed: torch.Tensor, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def packed_bytes(self, numel: int) -> int:
        return self.bits * ((numel + 7) // 8)

    @property
    def signed(self) -> bool:
        return min(self.values) < 0

    def __eq__(self, other) -> bool:
        return isinstance(other, MaskScheme) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self):
        return (get_scheme, (self.name,))


def _delta(threshold: float, scale: float) -> float:
    return abs(scale - threshold) or 1e-3


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class BinaryScheme(MaskScheme):
    name = "binary"
    summary = "m in {0, 1}: the paper's binary mask"
    values = (0, 1)
    bits = 1
    function = _BinaryMaskedWeight

    def binarize(self, mask_real, threshold):
        return (mask_real >= threshold).to(mask_real.dtype)

    def real_values(self, mask, threshold, scale):
        d = _delta(threshold, scale)
        return torch.where(mask > 0, torch.full_like(mask, threshold + d), torch.full_like(mask, threshold - d))

    def pack(self, mask):
        return pack_bits(mask > 0)

    def unpack(self, packed, shape, dtype=torch.float32):
        return unpack_bits(packed, _numel(shape)).to(dtype).view(tuple(int(s) for s in shape))


class TernaryScheme(MaskScheme):
    name = "ternary"
    summary = "m in {-1, 0, 1} (cut-offs at +-threshold)"
    values = (-1, 0, 1)
    bits = 2
    function = _TernaryMaskedWeight

    def binarize(self, mask_real, threshold):
        return (mask_real >= threshold).to(mask_real.dtype) - (mask_real <= -threshold).to(mask_real.dtype)

    def real_values(self, mask, threshold, scale):
        return mask * (threshold + _delta(threshold, scale))

    def pack(self, mask):
        # two planes: non-zero, then sign
        return torch.cat([pack_bits(mask != 0), pack_bits(mask < 0)])

    def unpack(self, packed, shape, dtype=torch.float32):
        n = _numel(shape)
        half = (n + 7) // 8
        if packed.numel() != 2 * half:
            raise UsageError(f"a ternary mask of {n} entries needs {2 * half} bytes, got {packed.numel()}")
        nonzero = unpack_bits(packed[:half], n).to(dtype)
        negative = unpack_bits(packed[half:], n).to(dtype)
        return (nonzero * (1 - 2 * negative)).view(tuple(int(s) for s in shape))


class AffineScheme(BinaryScheme):
    """A binary mask M and four real values a, b, c, d per layer (or per output channel:
    weight dimension 0) that turn the frozen weight into ``W' = a W + b (M W) + c M + d``.
    They start at a = 0, b = 1, c = d = 0: with every mask entry on, the backbone itself;
    piggyback is the case a = c = d = 0, b = 1. The four are the rows of one extra,
    ``abcd`` (the layer's ``mask_abcd``, shape ``(4, 1, ...)`` or ``(4, out channels, 1,
    ...)``), stored in float32 beside the binary mask's bits."""

    extras = ("abcd",)
    function = _AffineMaskedWeight
    extras_optimizer = "adam"
    # a and b at this rate, c and d at this rate times their layer's weight RMS (extras_lr_scale);
    # chosen by the sweep of benchmarks.transfer (BENCHMARKS.md)
    extras_lr = 3e-4
    gain = ("on real MNIST and the UCI digits with an ImageNet MobileNetV2 (ten seeds), above binary masks on "
            "MNIST and level with binary masks and finetuning elsewhere (within 0.15 point under them), and level "
            "with finetuning with the training command's defaults; its training step costs a little more than "
            "binary's on a CPU, more on a GPU")

    def __init__(self, name: str = "affine", per_channel: bool = False):
        self.name = name
        self.per_channel = per_channel
        self.summary = ("binary mask M plus real a, b, c, d per " + ("output channel" if per_channel else "layer")
                        + ": W' = a W + b (M W) + c M + d")
        if per_channel:  # BENCHMARKS.md: the transfer sweep (five seeds) and the affine section (ten)
            self.gain = ("on real MNIST and the UCI digits with an ImageNet MobileNetV2 (ten seeds), above binary "
                         "masks on MNIST and level with binary masks and finetuning elsewhere; more float32 values "
                         "on disk than affine, most on networks with few weights per output channel")

    def extras_lr_scale(self, name, weight):
        # rows a and b multiply the weight (dimensionless); c and d are added to it: they move
        # in units of the layer's weights (their root mean square), so one rate fits all layers
        rms = float(weight.detach().float().pow(2).mean().sqrt()) or 1.0
        return (1.0, 1.0, rms, rms)

    @property
    def cost(self):
        return ("1 bit per masked weight plus four float32 values per "
                + ("output channel" if self.per_channel else "masked layer"))

    def extras_shape(self, weight_shape):
        dims = len(weight_shape)
        return (4,) + ((int(weight_shape[0]),) + (1,) * (dims - 1) if self.per_channel else (1,) * dims)

    # the earlier layout: a, b, c, d as four tensors of the values' shape (files and
    # checkpoints written before they became the rows of one tensor)
    _LEGACY = ("a", "b", "c", "d")

    def legacy_extras_shapes(self, weight_shape):
        return {k: list(self.extras_shape(weight_shape)[1:]) for k in self._LEGACY}

    def upgrade_extras(self, extras):
        if set(extras) == set(self._LEGACY):
            return {"abcd": torch.stack([extras[k] for k in self._LEGACY])}
        return dict(extras)

    def masked_weight(self, weight, mask_real, threshold, extras=()):
        fn = _AffineMaskedWeightCPU if _cpu_eager(weight, mask_real, *extras) else self.function
        return fn.apply(weight, mask_real, threshold, *extras)

    def init_extras(self, weight):
        abcd = torch.zeros(self.extras_shape(weight.shape), dtype=torch.float32, device=weight.device)
        abcd[1] = 1.0  # a = 0, b = 1, c = d = 0
        return {"abcd": abcd}


SCHEMES: Dict[str, MaskScheme] = {}


def register_scheme(scheme: MaskScheme, *, replace: bool = False) -> MaskScheme:
    """Add ``scheme`` to the registry under ``scheme.name`` (refused when the name is taken,
    unless ``replace``); returns it. Every command's ``--scheme`` lists the registry."""
    if not isinstance(scheme, MaskScheme):
        raise UsageError(f"register_scheme takes a MaskScheme instance, got {type(scheme).__name__}")
    if not scheme.name or not all(ch.isalnum() or ch in "-_" for ch in scheme.name):
        raise UsageError(f"a scheme needs a name of letters, digits, '-' and '_', got {scheme.name!r}")
    if scheme.name in SCHEMES and not replace:
        raise UsageError(f"mask scheme {scheme.name!r} is already registered")
    if not scheme.values or scheme.bits < 1:
        raise UsageError(f"scheme {scheme.name!r} must state its mask values and bits per entry")
    SCHEMES[scheme.name] = scheme
    return scheme


for _scheme in (BinaryScheme(), TernaryScheme(), AffineScheme("affine"), AffineScheme("affine-channel", True)):
    register_scheme(_scheme)


def scheme_names() -> List[str]:
    return list(SCHEMES)


def get_scheme(name) -> MaskScheme:
    """The scheme called ``name`` (a scheme object is returned as it is)."""
    if isinstance(name, MaskScheme):
        return name
    if name not in SCHEMES:
        raise UsageError(f"unknown mask scheme {name!r}; valid: {', '.join(SCHEMES)}")
    return SCHEMES[name]
