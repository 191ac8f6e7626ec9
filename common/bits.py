"""Bit packing of boolean tensors, on any device (the mask schemes in common.schemes use it).

Bit order matches ``numpy.packbits`` (most significant bit first), so packed masks can be
read back with numpy alone.
"""
from __future__ import annotations

import torch

_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Flatten a boolean tensor and pack it into ceil(n / 8) uint8 values."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = _WEIGHTS.to(flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a flat boolean tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed bits must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() * 8 < n or packed.numel() * 8 - n >= 8:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {n} bits")
    weights = _WEIGHTS.to(packed.device)
    return (packed.unsqueeze(1) & weights).ne(0).reshape(-1)[:n]
