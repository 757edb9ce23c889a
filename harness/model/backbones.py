"""Encoders: torchvision ResNet-18/50 (ImageNet or CIFAR stem), a small ResNet for CPU runs,
and the projection head (linear, or the v2 MLP). Any number of input channels."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from harness.model.batchnorm import SplitBatchNorm


class BasicBlock(nn.Module):
    """ResNet's basic block, built as torchvision's (same layers, names and construction order, so
    the same weights from a seed; tests/test_moco.py checks it against torchvision's). Kept here so
    that a run of the tiny ResNet never imports torchvision (~0.5 CPU-s in every trial process,
    measured on 2 cores)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """ResNet with one BasicBlock per stage (default 32-64-128 channels): minutes per run on 2 CPU
    cores. A stem stride of 2 runs the stages at half the image's resolution."""

    def __init__(self, in_channels: int, norm_layer, widths=(32, 64, 128), stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False),
                                  norm_layer(widths[0]), nn.ReLU(inplace=True))
        stages, inplanes = [], widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), norm_layer(planes))
            stages.append(BasicBlock(inplanes, planes, stride, down, norm_layer=norm_layer))
            inplanes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = inplanes

    def forward(self, x):
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


def _torchvision_resnet(arch: str, stem: str, in_channels: int, norm_layer) -> nn.Module:
    from torchvision.models import resnet18, resnet50

    net = {"resnet18": resnet18, "resnet50": resnet50}[arch](weights=None, norm_layer=norm_layer)
    if stem == "cifar":  # 3x3 conv1, stride 1, no max-pool (the CIFAR-10 Colab)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()  # the backbone's output is the pooled feature the probe evaluates
    return net


def build_backbone(arch: str, stem: str, in_channels: int, bn_splits: int = 1,
                   tiny_widths=(32, 64, 128), tiny_stem_stride: int = 1) -> nn.Module:
    norm_layer = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    if arch == "resnet_tiny":
        return TinyResNet(in_channels, norm_layer, tuple(tiny_widths), tiny_stem_stride)
    return _torchvision_resnet(arch, stem, in_channels, norm_layer)


class Encoder(nn.Module):
    """backbone -> head. `backbone` features are what kNN and the linear probe evaluate."""

    def __init__(self, backbone: nn.Module, dim: int, mlp: bool):
        super().__init__()
        self.backbone = backbone
        width = backbone.out_dim
        # v2 head: Linear-ReLU-Linear, hidden width = backbone width, no BN (Chen et al. 2020).
        self.head = (nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))
                     if mlp else nn.Linear(width, dim))

    def forward(self, x):
        return self.head(self.backbone(x))
