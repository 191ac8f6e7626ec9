"""Mixed precision and memory-format switches, and where batches run.

bf16 autocast needs no loss scaling (it has float32's exponent range), so one context
manager covers training and evaluation. Both switches are off on the CPU by default:
CPU runs are the reference for bit-exact resume tests. :class:`Precision` bundles the
device with both switches and moves batches there.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional, TypeVar, Union

import torch
import torch.nn as nn

from common.errors import UsageError

__all__ = ["autocast", "TRAIN_AMP_HELP", "default_amp", "default_channels_last", "maybe_channels_last",
           "Precision", "resolve_switch", "SWITCH_CHOICES"]

SWITCH_CHOICES = ("auto", "on", "off")

DeviceLike = Union[str, torch.device]
T = TypeVar("T", nn.Module, torch.Tensor)


def _device(device: DeviceLike) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def autocast(device: DeviceLike, enabled: bool,
             dtype: torch.dtype = torch.bfloat16) -> ContextManager:
    """``torch.autocast`` for ``device`` when ``enabled``, else a context that does nothing."""
    if not enabled:
        return contextlib.nullcontext()
    dev = _device(device)
    if dtype == torch.float16 and dev.type == "cpu":
        raise UsageError("float16 autocast is not supported on the CPU; use bfloat16")
    return torch.autocast(device_type=dev.type, dtype=dtype)


# --amp of every training command: mask training stays in fp32 unless asked.
TRAIN_AMP_HELP = ("bf16 autocast; auto = off: piggyback masks trained under bf16 reached 0.9 top-1 "
                  "points less on MNIST (MobileNetV2, mean of 3 seeds); on is faster on a GPU "
                  "(decathlon.train under CUDA graphs on an H100: 1.15x the images/s of fp32 at "
                  "batch 32, 1.63x at batch 128) (BENCHMARKS-gpu.md, 6d) (default: auto)")


def default_amp(device: DeviceLike) -> bool:
    """True where bf16 autocast helps: a CUDA device that supports bf16."""
    dev = _device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    with torch.cuda.device(dev.index if dev.index is not None else torch.cuda.current_device()):
        return bool(torch.cuda.is_bf16_supported())


def default_channels_last(device: DeviceLike) -> bool:
    """True on CUDA, where cuDNN's NHWC convolutions are faster with tensor cores."""
    return _device(device).type == "cuda"


def maybe_channels_last(obj: T, enabled: bool) -> T:
    """Convert a module or a 4-D tensor to channels_last when ``enabled``.

    Modules are converted in place (and returned); tensors that are not 4-D are
    returned unchanged, since the format only exists for NCHW data.
    """
    if not enabled:
        return obj
    if isinstance(obj, nn.Module):
        return obj.to(memory_format=torch.channels_last)
    if isinstance(obj, torch.Tensor):
        return obj.contiguous(memory_format=torch.channels_last) if obj.dim() == 4 else obj
    raise TypeError(f"maybe_channels_last expects an nn.Module or a tensor, "
                    f"got {type(obj).__name__}")


def resolve_switch(value: str, auto: bool) -> bool:
    """``auto|on|off`` of a command-line switch as a bool (``auto`` gives ``auto``)."""
    if value not in SWITCH_CHOICES:
        raise UsageError(f"expected one of {'|'.join(SWITCH_CHOICES)}, got {value!r}")
    return auto if value == "auto" else value == "on"


@dataclass(frozen=True)
class Precision:
    """Where and how batches run: device, bf16 autocast, channels_last."""

    device: torch.device
    amp: bool = False
    channels_last: bool = False

    def batch(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """``images`` (and ``targets``) on the device, images in the memory format."""
        images = maybe_channels_last(images.to(self.device, non_blocking=True), self.channels_last)
        if targets is None:
            return images
        return images, targets.to(self.device, non_blocking=True)

    def autocast(self) -> ContextManager:
        return autocast(self.device, self.amp)
