"""BlackBox stages: zeroth-order leaves for non-differentiable stages autograd cannot train."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hzo_ext
from _models import batch

CE = nn.CrossEntropyLoss


class QuantizedReadout(nn.Linear):
    """A readout device with an ADC: the output is rounded to multiples of ``step``.
    torch.round has derivative 0, so autograd sees a constant: zero gradients everywhere."""

    def __init__(self, din, dout, step):
        super().__init__(din, dout)
        self.step = step

    def forward(self, x):
        return torch.round(super().forward(x) / self.step) * self.step


class NumpyLinear(nn.Linear):
    """A 'simulated device' computed outside torch: autograd has no graph through it at all."""

    def forward(self, x):
        w, b = self.weight.detach().cpu().numpy(), self.bias.detach().cpu().numpy()
        return torch.from_numpy(x.detach().cpu().numpy() @ w.T + b).to(x)


def test_blackbox_leaf_matches_autograd_of_the_same_math():
    torch.manual_seed(0)
    dev = NumpyLinear(8, 8)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), hzo_ext.BlackBox(dev), nn.Tanh(), nn.Linear(8, 5)).double()
    twin = nn.Sequential(model[0], model[1], nn.Linear(8, 8), model[3], model[4]).double()
    twin[2].load_state_dict(dev.state_dict())  # the differentiable twin of the device
    x, y = batch()
    ref = hzo_ext.reference_grads(twin, CE(), x, y)
    hzo_ext.Backprop(model, CE()).backward(x, y)
    assert model[0].weight.grad is None and dev.weight.grad is None  # autograd cannot see through it
    model.zero_grad(set_to_none=True)
    est = hzo_ext.HZO(model, CE(), eps=1e-5)
    est.backward(x, y)
    assert est.last_stats.blackbox_evals == 2 * (8 * 8 + 8)
    got = list(hzo_ext.grads_of(model).values())  # same parameter order as the twin
    assert min(hzo_ext.per_layer_cosine(model, got, list(ref.values()))) >= 0.99999
    torch.testing.assert_close(dev.weight.grad, ref["2.weight"], rtol=1e-6, atol=1e-9)


def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)


@pytest.mark.parametrize("kind", ["backprop", "hzo"])
def test_quantized_readout_trains_only_with_hzo(kind):
    X, Y = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), hzo_ext.BlackBox(QuantizedReadout(32, 10, 1 / 16), eps=0.05))
    est = hzo_ext.HZO(model, CE(), eps=0.05) if kind == "hzo" else hzo_ext.Backprop(model, CE())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        acc0, loss0 = (model(X).argmax(1) == Y).float().mean().item(), CE()(model(X), Y).item()
    for step in range(50):
        idx = torch.randint(0, len(X), (64,), generator=g)
        opt.zero_grad()
        est.backward(X[idx], Y[idx])
        if step == 0 and kind == "backprop":
            assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        opt.step()
    with torch.no_grad():
        acc, loss = (model(X).argmax(1) == Y).float().mean().item(), CE()(model(X), Y).item()
    print(f"quantized readout, {kind}: accuracy {acc0:.3f} -> {acc:.3f}, loss {loss0:.3f} -> {loss:.3f}")
    if kind == "backprop":
        assert acc == acc0 and loss == loss0  # zero gradients: nothing moves
    else:
        assert acc >= 0.85 and loss <= 0.5 * loss0
