"""Small model builders shared by the estimator tests."""
from __future__ import annotations

import torch
from torch import nn

import hzo_ext
from hzo_ext.models import ACTIVATIONS, deep_mlp as mlp  # noqa: F401  (shared with `hzo-ext cosine`)


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


# Stages the estimators must refuse (bad-input tests of the Python path and the C++ executor).
class MixSamples(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class TupleOut(nn.Module):
    def forward(self, x):
        return x, x


class Blowup(nn.Module):
    def forward(self, x):
        return torch.exp(1e4 * x)
