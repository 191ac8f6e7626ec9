"""Mask schemes: what a mask entry can be, and everything that follows from it.

A scheme owns, in one place:

- the hard threshold of eq. 4 (``binarize``) and the masked weight with its
  straight-through gradient (eq. 5-7), as an autograd Function that saves only tensors;
- the trained per-layer values it adds beside the mask (``extras``: none for ``binary``
  and ``ternary``; ``affine``'s four scalars, as one tensor), their initial values and the
  optimizer settings they train with by default;
- the inverse used when a mask is loaded (``set_real_values``: a ``mask_real`` that
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

from . import kernels
from .bits import pack_bits, unpack_bits
from .errors import UsageError

__all__ = ["MaskScheme", "BinaryScheme", "TernaryScheme", "AffineScheme", "SCHEMES", "get_scheme",
           "register_scheme", "scheme_names", "DEFAULT_SCHEME"]

DEFAULT_SCHEME = "binary"


class MaskScheme:
    """What a mask entry can be; see the module docstring. Subclass, then
    :func:`register_scheme` an instance."""

    name: str = ""
    summary: str = ""
    values: Tuple[int, ...] = ()
    bits: int = 1
    function = kernels.StraightThrough
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

    def set_real_values(self, mask_real: torch.Tensor, mask: torch.Tensor, threshold: float, scale: float) -> None:
        """Write into ``mask_real``, in place (no full-size temporaries: masks of VGG's fc6
        have 100 M entries), values that threshold back to ``mask``: on-entries at
        ``threshold + d``, off-entries at ``threshold - d`` with ``d = |scale - threshold|``
        (or 1e-3)."""
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
    function = kernels.BinaryMaskedWeight

    def binarize(self, mask_real, threshold):
        return (mask_real >= threshold).to(mask_real.dtype)

    def set_real_values(self, mask_real, mask, threshold, scale):
        d = _delta(threshold, scale)
        mask_real.fill_(threshold - d).masked_fill_(mask > 0, threshold + d)

    def pack(self, mask):
        return pack_bits(mask > 0)

    def unpack(self, packed, shape, dtype=torch.float32):
        return unpack_bits(packed, _numel(shape)).to(dtype).view(tuple(int(s) for s in shape))


class TernaryScheme(MaskScheme):
    name = "ternary"
    summary = "m in {-1, 0, 1} (cut-offs at +-threshold)"
    values = (-1, 0, 1)
    bits = 2
    function = kernels.TernaryMaskedWeight

    def binarize(self, mask_real, threshold):
        return (mask_real >= threshold).to(mask_real.dtype) - (mask_real <= -threshold).to(mask_real.dtype)

    def set_real_values(self, mask_real, mask, threshold, scale):
        torch.mul(mask.to(mask_real.dtype), threshold + _delta(threshold, scale), out=mask_real)

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
    function = kernels.AffineMaskedWeight
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
        self.summary = ("W' = a W + b (M W) + c M + d, binary M, real a-d per "
                        + ("output channel" if per_channel else "layer"))
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
        return "1 bit per masked weight + 4 floats per " + ("output channel" if self.per_channel else "layer")

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
        fn = kernels.AffineMaskedWeightCPU if kernels.cpu_eager(weight, mask_real, *extras) else self.function
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
