"""Models made of stages the estimators accept (a chain; residual blocks are one stage)."""
from __future__ import annotations

from torch import nn

from .stages import ResidualBlock


def residual_mlp(in_features: int, width: int, depth: int, num_classes: int) -> nn.Sequential:
    """Linear+GELU stem, ``depth`` residual Linear+GELU blocks, linear head: depth + 2 stages."""
    blocks = [ResidualBlock(nn.Sequential(nn.Linear(width, width), nn.GELU())) for _ in range(depth)]
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.GELU()), *blocks,
                         nn.Linear(width, num_classes))
