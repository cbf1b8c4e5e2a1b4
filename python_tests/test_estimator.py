"""HZO against float64 autograd, exact query counts, the plan, options and bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hzo_ext
from _models import LOSSES, Blowup, MixSamples, TupleOut, batch, loss_targets, min_cosine, mlp

DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))
CE = nn.CrossEntropyLoss


# ---- accuracy: per-stage cosine against float64 autograd --------------------------------------

@pytest.mark.parametrize("split", ["bisect", "chain"])
@pytest.mark.parametrize("depth", [1, 2, 3, 5, 8, 13, 64])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("act", ["linear", "tanh", "gelu"])
def test_float64_cosine(act, residual, depth, split):
    model = mlp(depth, 8, act, residual)
    x, y = batch()
    assert min_cosine(model, CE(), x, y, hzo_ext.HZO(model, CE(), split=split)) >= 0.99999


@pytest.mark.parametrize("device", DEVICES)
def test_float64_cosine_device(device):
    model = mlp(9, 16, "gelu", residual=True).to(device)
    x, y = batch(device=device)
    assert min_cosine(model, CE(), x, y, hzo_ext.HZO(model, CE())) >= 0.99999


@pytest.mark.parametrize("split", ["bisect", "chain"])
def test_float32_residual_depth64(split):
    # near the unitary limit (residual branch gain 0.25): absolute eps 1e-3 is enough
    model = mlp(64, 128, "gelu", residual=True, din=16, dout=10, dtype=torch.float32, residual_scale=0.25)
    x, y = batch(8, 16, 10, dtype=torch.float32)
    assert min_cosine(model, CE(), x, y, hzo_ext.HZO(model, CE(), eps=1e-3, split=split)) >= 0.999


@pytest.mark.parametrize("split", ["bisect", "chain"])
def test_float32_residual_depth64_growing_activations_relative_eps(split):
    # branch gain 0.5: activations grow ~100x over 64 blocks, so an absolute eps of 1e-3 drowns
    # in float32 round-off of the upper stages; eps relative to rms(a_m) keeps every layer
    model = mlp(64, 128, "gelu", residual=True, din=16, dout=10, dtype=torch.float32, residual_scale=0.5)
    x, y = batch(8, 16, 10, dtype=torch.float32)
    est = hzo_ext.HZO(model, CE(), eps=1e-3, split=split, eps_mode="relative")
    assert min_cosine(model, CE(), x, y, est) >= 0.999


def _plain_gelu64():
    model = mlp(64, 128, "gelu", residual=False, din=16, dout=10, dtype=torch.float32)
    return model, *batch(8, 16, 10, dtype=torch.float32)


def test_float32_plain_gelu_depth64_chain():
    model, x, y = _plain_gelu64()
    assert min_cosine(model, CE(), x, y, hzo_ext.HZO(model, CE(), split="chain")) >= 0.999


def test_float32_plain_gelu_depth64_bisect_with_float64_queries():
    # bisect's long right halves lose float32 (docs/estimator.md); float64 queries restore it
    model, x, y = _plain_gelu64()
    est = hzo_ext.HZO(model, CE(), split="bisect", query_dtype=torch.float64)
    assert min_cosine(model, CE(), x, y, est) >= 0.999
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("split", ["bisect", "chain"])
def test_relative_eps(split):
    model = mlp(12, 16, "tanh", residual=False)
    with torch.no_grad():  # activations of scale ~100: an absolute eps would be tiny relative to them
        model[0].weight.mul_(100)
    x, y = batch()
    est = hzo_ext.HZO(model, CE(), eps=1e-4, split=split, eps_mode="relative")
    assert min_cosine(model, CE(), x, y, est) >= 0.99999


# ---- losses: any reduction, class weights, callables ------------------------------------------

@pytest.mark.parametrize("make_loss,kind", LOSSES)
def test_loss_reductions_match_autograd(make_loss, kind):
    model = mlp(4, 8, "tanh", residual=True)
    x, y = batch(6)
    y = loss_targets(kind, y)
    loss_fn = make_loss()
    ref = hzo_ext.reference_grads(model, loss_fn, x, y)
    loss = hzo_ext.HZO(model, loss_fn).backward(x, y)
    got = hzo_ext.grads_of(model)
    assert min(hzo_ext.per_layer_cosine(model, got, ref)) >= 0.99999
    for k in ref:  # the scale too (1/B, 1/sum of weights, ...), up to the O(eps^2) truncation
        assert (got[k] - ref[k]).norm() <= 1e-4 * ref[k].norm()
    expect = loss_fn(model(x), y) if isinstance(loss_fn, nn.Module) else loss_fn(model(x), y).mean()
    torch.testing.assert_close(loss, expect.detach())
    assert loss.dim() == 0


# found by hostile testing: a broadcast target gave exactly 2x the gradient (reduction='sum'), an
# all-ignored batch and a [B] output failed with messages naming something else
@pytest.mark.parametrize("split", ["auto", "bisect"])
def test_loss_inputs_that_cannot_be_split_per_sample_are_refused(split):
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    for loss_fn in (nn.MSELoss(reduction="sum"), nn.L1Loss()):
        with pytest.raises(ValueError, match=r"y of shape \(4,\) broadcasts against the model's output \(4, 1\) "
                                             r"to \(4, 4\)"):
            hzo_ext.HZO(model, loss_fn, split=split).backward(x, y)
    hzo_ext.HZO(model, nn.MSELoss(reduction="sum"), split=split).backward(x, y[:, None])  # [B, 1]: fine
    with pytest.warns(UserWarning, match="target size"):  # torch's own warning; within each sample: fine
        hzo_ext.HZO(model, nn.MSELoss(), split=split).backward(x, torch.randn(4, 3, dtype=torch.float64))
    classifier = nn.Sequential(nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="the loss \\(CrossEntropyLoss\\) is nan .*every target ignore_index"):
        hzo_ext.HZO(classifier, CE(ignore_index=-1), split=split).backward(x, torch.full((4,), -1))
    flat = nn.Sequential(nn.Linear(5, 1), nn.Flatten(0)).double()
    with pytest.raises(ValueError, match=r"shape \(4,\); .*feature dimension"):
        hzo_ext.HZO(flat, nn.MSELoss(), split=split).backward(x, y)


# ---- exact query counts ------------------------------------------------------------------------

def _exact_queries(widths, policy, i, j):
    """2K(j-m) per split, K = width of a_m, summed over the tree (the definition)."""
    if j - i < 2:
        return 0
    m = {"bisect": j - (j - i) // 2, "chain": j - 1}[policy] if isinstance(policy, str) else policy(i, j)
    return 2 * widths[m] * (j - m) + _exact_queries(widths, policy, i, m) + _exact_queries(widths, policy, m, j)


def _first_third(i, j):
    return i + max(1, (j - i) // 3)


@pytest.mark.parametrize("policy", ["bisect", "chain", _first_third])
@pytest.mark.parametrize("hidden", [0, 1, 2, 3, 6, 14, 30, 62])
def test_fd_layer_evals_exact(policy, hidden):
    model = mlp(hidden, 8, "gelu", din=6, dout=5)
    x, y = batch()
    est = hzo_ext.HZO(model, CE(), split=policy)
    plan = est.plan(x)
    est.backward(x, y)
    L = hidden + 2
    widths = [6] + [8] * (L - 1) + [5]
    assert est.last_stats.fd_layer_evals == plan.fd_layer_evals == _exact_queries(widths, policy, 0, L)
    assert est.last_stats.loss_evals == 2 * 5
    assert est.last_stats.probes == plan.probes == sum(s.probes for s in plan.splits)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_fd_layer_evals_uniform_formulas(k):
    L, M = 2 ** k, 8
    model = nn.Sequential(*[nn.Sequential(nn.Linear(M, M), nn.Tanh()) for _ in range(L)]).double()
    x, y = torch.randn(3, M, dtype=torch.float64), torch.randint(0, M, (3,))
    for policy, expect in (("bisect", M * L * k), ("chain", 2 * M * (L - 1))):
        est = hzo_ext.HZO(model, CE(), split=policy)
        est.backward(x, y)
        assert est.last_stats.fd_layer_evals == expect


# ---- the plan ----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["bisect", "chain"])
def test_plan_levels_are_independent_and_cover(policy):
    L = 11
    plan = hzo_ext.build_plan([(4,)] * (L + 1), batch=2, policy=policy)
    known = {L}
    for level in plan.levels:
        for s in level:  # a split needs delta_j from an earlier level only
            assert s.j in known and s.i < s.m < s.j
        known |= {s.m for s in level}
    assert known == set(range(1, L + 1))  # every stage gets its target
    text = str(plan)
    assert "level 0" in text and f"{plan.fd_layer_evals} fd_layer_evals" in text
    assert len(plan.levels) == (math.ceil(math.log2(L)) if policy == "bisect" else L - 1)


def test_plan_before_running_and_chunk_memory():
    model = mlp(6, 16, "gelu")
    x, _ = batch(4)
    full = hzo_ext.HZO(model, CE(), split="bisect").plan(x)
    chunked = hzo_ext.HZO(model, CE(), chunk_size=4, split="bisect").plan(x)
    assert all(p.grad is None for p in model.parameters())
    assert chunked.fd_layer_evals == full.fd_layer_evals
    assert max(s.chunks for s in chunked.splits) == 4  # 16 probes, 4 at a time
    assert chunked.peak_query_bytes * 4 == full.peak_query_bytes
    # bytes: 2 c B rows of float64 times (a_m + the largest in+out pair of a right stage)
    assert chunked.peak_query_bytes == 8 * 2 * 4 * 4 * (16 + 32)


def test_chunk_size_bounds_query_rows_and_keeps_result():
    model = mlp(7, 16, "gelu", residual=True)
    x, y = batch(3)
    hzo_ext.HZO(model, CE(), split="bisect").backward(x, y)
    whole = hzo_ext.grads_of(model)
    model.zero_grad(set_to_none=True)
    rows = []
    hooks = [s.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0])) for s in model]
    hzo_ext.HZO(model, CE(), chunk_size=5, split="bisect").backward(x, y)
    for h in hooks:
        h.remove()
    assert max(rows) == 2 * 5 * 3
    for k, g in hzo_ext.grads_of(model).items():
        torch.testing.assert_close(g, whole[k], rtol=1e-10, atol=1e-13)


# ---- autograd-like behaviour -------------------------------------------------------------------

def test_accumulates_and_skips_frozen_params():
    model = mlp(3, 8, "tanh")
    model[1][0].weight.requires_grad_(False)
    x, y = batch()
    est = hzo_ext.HZO(model, CE())
    est.backward(x, y)
    once = hzo_ext.grads_of(model)
    est.backward(x, y)
    assert model[1][0].weight.grad is None
    for k, g in hzo_ext.grads_of(model).items():
        if g is not None:
            torch.testing.assert_close(g, 2 * once[k])
    s = est.last_stats
    assert s.seconds > 0 and s.fd_layer_evals > 0
    assert (s.forward_calls > 0) == (est.executor == "python")  # the C++ executor calls no Python stage


def test_list_of_modules_model():
    model = mlp(4, 8, "gelu", residual=True)
    stages = list(model)
    x, y = batch()
    ref = hzo_ext.reference_grads(model, CE(), x, y)
    hzo_ext.HZO(stages, CE()).backward(x, y)
    assert min(hzo_ext.per_layer_cosine(stages, hzo_ext.grads_of(stages), ref)) >= 0.99999


def test_per_layer_cosine_is_scale_free():
    model = nn.Sequential(nn.Linear(1, 2, bias=False), nn.Tanh(), nn.Linear(2, 1, bias=False))
    tiny = [torch.tensor([[3e-12], [-1e-12]]), torch.tensor([[1.0, 2.0]])]
    other = [tiny[0] * 1e-5, torch.tensor([[2.0, -1.0]])]
    cos = hzo_ext.per_layer_cosine(model, tiny, other)
    assert cos[0] == pytest.approx(1.0, abs=1e-12) and cos[1] == pytest.approx(0.0, abs=1e-12)
    assert hzo_ext.per_layer_cosine(model, tiny, [-tiny[0], tiny[1]])[0] == pytest.approx(-1.0, abs=1e-12)
    # what the metric must not do: F.cosine_similarity reads these tiny parallel vectors as ~0
    assert torch.nn.functional.cosine_similarity(tiny[0].reshape(-1), other[0].reshape(-1), dim=0) < 0.5


# ---- bad input ---------------------------------------------------------------------------------

class _NotAChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)

    def forward(self, x):
        return self.a(x) + x


@pytest.mark.parametrize("eps", [0.0, -1e-3, float("nan"), float("inf"), "1e-3"])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        hzo_ext.HZO(mlp(1, 4), CE(), eps=eps)


@pytest.mark.parametrize("stage,message", [
    (nn.BatchNorm1d(8), "stage 3 \\(BatchNorm1d\\).*training mode mixes"),
    (nn.Dropout(0.2), "stage 3 \\(Dropout\\).*training mode"),
    (MixSamples(), "(stage 3 \\(MixSamples\\)|op \\d+ \\(.*\\)) mixes samples"),
    (nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), "stage 3 \\(Sequential\\), submodule '1'"),
])
def test_refuses_sample_mixing(stage, message):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), stage, nn.Linear(8, 5)).double()
    x, y = batch()
    with pytest.raises(ValueError, match=message):
        hzo_ext.HZO(model, CE()).backward(x, y)


def test_eval_mode_batchnorm_is_fine():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 5)).double()
    model[1].eval()
    x, y = batch()
    assert min_cosine(model, CE(), x, y, hzo_ext.HZO(model, CE())) >= 0.99999


def test_refuses_non_modules_and_non_tensor_stages():
    assert len(hzo_ext.HZO(_NotAChain(), CE()).stages) == 1  # traced: x + a(x) is one stage
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        hzo_ext.HZO("not a model", CE())
    model = nn.Sequential(nn.Linear(6, 5), TupleOut(), nn.Linear(5, 5)).double()
    with pytest.raises(TypeError, match="stage 2 \\(TupleOut\\) returned a tuple"):
        hzo_ext.HZO(model, CE(), split="bisect").backward(*batch())
    with pytest.raises(ValueError, match=r"op \d \(2: Linear\) failed on an input of shape"):
        hzo_ext.HZO(model, CE()).backward(*batch())


def test_bad_shapes_and_dtypes():
    model = mlp(2, 8)
    x, y = batch()
    est = hzo_ext.HZO(model, CE())
    with pytest.raises(TypeError, match="float32.*float64"):
        est.backward(x.float(), y)
    with pytest.raises(ValueError, match="batch size"):
        est.backward(x, y[:3])
    with pytest.raises(ValueError, match=r"op 1 \(0: Linear\) failed on an input of shape \(4, 7\)"):
        est.backward(torch.randn(4, 7, dtype=torch.float64), y)
    with pytest.raises(ValueError, match=r"op 1 \(0: Linear\) failed on an input of shape \(4, 6\) and dtype "
                                         r"torch.int64"):  # ids are an Embedding's input, not a Linear's
        est.backward(torch.ones(4, 6, dtype=torch.int64), y)
    with pytest.raises(TypeError, match="floating tensor or integer ids"):
        est.backward(torch.ones(4, 6, dtype=torch.bool), y)
    with pytest.raises(ValueError, match="reduction='none'"):
        hzo_ext.HZO(model, CE(reduction="none")).backward(x, y)
    with pytest.raises(ValueError, match="chunk_size"):
        hzo_ext.HZO(model, CE(), chunk_size=0)
    with pytest.raises(ValueError, match="split"):
        hzo_ext.HZO(model, CE(), split="middle")
    with pytest.raises(ValueError, match="m=0 for the range \\(0, 4\\]"):
        hzo_ext.HZO(model, CE(), split=lambda i, j: i).backward(x, y)
    with pytest.raises(ValueError, match="one value per sample"):
        hzo_ext.HZO(model, lambda z, t: z.sum()).backward(x, y)


def test_non_finite_query_names_stage_and_split():
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), Blowup(), nn.Linear(4, 5)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-0.07)  # clean exp(1e4 tanh(-.07)) is finite (and tiny), a_2 + 0.5 overflows
    x, y = batch()
    with pytest.raises(ValueError, match=r"stage 3 \(Blowup\) while probing split \(0, 2, 4\]"), \
            pytest.warns(UserWarning, match="truncation dominates"):
        hzo_ext.HZO(model, CE(), eps=0.5, split="bisect").backward(x, y)
    # the default engine perturbs exp's input 1e4 * a_2, not a_2: no overflow there, finite
    model.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="truncation dominates"):
        hzo_ext.HZO(model, CE(), eps=0.5).backward(x, y)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # an opaque Blowup is probed whole: a_1 + 0.5 overflows, named by op
    model = nn.Sequential(model[0], hzo_ext.opaque(Blowup()), model[3])
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"non-finite value \(inf/nan\) in a query: op 2 \(1: Blowup\)"), \
            pytest.warns(UserWarning, match="truncation dominates"):
        hzo_ext.HZO(model, CE(), eps=0.5).backward(x, y)
    assert all(p.grad is None for p in model.parameters())  # nothing written before the error


# ---- training: HZO tracks backprop on digits ---------------------------------------------------

def _digits_run(kind: str, epochs: int = 8) -> float:
    from sklearn.datasets import load_digits
    d = load_digits()
    X, Y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    width = 32
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(),
                          *[hzo_ext.ResidualBlock(nn.Sequential(nn.Linear(width, width), nn.Tanh()))
                            for _ in range(4)],
                          nn.Linear(width, 10))
    est = hzo_ext.HZO(model, CE()) if kind == "hzo" else hzo_ext.Backprop(model, CE())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=g)]
        for k in range(0, len(order), 64):
            idx = order[k:k + 64]
            opt.zero_grad()
            est.backward(X[idx], Y[idx])
            opt.step()
    with torch.no_grad():
        return (model(X[test]).argmax(1) == Y[test]).float().mean().item()


def test_digits_hzo_matches_backprop():
    acc_bp, acc_hzo = _digits_run("backprop"), _digits_run("hzo")
    print(f"digits test accuracy: backprop {acc_bp:.4f}, HZO {acc_hzo:.4f}")
    assert acc_bp > 0.9
    assert abs(acc_hzo - acc_bp) <= 0.02
