"""Small model builders shared by the estimator tests."""
from __future__ import annotations

import torch
from torch import nn

import hzo_ext
from hzo_ext.models import ACTIVATIONS, deep_mlp as mlp  # noqa: F401  (shared with `hzo-ext cosine`)


def _per_sample_mse(z, y):
    return ((z - y) ** 2).sum(1)


# Losses the estimators must reduce as torch does: (factory, kind of target: class ids,
# class probabilities, dense). SmoothL1 and the plain callable run through the Python
# per-sample loss in the C++ executor.
LOSSES = [
    (lambda: nn.CrossEntropyLoss(), "class"),
    (lambda: nn.CrossEntropyLoss(reduction="sum"), "class"),
    (lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)), "class"),
    (lambda: nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.1), "class"),
    (lambda: nn.CrossEntropyLoss(), "probs"),
    (lambda: nn.MSELoss(), "dense"),
    (lambda: nn.MSELoss(reduction="sum"), "dense"),
    (lambda: nn.SmoothL1Loss(), "dense"),
    (lambda: _per_sample_mse, "dense"),
]


def loss_targets(kind: str, y: torch.Tensor, outputs: int = 5) -> torch.Tensor:
    """Targets of a LOSSES kind for a batch whose class ids are y."""
    if kind == "class":
        return y
    dense = torch.randn(len(y), outputs, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return dense.softmax(1) if kind == "probs" else dense


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
