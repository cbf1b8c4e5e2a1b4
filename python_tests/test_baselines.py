"""CGE, SPSA and Backprop: same interface as HZO, checked against autograd and exact counts."""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
    cge, hzo = hzo_ext.CGE(model, CE()), hzo_ext.HZO(model, CE(), split="bisect")
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


# ---- SPSA in place (MeZO) and by blocks (MeZO-BCD) ---------------------------------------------

_spec = importlib.util.spec_from_file_location(
    "bench_spsa_memory", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_spsa_memory.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
_spsa_before_in_place = _bench.copying_spsa  # the plain reference: SPSA before the in-place version


def _awkward_mlp(dtype, device="cpu"):
    """Weights spread over many binades (1e-6 .. 10), where w + eps z - 2 eps z + eps z rounds away from w."""
    model = mlp(3, 8, "tanh", residual=True, dtype=dtype).to(device)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0 ** torch.empty(p.shape, dtype=dtype).uniform_(-5, 1, generator=g).to(device))
    return model


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_spsa_in_place_equals_the_copying_algorithm(num_samples, dtype, device):
    """Same seed, same estimate as the copying algorithm: the same draws, and the perturbed weights
    and the sums are computed with the same roundings, so equality is exact (tolerance 0)."""
    model = _awkward_mlp(dtype, device)
    x, y = batch(6, dtype=dtype, device=device)
    est = hzo_ext.SPSA(model, CE(), eps=1e-3, num_samples=num_samples, seed=11)
    for calls in range(3):
        loss_ref, grads_ref = _spsa_before_in_place(model, CE(), x, y, 1e-3, num_samples, 11, calls)
        model.zero_grad(set_to_none=True)
        loss = est.backward(x, y)
        assert est.calls == calls + 1
        assert torch.equal(loss, loss_ref)
        for (name, p), g in zip(model.named_parameters(), grads_ref):
            assert torch.equal(p.grad, g), f"call {calls}, {name}: max diff {(p.grad - g).abs().max().item():.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("blocks", [None, "layer", "random"])
def test_spsa_restores_weights_bitwise(blocks, dtype, device):
    model = _awkward_mlp(dtype, device)
    x, y = batch(6, dtype=dtype, device=device)
    before = _weights(model)
    with torch.no_grad():  # the test has teeth: restoring by arithmetic (+eps z, -2 eps z, +eps z) is not exact
        gen = torch.Generator(device=device).manual_seed(0)
        naive = [w + 1e-3 * z - 2e-3 * z + 1e-3 * z
                 for w in before for z in [torch.randn(w.shape, generator=gen, dtype=dtype, device=device)]]
    assert not all(torch.equal(a, b) for a, b in zip(naive, before))
    est = hzo_ext.SPSA(model, CE(), eps=1e-3, num_samples=2, seed=3, blocks=blocks)
    for _ in range(4):
        est.backward(x, y)
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))


