"""CGE, SPSA and Backprop: same interface as HZO, checked against autograd and exact counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hzo_ext
from _models import batch, min_cosine, mlp

CE = nn.CrossEntropyLoss
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth", [0, 1, 4, 9])
@pytest.mark.parametrize("act", ["tanh", "gelu"])
def test_cge_matches_autograd(act, depth, device):
    model = mlp(depth, 8, act, residual=depth > 4).to(device)
    x, y = batch(device=device)
    assert min_cosine(model, CE(), x, y, hzo_ext.CGE(model, CE())) >= 0.99999


@pytest.mark.parametrize("hidden", [0, 1, 2, 5, 14])
def test_cge_fd_layer_evals_exact(hidden):
    model = mlp(hidden, 8, "gelu", din=6, dout=5)
    x, y = batch()
    est = hzo_ext.CGE(model, CE())
    est.backward(x, y)
    L = hidden + 2
    widths = [6] + [8] * (L - 1) + [5]
    assert est.last_stats.fd_layer_evals == sum(2 * widths[l] * (L - l) for l in range(1, L))
    assert est.last_stats.loss_evals == 2 * 5 + sum(2 * widths[l] for l in range(1, L))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_cge_uniform_formula_and_hzo_saving(k):
    L, M = 2 ** k, 6
    model = nn.Sequential(*[nn.Sequential(nn.Linear(M, M), nn.Tanh()) for _ in range(L)]).double()
    x, y = torch.randn(2, M, dtype=torch.float64), torch.randint(0, M, (2,))
    cge, hzo = hzo_ext.CGE(model, CE()), hzo_ext.HZO(model, CE())
    cge.backward(x, y)
    hzo.backward(x, y)
    assert cge.last_stats.fd_layer_evals == M * L * (L - 1)
    assert hzo.last_stats.fd_layer_evals == M * L * k
    for p in model.parameters():  # both estimated the same gradient twice: close to 2x one of them
        assert p.grad is not None


def _small_problem():
    model = mlp(1, 4, "tanh", din=3, dout=3)
    x, y = batch(8, 3, 3)
    return model, x, y


def test_spsa_is_unbiased():
    """Mean of many seeded estimates -> the backprop gradient (cosine 1/sqrt(1 + P/N) expected)."""
    model, x, y = _small_problem()
    ref = hzo_ext.reference_grads(model, CE(), x, y)
    flat_ref = torch.cat([g.reshape(-1) for g in ref.values()])
    P = flat_ref.numel()

    def mean_estimate(num_seeds, samples):
        model.zero_grad(set_to_none=True)
        for seed in range(num_seeds):
            hzo_ext.SPSA(model, CE(), eps=1e-4, num_samples=samples, seed=seed).backward(x, y)
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]) / num_seeds

    def cos(v):
        return float(v @ flat_ref / (v.norm() * flat_ref.norm()))

    many = mean_estimate(10, 300)  # N = 3000 directions
    one = mean_estimate(1, 1)
    print(f"SPSA: P={P}, cosine of one estimate {cos(one):.3f}, of the mean of 3000 {cos(many):.4f}")
    assert cos(many) >= 0.97  # expected ~ 1/sqrt(1 + P/N) = 0.992
    assert (many.norm() / flat_ref.norm()).item() == pytest.approx(1.0, abs=0.1)  # unbiased in scale too
    assert cos(one) < 0.9  # one direction is far from it: the average matters


def test_spsa_reproducible_and_stats():
    model, x, y = _small_problem()
    grads = []
    for seed in (0, 0, 1):
        model.zero_grad(set_to_none=True)
        est = hzo_ext.SPSA(model, CE(), num_samples=3, seed=seed)
        loss = est.backward(x, y)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])
    torch.testing.assert_close(loss, CE()(model(x), y).detach())  # parameters restored exactly
    s = est.last_stats
    assert (s.fd_layer_evals, s.probes, s.loss_evals) == (2 * 3 * 3, 3, 6)


def test_backprop_baseline_is_autograd():
    model, x, y = _small_problem()
    loss = hzo_ext.Backprop(model, CE()).backward(x, y)
    got = hzo_ext.grads_of(model)
    model.zero_grad(set_to_none=True)
    expect = CE()(model(x), y)
    expect.backward()
    for k, g in hzo_ext.grads_of(model).items():
        torch.testing.assert_close(got[k], g)
    torch.testing.assert_close(loss, expect.detach())


@pytest.mark.parametrize("make", [lambda m: hzo_ext.CGE(m, CE(), eps=-1), lambda m: hzo_ext.SPSA(m, CE(), eps=0),
                                  lambda m: hzo_ext.SPSA(m, CE(), num_samples=0)])
def test_baselines_validate(make):
    with pytest.raises(ValueError):
        make(_small_problem()[0])
