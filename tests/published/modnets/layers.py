"""Stand-in for the piggyback authors' ``modnets.layers``: conv and linear layers whose
frozen ``weight`` / ``bias`` are plain tensors (not parameters, so not in any state_dict),
with a real-valued ``mask_real`` parameter, ``info = {'threshold_fn', 'threshold'}`` and a
thresholder object. Binarizer: 1 where mask_real > threshold; Ternarizer: -1 below 0, 1
above the threshold, 0 between."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

DEFAULT_THRESHOLD = 5e-3


class Binarizer:
    def __init__(self, threshold=DEFAULT_THRESHOLD):
        self.threshold = threshold

    def __call__(self, x):
        return (x > self.threshold).to(x.dtype)


class Ternarizer:
    def __init__(self, threshold=DEFAULT_THRESHOLD):
        self.threshold = threshold

    def __call__(self, x):
        return (x > self.threshold).to(x.dtype) - (x < 0).to(x.dtype)


def _thresholder(kind, threshold):
    return Binarizer(threshold) if kind == "binarizer" else Ternarizer(threshold)


class ElementWiseConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, mask_scale=1e-2, threshold_fn="binarizer", threshold=None):
        super().__init__()
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = _pair(conv.kernel_size), _pair(conv.stride)
        self.padding, self.dilation = _pair(conv.padding), _pair(conv.dilation)
        self.transposed, self.output_padding, self.groups = False, _pair(0), conv.groups
        self.mask_scale, self.mask_init = mask_scale, "1s"
        self.info = {"threshold_fn": threshold_fn, "threshold": threshold}
        self.weight = conv.weight.detach().clone()
        if conv.bias is not None:
            self.bias = conv.bias.detach().clone()
        else:
            self.register_parameter("bias", None)
        self.mask_real = nn.Parameter(torch.full_like(self.weight, mask_scale))
        self.threshold_fn = _thresholder(threshold_fn, threshold)

    def forward(self, x):
        weight = self.threshold_fn(self.mask_real) * self.weight
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ElementWiseLinear(nn.Module):
    def __init__(self, linear: nn.Linear, mask_scale=1e-2, threshold_fn="binarizer", threshold=None):
        super().__init__()
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mask_scale, self.mask_init = mask_scale, "1s"
        self.info = {"threshold_fn": threshold_fn, "threshold": threshold}
        self.weight = linear.weight.detach().clone()
        self.bias = linear.bias.detach().clone()
        self.mask_real = nn.Parameter(torch.full_like(self.weight, mask_scale))
        self.threshold_fn = _thresholder(threshold_fn, threshold)

    def forward(self, x):
        return F.linear(x, self.threshold_fn(self.mask_real) * self.weight, self.bias)