def test_spsa_restores_weights_when_a_query_fails():
    from _models import Blowup
    model = nn.Sequential(nn.Linear(3, 4), Blowup(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].weight.mul_(1e-6)
        model[0].bias.zero_()  # the clean loss is finite, the perturbed ones overflow
    x, y = batch(4, 3, 3)
    before = _weights(model)
    with pytest.raises(ValueError, match="non-finite"):
        hzo_ext.SPSA(model, CE(), eps=1e-1).backward(x, y)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("blocks", [None, "layer", "random", "groups"])
def test_spsa_deterministic_per_seed(blocks):
    def run(seed):
        """Five calls: per call the block and every parameter's gradient (None outside the block)."""
        model = mlp(3, 6, "gelu", residual=True)
        groups = [[model[0].weight, model[4].bias], list(model[1].parameters()) + [model[0].bias]]
        est = hzo_ext.SPSA(model, CE(), num_samples=2, seed=seed, blocks=groups if blocks == "groups" else blocks)
        x, y = batch(5)
        out = []
        for _ in range(5):
            model.zero_grad(set_to_none=True)
            est.backward(x, y)
            out.append((est.last_block, [None if p.grad is None else p.grad.tolist() for p in model.parameters()]))
        return out

    first = run(4)
    assert first == run(4) and first != run(5)


def test_spsa_layer_blocks_cycle_in_model_order():
    model = mlp(2, 6, "gelu", residual=True)  # Linear, 2 ResidualBlock(Sequential(Linear, GELU)), Linear
    model[1].module[0].bias.requires_grad_(False)  # a frozen parameter is in no block
    est = hzo_ext.SPSA(model, CE(), blocks="layer")
    expect = [("0.weight", "0.bias"), ("1.module.0.weight",), ("2.module.0.weight", "2.module.0.bias"),
              ("3.weight", "3.bias")]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [n for b in expect for n in b]
    x, y = batch(5)
    for call in range(2 * len(expect)):
        model.zero_grad(set_to_none=True)
        est.backward(x, y)
        assert est.last_block == hzo_ext.baselines.SPSABlock(call % 4, expect[call % 4])
        with_grad = tuple(n for n, p in model.named_parameters() if p.grad is not None)
        assert with_grad == expect[call % 4]
        # queries restart at the block's stage: stages before it are not re-run
        assert est.last_stats.fd_layer_evals == 2 * (4 - call % 4)


def test_spsa_random_blocks_draw_every_block_and_follow_the_seed():
    model = mlp(2, 6, "gelu", residual=True)
    x, y = batch(5)
    seqs = []
    for seed in (0, 0, 1):
        est = hzo_ext.SPSA(model, CE(), seed=seed, blocks="random")
        seq = []
        for _ in range(40):
            est.backward(x, y)
            seq.append(est.last_block.index)
        seqs.append(seq)
    assert seqs[0] == seqs[1] and seqs[0] != seqs[2]
    assert set(seqs[0]) == {0, 1, 2, 3}  # P(a block missing in 40 draws) = 4 * 0.75^40 ~ 4e-5


def test_spsa_group_blocks_cycle():
    model = mlp(2, 6, "gelu", residual=True)
    groups = [[model[3].bias, model[0].weight], list(model[2].parameters())]
    est = hzo_ext.SPSA(model, CE(), blocks=groups)
    x, y = batch(5)
    for call, names in enumerate([("0.weight", "3.bias"), ("2.module.0.weight", "2.module.0.bias")] * 2):
        model.zero_grad(set_to_none=True)
        est.backward(x, y)
        assert est.last_block.index == call % 2 and est.last_block.names == names  # model order
        assert tuple(n for n, p in model.named_parameters() if p.grad is not None) == names


@pytest.mark.parametrize("blocks", ["layer", "random", "groups"])
def test_spsa_block_equals_all_parameter_estimate_with_the_rest_frozen(blocks):
    """A block's estimate is the blocks=None estimate of the model whose other parameters are frozen,
    same seed and call count (the frozen-model run also re-runs only the stages from the block on)."""
    model = mlp(4, 6, "tanh", residual=True)
    x, y = batch(5)
    groups = [[model[5].bias, model[1].module[0].weight, model[2].module[0].bias], list(model[4].parameters())]
    est = hzo_ext.SPSA(model, CE(), num_samples=2, seed=9, blocks=groups if blocks == "groups" else blocks)
    for call in range(6):
        model.zero_grad(set_to_none=True)
        est.backward(x, y)
        got = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        names = set(est.last_block.names)
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        model.zero_grad(set_to_none=True)
        frozen = hzo_ext.SPSA(model, CE(), num_samples=2, seed=9)
        frozen.calls = call
        frozen.backward(x, y)
        _, plain = _spsa_before_in_place(model, CE(), x, y, 1e-3, 2, 9, call)  # every query a full forward
        for (n, p), g in zip(model.named_parameters(), got):
            assert (g is None) == (n not in names), n
            if g is not None:
                assert torch.equal(g, p.grad), f"call {call}, {n}"
        for g, expect in zip([g for g in got if g is not None], plain):
            assert torch.equal(g, expect)
        assert frozen.last_stats.fd_layer_evals == est.last_stats.fd_layer_evals
        for p in model.parameters():
            p.requires_grad_(True)


def _bad_blocks(model):
    frozen = nn.Parameter(torch.zeros(2))
    return [
        ("layers", ValueError, "'layers'"),
        (3, TypeError, "got a int"),
        ([], ValueError, "empty list"),
        ([[model[0].weight], []], ValueError, r"blocks\[1\] is empty"),
        ([[frozen]], ValueError, r"blocks\[0\]\[0\] \(shape \(2,\)\) is not a parameter of the model"),
        ([[model[0].weight], [model[3].bias, model[0].weight]], ValueError,
         r"'0.weight' is in blocks\[0\] and blocks\[1\]"),
        ([[model[0].bias, model[0].bias]], ValueError, r"'0.bias' is twice in blocks\[0\]"),
        ([[model[1].module[0].bias]], ValueError, "'1.module.0.bias' has requires_grad=False"),
        ([model[0].weight], TypeError, r"blocks\[0\] must be an iterable of parameters"),
        ([[1.0]], TypeError, r"blocks\[0\]\[0\] is a float"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_spsa_bad_blocks_refused(case):
    model = mlp(2, 6, "gelu", residual=True)
    model[1].module[0].bias.requires_grad_(False)
    blocks, kind, message = _bad_blocks(model)[case]
    with pytest.raises(kind, match=message):
        hzo_ext.SPSA(model, CE(), blocks=blocks)


def test_spsa_layer_blocks_need_trainable_parameters():
    model = mlp(1, 4, "tanh").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hzo_ext.SPSA(model, CE(), blocks="layer")


def test_spsa_blocks_on_a_traced_model_use_the_models_names():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.act = nn.Linear(6, 8), nn.Linear(8, 5), nn.Tanh()

        def forward(self, x):
            return self.l2(self.act(self.l1(x)))

    torch.manual_seed(0)
    model = Net().double()
    x, y = batch()
    est = hzo_ext.SPSA(model, nn.CrossEntropyLoss(), blocks="layer")
    before = [p.clone() for p in model.parameters()]
    est.backward(x, y)
    assert est.last_block.names == ("l1.weight", "l1.bias")
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["l1.weight", "l1.bias"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_spsa_sees_a_model_changed_after_construction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    x, y = batch()
    est = hzo_ext.SPSA(model, nn.CrossEntropyLoss(), blocks="layer")
    est.backward(x, y)
    model.append(nn.Tanh())
    model.append(nn.Linear(5, 5).double())  # a new output layer: its block exists and it is run
    model.zero_grad(set_to_none=True)
    for _ in range(2):  # calls 1 and 2: blocks 1 and 2 of the three layers now
        est.backward(x, y)
    assert est.last_block.names == ("4.weight", "4.bias") and model[4].weight.grad is not None
    with torch.no_grad():
        assert torch.equal(est.loss.total(model(x), y), est.backward(x, y))
