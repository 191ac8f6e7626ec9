"""Mask schemes: what a mask entry can be, and everything that follows from it.

A scheme owns, in one place:

- the hard threshold of eq. 4 (``binarize``) and the masked weight ``W * m`` with its
  straight-through gradient (eq. 5-7), as an autograd Function that saves only tensors;
- the inverse used when a mask is loaded (``real_values``: a ``mask_real`` that
  thresholds back to a given mask);
- the storage: bits per entry, bit-packing and unpacking.

``binary`` (m in {0, 1}, the paper) and ``ternary`` (m in {-1, 0, 1}, cut-offs at
+-threshold) are defined here; a new scheme is one subclass registered in ``SCHEMES``.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

from .bits import pack_bits, unpack_bits
from .errors import UsageError

__all__ = ["MaskScheme", "BinaryScheme", "TernaryScheme", "SCHEMES", "get_scheme", "BINARY", "TERNARY"]


def _is_transformed(t: torch.Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and check(t))


class _StraightThrough(torch.autograd.Function):
    """Forward: ``weight * m(mask_real)``. Backward (eq. 5-7): the gradient of ``m`` is
    handed unchanged to ``mask_real``, so dE/d(mask_real) = dE/d(W*m) * W. The frozen
    weight gets no gradient. Only the weight tensor is saved; no module is touched."""

    generate_vmap_rule = True

    @staticmethod
    def mask(mask_real: torch.Tensor, threshold: float) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, mask_real, _ = inputs
        ctx.save_for_backward(weight)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        # The incoming gradient is the layer's fresh weight gradient, read by nothing else:
        # forming eq. 7 in it saves a weight-sized allocation per layer and step (103 M
        # values for VGG's fc6). Not when a higher-order graph is being built, nor under
        # torch.func transforms or torch.compile (which fuses the product anyway).
        if (torch.compiler.is_compiling() or torch.is_grad_enabled() or not grad_output.is_contiguous()
                or grad_output.shape != weight.shape or _is_transformed(grad_output)):
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


class MaskScheme:
    """What a mask entry can be; see the module docstring."""

    name: str = ""
    values: Tuple[int, ...] = ()
    bits: int = 1
    function = _StraightThrough

    def check_threshold(self, threshold: float) -> float:
        threshold = float(threshold)
        if not (threshold > 0 and threshold != float("inf")):
            raise UsageError(f"{self.name} masks need a finite threshold > 0, got {threshold}")
        return threshold

    def masked_weight(self, weight: torch.Tensor, mask_real: torch.Tensor, threshold: float) -> torch.Tensor:
        """``weight * m`` (eq. 4), differentiable with respect to ``mask_real`` (eq. 7)."""
        return self.function.apply(weight, mask_real, threshold)

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


BINARY = BinaryScheme()
TERNARY = TernaryScheme()
SCHEMES: Dict[str, MaskScheme] = {s.name: s for s in (BINARY, TERNARY)}


def get_scheme(name) -> MaskScheme:
    """The scheme called ``name`` (a scheme object is returned as it is)."""
    if isinstance(name, MaskScheme):
        return name
    if name not in SCHEMES:
        raise UsageError(f"unknown mask scheme {name!r}; valid: {', '.join(SCHEMES)}")
    return SCHEMES[name]
