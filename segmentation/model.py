"""FCN-32s on a VGG backbone: architecture registry, fc6/fc7 weight surgery, builder.

The network is assembled from torchvision's VGG definition (``make_layers`` and the
``VGG`` classifier layout), never from a forked model file:

* ``features``: torchvision's conv/pool stack with conv1_1 padded by 100 pixels and
  ceil-mode pooling, so every input size aligns with the stride-32 score map;
* ``fc6`` / ``fc7``: the classifier's first two linear layers re-expressed as a 7x7 and
  a 1x1 convolution by :func:`vgg_to_fcn_state_dict`, a pure state_dict function;
* ``score_fr``: new 1x1 convolution to the classes, zero-initialised;
* ``upscore``: new stride-32 transposed convolution initialised to bilinear
  interpolation (fixed unless asked to learn), cropped at offset 19 to the input size.

``ARCHS`` holds VGG-16 and a narrow VGG-like configuration with the same five-stage
geometry (so the same crop offset holds) for tests and the demo.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torchvision.models.vgg import VGG, cfgs, make_layers

from common.errors import UsageError, WeightsFileError

__all__ = [
    "VGGArch", "ARCHS", "NEW_LAYERS", "CROP_OFFSET", "get_arch", "build_vgg",
    "vgg_to_fcn_state_dict", "bilinear_kernel", "FCN32s", "build_fcn32s",
]

# Offset of the input's first pixel in the upsampled score map: conv1_1's padding of 100,
# the five ceil-mode pools and fc6's 7x7 valid convolution, as in the FCN reference.
CROP_OFFSET = 19
# Modules trained from scratch (not part of the pretrained backbone, never masked).
NEW_LAYERS = ("score_fr", "upscore")
CONV1_PADDING = 100


@dataclass(frozen=True)
class VGGArch:
    """A VGG-like backbone: torchvision ``make_layers`` config plus the fc width."""

    cfg: Tuple[Union[int, str], ...]
    fc_width: int
    imagenet_classes: int = 1000

    @property
    def last_channels(self) -> int:
        return [c for c in self.cfg if c != "M"][-1]


ARCHS: Dict[str, VGGArch] = {
    # torchvision's configuration "D" = VGG-16: 13 convs, fc6/fc7 of 4096.
    "vgg16": VGGArch(tuple(cfgs["D"]), 4096),
    # Same five stages, one narrow conv each and narrow fc layers: ~0.2 M parameters.
    "vgg-tiny": VGGArch((8, "M", 16, "M", 16, "M", 32, "M", 32, "M"), 64),
}


def get_arch(name: str) -> VGGArch:
    if name not in ARCHS:
        raise UsageError(f"unknown architecture {name!r}; valid names: {', '.join(sorted(ARCHS))}")
    return ARCHS[name]


def _init_vgg_(model: nn.Module) -> None:
    # torchvision VGG's convolution initialisation. Its fixed std of 0.01 for the linear
    # layers suits only 25088/4096-wide inputs (0.01 ~ sqrt(2/25088)); He initialisation
    # gives the same scale for VGG-16 and keeps narrow fc layers from vanishing.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)


def build_vgg(arch: Union[str, VGGArch], init: bool = True) -> VGG:
    """A torchvision ``VGG`` for ``arch`` (ImageNet layout and keys), randomly initialised
    when ``init`` (skip it when weights are loaded next).

    The ``VGG`` shell is created on the meta device (its classifier is hard-wired to
    4096-wide layers) and then given real ``features``/``classifier`` modules in
    torchvision's layout, so that state_dict keys match a torchvision checkpoint.
    """
    spec = get_arch(arch) if isinstance(arch, str) else arch
    with torch.device("meta"):
        model = VGG(nn.Identity(), num_classes=spec.imagenet_classes, init_weights=False)
    model.features = make_layers(list(spec.cfg))
    w = spec.fc_width
    model.classifier = nn.Sequential(
        nn.Linear(spec.last_channels * 7 * 7, w), nn.ReLU(True), nn.Dropout(),
        nn.Linear(w, w), nn.ReLU(True), nn.Dropout(),
        nn.Linear(w, spec.imagenet_classes),
    )
    if init:
        _init_vgg_(model)
    return model


def vgg_to_fcn_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map a torchvision-layout VGG state_dict onto FCN-32s keys (pure function).

    ``features.*`` pass through; ``classifier.0`` (fc6, out x C*7*7) becomes a 7x7
    convolution (out, C, 7, 7) and ``classifier.3`` (fc7) a 1x1 convolution;
    ``classifier.6`` (the ImageNet classifier) is dropped. The input is not modified.
    """
    required = ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise WeightsFileError(f"VGG state_dict lacks {missing}; expected torchvision's key layout "
                       f"(features.N.*, classifier.0/3/6.*)")
    out = {k: v for k, v in state_dict.items() if k.startswith("features.")}
    fc6, fc7 = state_dict["classifier.0.weight"], state_dict["classifier.3.weight"]
    if fc6.dim() != 2 or fc6.shape[1] % 49:
        raise WeightsFileError(f"classifier.0.weight has shape {tuple(fc6.shape)}; expected "
                         f"(out, channels*7*7) for a 7x7 fc6")
    # Linear input index is c*49 + y*7 + x (torch.flatten of C x 7 x 7), which is
    # exactly the row-major layout of a (out, C, 7, 7) convolution kernel.
    out["fc6.weight"] = fc6.reshape(fc6.shape[0], fc6.shape[1] // 49, 7, 7).clone()
    out["fc6.bias"] = state_dict["classifier.0.bias"].clone()
    out["fc7.weight"] = fc7.reshape(fc7.shape[0], fc7.shape[1], 1, 1).clone()
    out["fc7.bias"] = state_dict["classifier.3.bias"].clone()
    return out


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """Transposed-convolution weight (channels, channels, k, k) doing bilinear
    upsampling by k/2 per channel: channel i maps only to channel i."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float64) - center).abs() / factor
    kernel2d = (taps[:, None] * taps[None, :]).to(torch.float32)
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    idx = torch.arange(channels)
    weight[idx, idx] = kernel2d
    return weight


class FCN32s(nn.Module):
    """FCN-32s head on a VGG ``features`` stack; see the module docstring."""

    def __init__(self, features: nn.Sequential, in_channels: int, fc_width: int,
                 num_classes: int = 21, dropout: float = 0.5):
        super().__init__()
        self.features = features
        self.fc6 = nn.Conv2d(in_channels, fc_width, kernel_size=7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Conv2d(fc_width, fc_width, kernel_size=1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.score_fr = nn.Conv2d(fc_width, num_classes, kernel_size=1)
        self.upscore = nn.ConvTranspose2d(num_classes, num_classes, kernel_size=64, stride=32, bias=False)
        self.reset_new_layers()

    @torch.no_grad()
    def reset_new_layers(self) -> None:
        nn.init.zeros_(self.score_fr.weight)
        nn.init.zeros_(self.score_fr.bias)
        self.upscore.weight.copy_(bilinear_kernel(self.upscore.in_channels, self.upscore.kernel_size[0]))

    @property
    def num_classes(self) -> int:
        return self.score_fr.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = self.features(x)
        y = self.drop6(self.relu6(self.fc6(y)))
        y = self.drop7(self.relu7(self.fc7(y)))
        y = self.upscore(self.score_fr(y))
        return y[..., CROP_OFFSET:CROP_OFFSET + h, CROP_OFFSET:CROP_OFFSET + w].contiguous()


def _fcn_features(vgg_features: nn.Sequential) -> nn.Sequential:
    """torchvision's feature stack adapted for dense prediction (in place)."""
    convs = [m for m in vgg_features if isinstance(m, nn.Conv2d)]
    pools = [m for m in vgg_features if isinstance(m, nn.MaxPool2d)]
    if len(pools) != 5:
        raise UsageError(f"FCN-32s needs five pooling stages (stride 32), got {len(pools)}")
    convs[0].padding = (CONV1_PADDING, CONV1_PADDING)
    for pool in pools:
        pool.ceil_mode = True
    return vgg_features


def build_fcn32s(arch: Union[str, VGGArch] = "vgg16", num_classes: int = 21,
                 backbone_state: Optional[Dict[str, torch.Tensor]] = None,
                 learn_upsample: bool = False) -> FCN32s:
    """FCN-32s for ``arch`` with the backbone from ``backbone_state`` (a torchvision-layout
    VGG state_dict; ``None`` keeps torchvision's random initialisation).

    The VGG weights are converted by :func:`vgg_to_fcn_state_dict` and loaded with
    ``strict=False``; the only keys allowed to be missing are the new layers'.
    """
    spec = get_arch(arch) if isinstance(arch, str) else arch
    vgg = build_vgg(spec, init=backbone_state is None)
    if backbone_state is not None:
        # The ImageNet classifier (classifier.6) may be absent or of any size: it is dropped.
        own = {k: v.shape for k, v in vgg.state_dict().items() if not k.startswith("classifier.6.")}
        given = {k: v for k, v in backbone_state.items() if not k.startswith("classifier.6.")}
        missing = sorted(set(own) - set(given))
        unexpected = sorted(set(given) - set(own))
        shapes = [(k, tuple(given[k].shape), tuple(own[k])) for k in sorted(set(own) & set(given))
                  if given[k].shape != own[k]]
        if missing or unexpected or shapes:
            raise WeightsFileError(f"backbone weights do not fit architecture {arch!r}: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}, shape (given, expected) {shapes[:4]}")
        result = vgg.load_state_dict(given, strict=False)
        assert all(k.startswith("classifier.6.") for k in result.missing_keys), result.missing_keys
    model = FCN32s(_fcn_features(vgg.features), spec.last_channels, spec.fc_width, num_classes)
    converted = vgg_to_fcn_state_dict(vgg.state_dict())
    result = model.load_state_dict(converted, strict=False)
    expected_missing = {f"{name}.{p}" for name in NEW_LAYERS for p, _ in getattr(model, name).named_parameters()}
    assert set(result.missing_keys) == expected_missing, result.missing_keys
    assert not result.unexpected_keys, result.unexpected_keys
    model.upscore.weight.requires_grad_(learn_upsample)
    return model
