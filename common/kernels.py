"""The masked-weight kernels of the mask schemes (:mod:`common.schemes`): autograd Functions
that compute a layer's effective weight from its frozen weight and real-valued mask in the
forward, and pass the gradient of eq. 5-7 straight through to the mask in the backward.

Every Function saves only tensors and defines ``setup_context`` (what ``torch.func`` and
``torch.compile`` need). ``BinaryMaskedWeight`` and ``TernaryMaskedWeight`` select instead
of multiplying; ``AffineMaskedWeight`` is the affine scheme's (``W' = a W + b (M W) + c M +
d``) with its scalars' gradients as one stacked reduction, and ``AffineMaskedWeightCPU`` its
eager CPU form, which keeps the float mask from the forward to the backward
(:func:`cpu_eager` says which one runs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["StraightThrough", "BinaryMaskedWeight", "TernaryMaskedWeight", "AffineMaskedWeight",
           "AffineMaskedWeightCPU", "cpu_eager"]


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


class StraightThrough(torch.autograd.Function):
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


class BinaryMaskedWeight(StraightThrough):
    @staticmethod
    def forward(weight, mask_real, threshold):
        # eq. 4: m = 1 where mask_real >= threshold; selecting is one pass, no product
        return torch.where(mask_real >= threshold, weight, 0.0)


class TernaryMaskedWeight(StraightThrough):
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


def cpu_eager(*tensors: torch.Tensor) -> bool:
    """True for plain CPU tensors outside torch.compile and torch.func transforms: there the
    affine scheme takes :class:`AffineMaskedWeightCPU`, which writes eq. 4 as a float mask
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
    in-place sum (for the CPU path of :func:`cpu_eager`)."""
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


class AffineMaskedWeight(torch.autograd.Function):
    """``W' = a W + b (M W) + c M + d`` with M the binary mask of eq. 4 and a, b, c, d the
    rows of one tensor (``abcd``, shape ``(4, *values)``: one tensor per layer, so autograd
    and the optimizer handle one tensor, not four). Backward: the straight-through estimator
    of eq. 7 applied to W', dE/d(mask_real) = dE/dW' * (b W + c), and the exact gradients of
    a, b, c, d (:func:`_abcd_grad`), stacked like ``abcd``. The frozen weight gets no gradient.

    This is the form for GPUs, compiled steps and torch.func transforms; CPU eager steps take
    :class:`AffineMaskedWeightCPU` (:meth:`AffineScheme.masked_weight` chooses). Written for
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


class AffineMaskedWeightCPU(torch.autograd.Function):
    """:class:`AffineMaskedWeight` for CPU eager steps (:func:`cpu_eager`): the same values
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
