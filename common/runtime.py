"""The one resolver of ``auto``: what ``--compile``, ``--amp`` and ``--channels-last`` become
on the device a run has, given what ``auto`` means for its pipeline.

A pipeline states its defaults once, as an :class:`AutoPolicy` (and in words in its
configuration's ``AUTO``); :func:`resolve_runtime` turns a configuration's switches into a
:class:`Runtime`: the device with its precision and memory format, and the compile mode
(``False``, ``True`` for torch.compile's default mode, or ``"reduce-overhead"`` for CUDA
graphs). On a CUDA device it also enables TF32 matrix units, and cuDNN's autotuner where
the pipeline's inputs keep one size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from common.amp import Precision, resolve_switch
from common.distributed import DistInfo
from common.errors import UsageError

__all__ = ["AutoPolicy", "Runtime", "resolve_runtime", "resolve_compile"]

CompileMode = Union[bool, str]


@dataclass(frozen=True)
class AutoPolicy:
    """What ``auto`` means for a pipeline: the compile mode on one CUDA process and across
    several (off on the CPU), channels_last (``cuda``: on any CUDA device; ``compiled``: where
    the network is compiled on one; ``never``), bf16 autocast (off: masks trained under it
    lost accuracy on real images), whether inputs keep one size (cuDNN autotuning) and
    whether the network is compiled for varying input sizes."""

    compile_cuda: CompileMode = True
    compile_distributed: CompileMode = True
    channels_last: str = "cuda"
    amp: bool = False
    fixed_input_size: bool = True
    dynamic_shapes: bool = False


@dataclass(frozen=True)
class Runtime:
    prec: Precision
    compile: CompileMode
    dynamic: bool

    @property
    def device(self) -> torch.device:
        return self.prec.device


def resolve_compile(value: str, dist: DistInfo, policy: AutoPolicy) -> CompileMode:
    """``--compile auto|on|off|cudagraphs`` as a compile mode."""
    if value == "cudagraphs":
        return "reduce-overhead"
    if value == "auto":
        if dist.device.type != "cuda":
            return False
        return policy.compile_cuda if dist.world_size == 1 else policy.compile_distributed
    if value not in ("on", "off"):
        raise UsageError(f"--compile {value!r}: expected one of auto, on, off, cudagraphs")
    return value == "on"


def resolve_runtime(cfg, dist: DistInfo, policy: AutoPolicy) -> Runtime:
    """The device, precision, memory format and compile mode of a run (see the module
    docstring); ``cfg`` has ``compile``, ``amp`` and ``channels_last``."""
    cuda = dist.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = policy.fixed_input_size
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
    mode = resolve_compile(cfg.compile, dist, policy)
    channels_last = {"cuda": cuda, "compiled": cuda and bool(mode), "never": False}[policy.channels_last]
    prec = Precision(dist.device, resolve_switch(cfg.amp, policy.amp), resolve_switch(cfg.channels_last, channels_last))
    return Runtime(prec, mode, policy.dynamic_shapes)
