"""Stand-in for the residual adapters' ``models`` module: a ResNet-26 whose module names and
attributes are those the published ``.t7`` files pickle (``pre_layers_conv``, ``conv_task``
units with ``conv`` and per-task ``bns`` / ``parallel_conv``, ``conv2`` as ReLU + unit,
``end_bns``, ``linears``), and whose forward computes what the published definition
computes. Used by the tests to write files in the real layout; never imported by the
toolkit."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import config_task


class conv1x1(nn.Module):
    """The adapter's 1x1 conv: BN + conv + identity in series mode, a strided conv in
    parallel mode."""

    def __init__(self, planes, out_planes=None, stride=1):
        super().__init__()
        if config_task.mode == "series_adapters":
            self.conv = nn.Sequential(nn.BatchNorm2d(planes), nn.Conv2d(planes, planes, 1, bias=False))
        elif config_task.mode == "parallel_adapters":
            self.conv = nn.Conv2d(planes, out_planes, 1, stride, bias=False)
        else:
            self.conv = nn.Conv2d(planes, planes, 1, bias=False)

    def forward(self, x):
        out = self.conv(x)
        if config_task.mode == "series_adapters":
            out = out + x
        return out


class conv_task(nn.Module):
    def __init__(self, in_planes, planes, stride=1, nb_tasks=1, is_proj=1, second=0):
        super().__init__()
        self.is_proj, self.second = is_proj, second
        self.conv = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        if config_task.mode == "series_adapters" and is_proj:
            self.bns = nn.ModuleList([nn.Sequential(conv1x1(planes), nn.BatchNorm2d(planes))
                                      for _ in range(nb_tasks)])
        elif config_task.mode == "parallel_adapters" and is_proj:
            self.parallel_conv = nn.ModuleList([conv1x1(in_planes, planes, stride) for _ in range(nb_tasks)])
            self.bns = nn.ModuleList([nn.BatchNorm2d(planes) for _ in range(nb_tasks)])
        else:
            self.bns = nn.ModuleList([nn.BatchNorm2d(planes) for _ in range(nb_tasks)])

    def forward(self, x):
        t = config_task.task
        out = self.conv(x)
        if config_task.mode == "parallel_adapters" and self.is_proj:
            out = out + self.parallel_conv[t](x)
        return self.bns[t](out)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, shortcut=0, nb_tasks=1):
        super().__init__()
        self.conv1 = conv_task(in_planes, planes, stride, nb_tasks, is_proj=int(config_task.proj[0]))
        self.conv2 = nn.Sequential(nn.ReLU(True), conv_task(planes, planes, 1, nb_tasks,
                                                            is_proj=int(config_task.proj[1]), second=1))
        self.shortcut = shortcut
        if shortcut:
            self.avgpool = nn.AvgPool2d(2)

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        res = x
        if self.shortcut:
            res = self.avgpool(x)
            res = torch.cat((res, res * 0), 1)
        return F.relu(out + res)


class ResNet(nn.Module):
    def __init__(self, block, nblocks, num_classes=(10,)):
        super().__init__()
        nb_tasks = len(num_classes)
        factor = config_task.factor
        self.in_planes = int(32 * factor)
        self.pre_layers_conv = conv_task(3, int(32 * factor), 1, nb_tasks)
        self.layer1 = self._make_layer(block, int(64 * factor), nblocks[0], 2, nb_tasks)
        self.layer2 = self._make_layer(block, int(128 * factor), nblocks[1], 2, nb_tasks)
        self.layer3 = self._make_layer(block, int(256 * factor), nblocks[2], 2, nb_tasks)
        self.end_bns = nn.ModuleList([nn.Sequential(nn.BatchNorm2d(int(256 * factor)), nn.ReLU(True))
                                      for _ in range(nb_tasks)])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linears = nn.ModuleList([nn.Linear(int(256 * factor), n) for n in num_classes])

    def _make_layer(self, block, planes, nblocks, stride, nb_tasks):
        shortcut = int(stride != 1 or self.in_planes != planes)
        layers = [block(self.in_planes, planes, stride, shortcut, nb_tasks=nb_tasks)]
        self.in_planes = planes
        layers += [block(planes, planes, nb_tasks=nb_tasks) for _ in range(1, nblocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        t = config_task.task
        x = self.layer3(self.layer2(self.layer1(self.pre_layers_conv(x))))
        x = self.avgpool(self.end_bns[t](x))
        return self.linears[t](x.view(x.size(0), -1))


def resnet26(num_classes=(10,), blocks=BasicBlock):
    return ResNet(blocks, [4, 4, 4], num_classes)
