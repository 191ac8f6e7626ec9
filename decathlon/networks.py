"""Decathlon networks and their registry (what ``--arch`` names).

``wrn28_4`` is the paper's network: a stride-1 3x3 stem with 16 channels, three groups of
pre-activation basic blocks (64, 128, 256 channels) whose first block has stride 2 and a
1x1 projection shortcut, then BN-ReLU, average pooling over the 8x8 map of a 64x64 input
and a linear classifier ``fc``.  No conv has a bias: 5,839,280 conv and 7,200 BN
parameters are shared by every task.  Smaller members of the same family (``wrn10_1``,
...) exercise the same code in tests and the demo.

``resnet26`` is the ImageNet network the decathlon's published backbone files hold (the
residual adapters' network, reused by later decathlon methods): a stride-1 3x3 stem with
32 channels and BN (no ReLU after it), three stages of four post-activation basic blocks
(64, 128, 256 channels, stride 2 in each stage's first block) whose shortcut across a
change of size is 2x2 average pooling with zero channels appended, then BN-ReLU, global
average pooling and ``fc``.  The same network may carry residual adapters at its 3x3
convolutions (``adapters="series"``: ``y + conv1x1(BN(y))`` after the conv;
``"parallel"``: a 1x1 conv of the conv's input added to its output), as files of the
adapters' authors do; ``proj`` says which of a block's two convolutions have one (the stem
has one whenever the network does).  ``resnet8`` (one block per stage, 8 stem channels)
exercises the same code in tests.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UsageError

__all__ = ["WideResNet", "ResNet26", "Adapter", "MODELS", "register_model", "create_model", "model_names",
           "ADAPTER_KINDS", "family_of"]

ADAPTER_KINDS = ("series", "parallel")


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; the projection shortcut (when the shape changes) takes
    the pre-activated input, as in the original wide residual networks."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False)
                         if stride != 1 or in_ch != out_ch else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-width with stride 2 in the first block of every group."""

    def __init__(self, depth: int, width: int, num_classes: int, stem: int = 16):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise UsageError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        blocks = (depth - 4) // 6
        channels = [stem] + [c * width for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        for g in range(3):
            layers = [PreActBlock(channels[g] if b == 0 else channels[g + 1], channels[g + 1],
                                  2 if b == 0 else 1) for b in range(blocks)]
            self.add_module(f"layer{g + 1}", nn.Sequential(*layers))
        self.bn = nn.BatchNorm2d(channels[-1])
        self.fc = nn.Linear(channels[-1], num_classes)
        self.num_features = channels[-1]
        _init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Adapter(nn.Module):
    """A residual adapter of one 3x3 conv: ``series`` maps the conv's output y to
    ``y + conv1x1(BN(y))``; ``parallel`` adds ``conv1x1(x)`` of the conv's input x (same
    stride) to y."""

    def __init__(self, kind: str, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        if kind not in ADAPTER_KINDS:
            raise UsageError(f"adapter kind {kind!r}; expected one of {', '.join(ADAPTER_KINDS)}")
        self.kind = kind
        if kind == "series":
            self.bn = nn.BatchNorm2d(out_ch)
            self.conv = nn.Conv2d(out_ch, out_ch, 1, 1, 0, bias=False)
        else:
            self.conv = nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "series":
            return y + self.conv(self.bn(y))
        return y + self.conv(x)


class _Block26(nn.Module):
    """Post-activation basic block: conv-BN-ReLU, conv-BN, plus the shortcut, ReLU. A
    shortcut across a change of size is 2x2 average pooling with zero channels appended."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, adapters: Optional[str], proj: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.adapter1 = Adapter(adapters, in_ch, out_ch, stride) if adapters and proj[0] == "1" else None
        self.adapter2 = Adapter(adapters, out_ch, out_ch, 1) if adapters and proj[1] == "1" else None
        self.pool_shortcut = stride != 1 or in_ch != out_ch
        if self.pool_shortcut and (out_ch != 2 * in_ch or stride != 2):
            raise UsageError(f"a ResNet-26 block widens {in_ch} -> {out_ch} channels at stride {stride}; its "
                             f"shortcut needs twice the channels at stride 2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if self.adapter1 is not None:
            y = self.adapter1(x, y)
        y = F.relu(self.bn1(y))
        z = self.conv2(y)
        if self.adapter2 is not None:
            z = self.adapter2(y, z)
        z = self.bn2(z)
        if self.pool_shortcut:
            r = F.avg_pool2d(x, 2)
            x = torch.cat([r, torch.zeros_like(r)], 1)
        return F.relu(z + x)


class ResNet26(nn.Module):
    """The decathlon's ImageNet ResNet (see the module docstring); ``blocks`` per stage (4:
    ResNet-26), ``width`` stem channels (stages 2x, 4x, 8x), optional residual adapters."""

    def __init__(self, num_classes: int, blocks: int = 4, width: int = 32, adapters: Optional[str] = None,
                 proj: str = "11"):
        super().__init__()
        if blocks < 1 or width < 1:
            raise UsageError(f"ResNet-26 family: blocks and width must be >= 1, got {blocks}, {width}")
        if adapters is not None and adapters not in ADAPTER_KINDS:
            raise UsageError(f"adapters {adapters!r}; expected none or one of {', '.join(ADAPTER_KINDS)}")
        if len(proj) != 2 or set(proj) - {"0", "1"}:
            raise UsageError(f"proj {proj!r}: expected two of 0/1 (adapters at a block's first, second conv)")
        self.arch_options = {"width": width, "adapters": adapters, "proj": proj}
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.adapter1 = Adapter(adapters, 3, width, 1) if adapters else None
        self.bn1 = nn.BatchNorm2d(width)
        channels = [width, 2 * width, 4 * width, 8 * width]
        for s in range(3):
            layers = [_Block26(channels[s] if b == 0 else channels[s + 1], channels[s + 1], 2 if b == 0 else 1,
                               adapters, proj) for b in range(blocks)]
            self.add_module(f"layer{s + 1}", nn.Sequential(*layers))
        self.bn = nn.BatchNorm2d(channels[-1])
        self.fc = nn.Linear(channels[-1], num_classes)
        self.num_features = channels[-1]
        _init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if self.adapter1 is not None:
            y = self.adapter1(x, y)
        x = self.layer3(self.layer2(self.layer1(self.bn1(y))))
        x = F.relu(self.bn(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Register ``builder(num_classes, **options)`` under ``name``."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = builder


for _depth, _width in ((28, 4), (10, 1), (10, 2), (16, 1), (16, 2), (16, 4), (28, 1)):
    register_model(f"wrn{_depth}_{_width}", partial(WideResNet, _depth, _width))
register_model("resnet26", partial(ResNet26, blocks=4, width=32))
register_model("resnet8", partial(ResNet26, blocks=1, width=8))


def model_names() -> List[str]:
    """The registered architecture names, sorted (what ``--arch`` accepts)."""
    return sorted(MODELS)


def family_of(arch: Optional[str]) -> str:
    """``resnet26`` for the ResNet-26 family (its files, its preprocessing), else ``wrn``."""
    return "resnet26" if arch in ("resnet26", "resnet8") else "wrn"


def create_model(name: str, num_classes: int, **options) -> nn.Module:
    """A freshly initialised backbone ``name`` with a ``num_classes``-way classifier ``fc``;
    ``options`` (the ResNet-26 family's width and adapters) as a backbone file records them."""
    if name not in MODELS:
        raise UsageError(f"unknown architecture {name!r}; valid: {', '.join(model_names())}")
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    if options and family_of(name) != "resnet26":
        raise UsageError(f"architecture {name!r} takes no options, got {sorted(options)}")
    return MODELS[name](num_classes, **options)
