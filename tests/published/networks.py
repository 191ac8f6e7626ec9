"""Stand-in for the piggyback authors' ``networks``: a wrapper holding the shared part of a
torchvision network as ``shared`` (module numbering as the released masks use it), one
classifier per dataset and the active ``classifier``. ``masked=True`` swaps every conv (and
VGG's fc6/fc7) of ``shared`` for the ``modnets.layers`` masked layers, in place, so the
numbering does not change."""
from collections import OrderedDict

import torch.nn as nn
import torch.nn.functional as F
import torchvision

import modnets.layers as nl


class View(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.view(*self.shape)


def _mask_layers(module, threshold_fn, threshold):
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(module, name, nl.ElementWiseConv2d(child, threshold_fn=threshold_fn, threshold=threshold))
        elif isinstance(child, nn.Linear):
            setattr(module, name, nl.ElementWiseLinear(child, threshold_fn=threshold_fn, threshold=threshold))
        else:
            _mask_layers(child, threshold_fn, threshold)


class _Wrapper(nn.Module):
    FEATURES = 0

    def add_dataset(self, dataset, num_outputs):
        if dataset not in self.datasets:
            self.datasets.append(dataset)
            self.classifiers.append(nn.Linear(self.FEATURES, num_outputs))

    def set_dataset(self, dataset):
        self.classifier = self.classifiers[self.datasets.index(dataset)]

    def forward(self, x):
        x = self.shared(x)
        return self.classifier(x.view(x.size(0), -1))


def _build(self, net, shared, head, masked, threshold_fn, threshold):
    self.datasets, self.classifiers = ["imagenet"], nn.ModuleList([head])
    self.shared = shared
    if masked:
        _mask_layers(self.shared, threshold_fn, threshold)
    self.classifier = None


class ModifiedVGG16(_Wrapper):
    FEATURES = 4096
    ARCH = "vgg16"

    def __init__(self, state_dict=None, masked=False, threshold_fn="binarizer", threshold=None):
        super().__init__()
        net = getattr(torchvision.models, self.ARCH)()
        if state_dict is not None:
            net.load_state_dict(state_dict)
        c = net.classifier
        shared = nn.Sequential(*list(net.features.children()), View(-1, 25088), c[0], nn.ReLU(inplace=True),
                               nn.Dropout(), c[3], nn.ReLU(inplace=True), nn.Dropout())
        _build(self, net, shared, c[6], masked, threshold_fn, threshold)


class ModifiedVGG16BN(ModifiedVGG16):
    ARCH = "vgg16_bn"


class ModifiedResNet(_Wrapper):
    FEATURES = 2048

    def __init__(self, state_dict=None, masked=False, threshold_fn="binarizer", threshold=None):
        super().__init__()
        net = torchvision.models.resnet50()
        if state_dict is not None:
            net.load_state_dict(state_dict)
        shared = nn.Sequential(OrderedDict((n, m) for n, m in net.named_children() if n != "fc"))
        _build(self, net, shared, net.fc, masked, threshold_fn, threshold)


class ModifiedDenseNet(_Wrapper):
    FEATURES = 1024

    def __init__(self, state_dict=None, masked=False, threshold_fn="binarizer", threshold=None):
        super().__init__()
        net = torchvision.models.densenet121()
        if state_dict is not None:
            net.load_state_dict(state_dict)
        _build(self, net, net.features, net.classifier, masked, threshold_fn, threshold)

    def forward(self, x):
        features = self.shared(x)
        out = F.avg_pool2d(F.relu(features), kernel_size=7).view(features.size(0), -1)
        return self.classifier(out)
