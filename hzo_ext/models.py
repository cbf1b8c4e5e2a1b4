"""Models for the command, tests and benchmarks: chains of stages, and DeepZero's ResNet written as its
authors wrote it (traced by the estimators)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .stages import ResidualBlock


def residual_mlp(in_features: int, width: int, depth: int, num_classes: int) -> nn.Sequential:
    """Linear+GELU stem, ``depth`` residual Linear+GELU blocks, linear head: depth + 2 stages."""
    blocks = [ResidualBlock(nn.Sequential(nn.Linear(width, width), nn.GELU())) for _ in range(depth)]
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.GELU()), *blocks,
                         nn.Linear(width, num_classes))


def _conv_block(c_in: int, c_out: int, stride: int = 1, branch_scale: float = 1.0) -> nn.Sequential:
    """One stage: GELU(shortcut(x) + conv3x3(GELU(conv3x3(x)))), a strided 1x1 conv shortcut
    when the block changes shape. GELU, not ReLU: kinks bias finite differences."""
    branch = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GELU(), nn.Conv2d(c_out, c_out, 3, 1, 1))
    with torch.no_grad():
        branch[2].weight.mul_(branch_scale)  # no BatchNorm: keep the residual chain near unitary
    shortcut = nn.Conv2d(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None
    return nn.Sequential(ResidualBlock(branch, shortcut), nn.GELU())


def _head(width: int, num_classes: int) -> list[nn.Module]:
    """Two stages: global average pool + Flatten, then Linear. Split there, the pooled vector
    [C] is a stage boundary: the split before the pool is probed channelwise (H*W probes), the
    one before the Linear densely over C, and no split probes C*H*W coordinates."""
    return [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(width, num_classes)]


def digits_cnn(width: int = 8, num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """Small residual CNN for 8x8 digits ([N, 1, 8, 8]): conv stem, a residual block at 8x8, a
    strided residual block to 4x4 (1x1 strided shortcut), GAP+Flatten, Linear: 5 stages."""
    return nn.Sequential(nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1), nn.GELU()),
                         _conv_block(width, width, branch_scale=0.5),
                         _conv_block(width, 2 * width, stride=2, branch_scale=0.5),
                         *_head(2 * width, num_classes))


def resnet20_cifar(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> nn.Sequential:
    """ResNet-20-style for 32x32 ([N, 3, 32, 32]): conv stem, 3 groups of 3 residual blocks at
    widths w, 2w, 4w (the first block of groups 2 and 3 strided, 1x1 conv shortcut), GAP+Flatten
    and Linear: 12 stages, 19 convs + 2 shortcut convs + 1 linear. No BatchNorm (stages must treat
    samples independently; the residual branches are scaled down at init instead)."""
    stages = [nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1), nn.GELU())]
    c_in = width
    for group, c_out in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            stages.append(_conv_block(c_in, c_out, stride=2 if group > 0 and block == 0 else 1, branch_scale=0.3))
            c_in = c_out
    return nn.Sequential(*stages, *_head(c_in, num_classes))


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class DeepZeroBlock(nn.Module):
    """The CIFAR ResNet BasicBlock as DeepZero (after akamaster's pytorch_resnet_cifar10) writes
    it: BatchNorm, functional ReLU, an in-place residual add, the option-A shortcut (strided
    slicing and zero channel padding in a lambda)."""

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != planes:
            pad = planes // 4
            self.shortcut = _Lambda(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class DeepZeroResNet(nn.Module):
    """DeepZero's CIFAR ResNet (ResNet-20 for blocks=(3, 3, 3)), an ordinary nn.Module with a
    functional forward: the estimators trace it (hzo_ext.graph). Use it in eval mode (BatchNorm
    with running statistics: the samples stay independent)."""

    def __init__(self, blocks=(3, 3, 3), width: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, c_in = [], width
        for k, n in enumerate(blocks):
            planes = width * 2 ** k
            for b in range(n):
                layers.append(DeepZeroBlock(c_in, planes, 2 if k and b == 0 else 1))
                c_in = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        return self.linear(out)


ACTIVATIONS = {"linear": nn.Identity, "tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}
# gains keeping a plain chain's activations O(1) (Kaiming-style) and a residual chain near unitary
_GAIN = {"linear": 1.0, "tanh": 5 / 3, "gelu": math.sqrt(2), "relu": math.sqrt(2)}


def deep_mlp(depth: int, width: int, act: str = "gelu", residual: bool = False, din: int = 6, dout: int = 5,
        dtype=torch.float64, seed: int = 0, residual_scale: float = 0.5) -> nn.Sequential:
    """Linear(din, width), then `depth` hidden stages [Linear, act] (each a ResidualBlock when
    residual), then Linear(width, dout): depth + 2 stages."""
    g = torch.Generator().manual_seed(seed)
    stages = [nn.Linear(din, width)]
    for _ in range(depth):
        lin = nn.Linear(width, width)
        std = (residual_scale if residual else _GAIN[act]) / math.sqrt(width)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(width, width, generator=g) * std)
            lin.bias.copy_(torch.randn(width, generator=g) * 0.1)
        block = nn.Sequential(lin, ACTIVATIONS[act]())
        stages.append(ResidualBlock(block) if residual else block)
    stages.append(nn.Linear(width, dout))
    torch.manual_seed(seed)
    for s in (stages[0], stages[-1]):
        s.reset_parameters()
    return nn.Sequential(*stages).to(dtype)
