"""Small model builders shared by the estimator tests."""
from __future__ import annotations

import math

import torch
from torch import nn

import hzo_ext

ACTIVATIONS = {"linear": nn.Identity, "tanh": nn.Tanh, "gelu": nn.GELU}
# gains keeping a plain chain's activations O(1) (Kaiming-style) and a residual chain near unitary
_GAIN = {"linear": 1.0, "tanh": 5 / 3, "gelu": math.sqrt(2)}


def mlp(depth: int, width: int, act: str = "gelu", residual: bool = False, din: int = 6, dout: int = 5,
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
        stages.append(hzo_ext.ResidualBlock(block) if residual else block)
    stages.append(nn.Linear(width, dout))
    torch.manual_seed(seed)
    for s in (stages[0], stages[-1]):
        s.reset_parameters()
    return nn.Sequential(*stages).to(dtype)


def batch(n: int = 4, din: int = 6, dout: int = 5, dtype=torch.float64, seed: int = 1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, din, generator=g, dtype=dtype)
    y = torch.randint(0, dout, (n,), generator=g)
    return x.to(device), y.to(device)


def min_cosine(model, loss_fn, x, y, estimator) -> float:
    """Run estimator.backward on fresh grads and return the minimum per-stage cosine against
    float64 autograd."""
    ref = hzo_ext.reference_grads(model, loss_fn, x, y)
    model.zero_grad(set_to_none=True)
    estimator.backward(x, y)
    return min(hzo_ext.per_layer_cosine(model, hzo_ext.grads_of(model), ref))
