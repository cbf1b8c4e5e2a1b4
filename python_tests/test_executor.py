"""The C++ executor (hzo_ext/executor.py, csrc/executor) against the Python path: the same
gradients on the models of test_estimator.py and test_spp.py, no Python stage call for
standard models, one callback per use of a custom module, the same errors, the fallbacks."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hzo_ext
from _models import LOSSES, Blowup, MixSamples, TupleOut, batch, loss_targets, mlp
from hzo_ext.models import digits_cnn, residual_mlp, resnet20_cifar
from test_spp import DeclaredConv, Shuffle, _data, _seeded, conv_chain, strided_cnn

needs_ext = pytest.mark.skipif(not hzo_ext.has_extension(), reason="needs the compiled extension")
CE = nn.CrossEntropyLoss
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _run(model, loss_fn, x, y, executor, **kw):
    """(grads, loss, stats) of one estimate on fresh gradients."""
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SPP's dense-fallback warnings
        est = hzo_ext.HZO(model, loss_fn, executor=executor, **{"split": "bisect", **kw})
        loss = est.backward(x, y)
    assert est.executor == executor
    return hzo_ext.grads_of(model), loss, est.last_stats


def _max_rel(ga, gb) -> float:
    """max over parameters of max|a - b| / max|b| (both None: frozen, 0)."""
    assert [k for k in gb if gb[k] is None] == [k for k in ga if ga[k] is None]
    return max(((ga[k] - gb[k]).abs().max() / gb[k].abs().max().clamp_min(1e-300)).item()
               for k in gb if gb[k] is not None)


def _same_as_python(model, loss_fn, x, y, dtype=None, tol=None, **kw):
    g_py, loss_py, s_py = _run(model, loss_fn, x, y, "python", **kw)
    g_cpp, loss_cpp, s_cpp = _run(model, loss_fn, x, y, "cpp", **kw)
    tol = tol or TOL[dtype or x.dtype]
    assert _max_rel(g_cpp, g_py) <= tol
    torch.testing.assert_close(loss_cpp, loss_py, rtol=tol, atol=0)
    for f in ("fd_layer_evals", "probes", "loss_evals", "splits"):
        assert getattr(s_cpp, f) == getattr(s_py, f), f
    return s_cpp


# ---- the same gradients as the Python path ---------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("split", ["bisect", "chain"])
@pytest.mark.parametrize("depth", [1, 2, 5, 13])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("act", ["linear", "tanh", "gelu"])
def test_deep_mlp_float64(act, residual, depth, split):
    model = mlp(depth, 8, act, residual)
    _same_as_python(model, CE(), *batch(), split=split)


@needs_ext
@pytest.mark.parametrize("split", ["bisect", "chain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deep_mlp_small_float32_many_splits(split, dtype):
    # many small splits per level: on 2 threads, their queries run concurrently, bit for bit
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = mlp(30, 16, "gelu", residual=True, dtype=dtype)
        stats = _same_as_python(model, CE(), *batch(8, dtype=dtype), split=split)
    finally:
        torch.set_num_threads(threads)
    assert stats.forward_calls == 0


@needs_ext
@pytest.mark.parametrize("split", ["bisect", "chain"])
def test_float32_residual_depth64(split):
    model = mlp(64, 48, "gelu", residual=True, din=16, dout=10, dtype=torch.float32, residual_scale=0.25)
    _same_as_python(model, CE(), *batch(8, 16, 10, dtype=torch.float32), split=split)


@needs_ext
@pytest.mark.parametrize("split", ["bisect", "chain"])
def test_float32_relative_eps(split):
    model = mlp(16, 32, "gelu", residual=True, din=16, dout=10, dtype=torch.float32, residual_scale=0.5)
    _same_as_python(model, CE(), *batch(8, 16, 10, dtype=torch.float32), split=split, eps_mode="relative")


@needs_ext
def test_float32_plain_gelu_chain_and_chunks():
    model = mlp(12, 32, "gelu", residual=False, din=16, dout=10, dtype=torch.float32)
    x, y = batch(8, 16, 10, dtype=torch.float32)
    _same_as_python(model, CE(), x, y, split="chain", chunk_size=5)
    _same_as_python(model, CE(), x, y, split="bisect", chunk_size=32)


@needs_ext
def test_callable_split_and_float64_relative_eps():
    model = mlp(12, 16, "tanh", residual=False)
    with torch.no_grad():
        model[0].weight.mul_(100)
    _same_as_python(model, CE(), *batch(), split=lambda i, j: i + max(1, (j - i) // 3), eps_mode="relative")


@needs_ext
@pytest.mark.parametrize("make_loss,kind", LOSSES)
def test_losses(make_loss, kind):
    model = mlp(4, 8, "tanh", residual=True)
    x, y = batch(6)
    y = loss_targets(kind, y)
    loss_fn = make_loss()
    _same_as_python(model, loss_fn, x, y)
    _same_as_python(model, loss_fn, x, y, chunk_size=2)


@needs_ext
def test_eval_batchnorm_dropout_and_activations():
    acts = [nn.ReLU(), nn.ReLU(inplace=True), nn.GELU(approximate="tanh"), nn.Sigmoid(), nn.SiLU(),
            nn.LeakyReLU(0.1), nn.ELU(0.7), nn.Softplus(2.0, 5.0), nn.Hardtanh(-0.5, 0.5), nn.ReLU6(), nn.Mish(),
            nn.Hardswish(), nn.Identity()]
    torch.manual_seed(0)
    stages = [nn.Linear(6, 8)]
    for a in acts:
        stages.append(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), a, nn.Dropout(0.3)))
    stages.append(nn.Linear(8, 5))
    model = nn.Sequential(*stages).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    stats = _same_as_python(model, CE(), *batch(), split="chain")
    assert stats.forward_calls == 0


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explicit_leaves(dtype):
    # stages whose leaves run Node::backward: the gradient flows back through every activation
    # (and a Flatten) to a trainable Linear; a tied Linear in two stages; a frozen weight
    # whose bias still trains; a residual block with a Linear shortcut; a 3-D activation
    torch.manual_seed(0)
    acts = [nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Tanh(), nn.Sigmoid(), nn.SiLU(),
            nn.LeakyReLU(0.1), nn.ELU(0.7), nn.Softplus(2.0, 5.0), nn.Hardtanh(-0.5, 0.5), nn.Mish(),
            nn.Hardswish(), nn.Identity()]
    tied = nn.Linear(8, 8)
    frozen = nn.Linear(8, 8)
    frozen.weight.requires_grad_(False)
    stages = [nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Sequential(nn.Flatten(), nn.Linear(24, 8))]
    stages += [nn.Sequential(nn.Linear(8, 8), a, nn.Linear(8, 8)) for a in acts]
    stages += [tied, nn.Tanh(), tied, nn.Sequential(frozen, nn.Tanh(), nn.Linear(8, 8)),
               hzo_ext.ResidualBlock(nn.Sequential(nn.Linear(8, 8), nn.GELU()), shortcut=nn.Linear(8, 8, bias=False)),
               nn.Linear(8, 5)]
    model = nn.Sequential(*stages).to(dtype)
    x = torch.randn(4, 3, 4, dtype=dtype)
    y = torch.randint(0, 5, (4,))
    _same_as_python(model, CE(), x, y, split="chain")
    ref = hzo_ext.reference_grads(model, CE(), x, y)
    assert min(hzo_ext.per_layer_cosine(model, hzo_ext.grads_of(model), ref)) >= (0.999 if dtype == torch.float32
                                                                                   else 0.99999)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_query_intermediates_overwritten_only_when_unshared(dtype):
    # Query runs compute activations and residual sums in place into intermediates nothing else
    # holds. Here the input of an in-place candidate is also needed elsewhere: the skip of a
    # residual block whose module starts with an activation, an Identity module (branch is the
    # skip), a view (Flatten) of a stage input, an activation right after the perturbed copies
    # (the clean a_m must stay intact), and module-level inplace=True. Large enough (width 64,
    # batch 8) for the folding of fast mode to run too.
    torch.manual_seed(0)
    R = hzo_ext.ResidualBlock
    model = nn.Sequential(
        nn.Linear(6, 64), nn.Tanh(),
        R(nn.Sequential(nn.GELU(), nn.Linear(64, 64))),
        R(nn.Sequential(nn.Tanh(), nn.Linear(64, 64)), shortcut=nn.Sigmoid()),
        R(nn.Identity()),
        R(nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True)), shortcut=nn.Identity()),
        nn.Sequential(nn.Flatten(), nn.SiLU()),
        R(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh())),
        nn.Linear(64, 5)).to(dtype)
    x, y = batch(8, dtype=dtype)
    _same_as_python(model, CE(), x, y)
    _same_as_python(model, CE(), x, y, split="chain", chunk_size=24)
    g_py, _, _ = _run(model, CE(), x, y, "python")
    g, _ = _fast(model, x, y)
    ref = hzo_ext.reference_grads(model, CE(), x, y)
    assert min(hzo_ext.per_layer_cosine(model, g, ref)) >= (0.999 if dtype == torch.float32 else 0.99999)
    if dtype == torch.float64:
        assert _max_rel(g, g_py) <= 1e-10


@needs_ext
def test_list_of_modules_and_frozen_parameters_accumulate():
    model = mlp(5, 8, "tanh", residual=True)
    model[2].module[0].weight.requires_grad_(False)
    stages = list(model)
    x, y = batch()
    for executor in ("python", "cpp"):
        model.zero_grad(set_to_none=True)
        est = hzo_ext.HZO(stages, CE(), executor=executor, split="bisect")
        est.backward(x, y)
        est.backward(x, y)
        if executor == "python":
            ref = hzo_ext.grads_of(model)
    assert model[2].module[0].weight.grad is None
    assert _max_rel(hzo_ext.grads_of(model), ref) <= 1e-12


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_mlp(dtype):
    torch.manual_seed(0)
    model = residual_mlp(12, 16, 4, 5).to(dtype)
    x = torch.randn(6, 3, 4, dtype=dtype)  # Flatten in the stem
    _same_as_python(model, CE(), x, torch.randint(0, 5, (6,)))


# ---- conv models of test_spp.py ----------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("dtype,spp,split", [(torch.float32, "auto", "bisect"), (torch.float32, False, "chain"),
                                             (torch.float64, "auto", "chain")])
def test_strided_cnn(dtype, spp, split):
    model = strided_cnn(dtype)
    x, y = _data((3, 2, 11, 9), dtype=dtype)
    stats = _same_as_python(model, CE(), x, y, split=split, spp=spp)
    assert stats.forward_calls == 0


@needs_ext
def test_conv_chain_spp_chunks():
    model = conv_chain(4)
    x = _data((2, 2, 7, 10))[0]
    target = torch.randn(2, 2, 7, 10, dtype=torch.float64)
    _same_as_python(model, nn.MSELoss(), x, target, spp=True, chunk_size=7)


@needs_ext
def test_conv1d_maxpool_ceil_same_padding():
    model = _seeded(nn.Sequential(nn.Sequential(nn.Conv1d(2, 3, 5, padding=2), nn.GELU()),
                                  nn.Sequential(nn.MaxPool1d(3, stride=2, ceil_mode=True), nn.Conv1d(3, 3, 3)),
                                  nn.Conv1d(3, 3, 3, padding="same", dilation=2), nn.Dropout(0.5).eval(),
                                  nn.Sequential(nn.AvgPool1d(3, 2, 1), nn.AdaptiveAvgPool1d(2), nn.Flatten())),
                    torch.float32)
    x = _data((2, 2, 23), dtype=torch.float32)[0]
    t = torch.randn_like(model(x))
    _same_as_python(model, nn.MSELoss(), x, t, split="chain")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_digits_cnn_and_resnet20(dtype):
    model = digits_cnn().to(dtype)
    _same_as_python(model, CE(), *_data((4, 1, 8, 8), classes=10, dtype=dtype), split="chain")
    if dtype == torch.float32:
        torch.manual_seed(0)
        model = resnet20_cifar(width=2).to(dtype)
        _same_as_python(model, CE(), *_data((2, 3, 8, 8), classes=10, dtype=dtype))


@needs_ext
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(layout):
    model = strided_cnn(torch.float32)
    x, y = _data((3, 2, 11, 18), dtype=torch.float32)
    x = x[..., ::2]
    if layout == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    _same_as_python(model, CE(), x, y)


# ---- Python calls: none for standard models, one per use of a custom module ------------------------

def _count_stage_calls(model):
    """A global forward pre-hook counting every call of the model's modules from Python (the
    C++ executor does not see global hooks, so they do not change its lowering)."""
    mods, calls = set(model.modules()), [0]

    def hook(mod, args):
        calls[0] += mod in mods

    return calls, torch.nn.modules.module.register_module_forward_pre_hook(hook)


@needs_ext
@pytest.mark.parametrize("make,data", [
    (lambda: mlp(9, 8, "gelu", residual=True), lambda: batch()),
    (lambda: strided_cnn(torch.float32), lambda: _data((2, 2, 11, 9), dtype=torch.float32)),
    (lambda: digits_cnn(), lambda: _data((2, 1, 8, 8), classes=10, dtype=torch.float32))])
def test_standard_models_make_no_python_call(make, data):
    model, (x, y) = make(), data()
    calls, handle = _count_stage_calls(model)
    try:
        est = hzo_ext.HZO(model, CE(), executor="cpp", split="bisect")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.backward(x, y)  # the first estimate too (lowered stages need no dynamic check)
            est.backward(x, y)
    finally:
        handle.remove()
    assert calls[0] == 0 and est.last_stats.forward_calls == 0
    assert hzo_ext.HZO(model, CE(), split="bisect").executor == "cpp"  # auto


class Counting(nn.Module):
    """A custom (not lowered) stage that counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.scale = nn.Parameter(torch.ones(8, dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return torch.tanh(x) * self.scale


@needs_ext
@pytest.mark.parametrize("split", ["bisect", "chain"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_custom_module_one_callback_per_use(split, chunk_size):
    torch.manual_seed(0)
    custom = Counting()
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), custom), nn.GELU(),
                          nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    x, y = batch()
    g_py, _, _ = _run(model, CE(), x, y, "python", split=split, chunk_size=chunk_size)
    est = hzo_ext.HZO(model, CE(), split=split, chunk_size=chunk_size, executor="cpp")
    est.backward(x, y)  # the first one runs the dynamic check on stage 3 (2 calls)
    model.zero_grad(set_to_none=True)
    custom.calls = 0
    est.backward(x, y)
    # uses: the clean forward, and every query chunk of a split whose right sub-network holds stage 3
    uses = 1 + sum(s.chunks for s in est.plan(x).splits if s.m < 3 <= s.j)
    custom.calls -= 1  # plan() ran a forward
    assert custom.calls == uses == est.last_stats.forward_calls
    assert _max_rel(hzo_ext.grads_of(model), g_py) <= 1e-12  # its parameter's leaf included


@needs_ext
def test_declared_footprint_and_unknown_module_via_callbacks():
    model = _seeded(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), DeclaredConv(), DeclaredConv()), torch.float64)
    x, t = _data((2, 2, 12, 12))[0], torch.randn(2, 2, 12, 12, dtype=torch.float64)
    stats = _same_as_python(model, nn.MSELoss(), x, t, spp=True, split="chain")
    assert stats.forward_calls > 0
    model = _seeded(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Sequential(nn.GELU(), Shuffle()),
                                  nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)), torch.float32)
    x, t = _data((2, 2, 6, 6), dtype=torch.float32)[0], torch.randn(2, 2, 6, 6)
    _same_as_python(model, nn.MSELoss(), x, t, split="chain")


@needs_ext
def test_hooked_stage_runs_in_python_and_sees_chunked_rows():
    model = mlp(7, 16, "gelu", residual=True)
    x, y = batch(3)
    g_py, _, _ = _run(model, CE(), x, y, "python", chunk_size=5)
    rows = []
    hooks = [s.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0])) for s in model]
    try:
        g, _, stats = _run(model, CE(), x, y, "cpp", chunk_size=5, check_samples=False)
    finally:
        for h in hooks:
            h.remove()
    assert max(rows) == 2 * 5 * 3 and stats.forward_calls == len(rows)
    assert _max_rel(g, g_py) <= 1e-12


# ---- caching: the lowering follows the model --------------------------------------------------------

@needs_ext
def test_lowering_follows_parameter_updates_replacements_and_hooks():
    model = mlp(4, 8, "tanh", residual=True)
    x, y = batch()
    est = hzo_ext.HZO(model, CE(), executor="cpp", split="bisect")
    py = hzo_ext.HZO(model, CE(), executor="python", split="bisect")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def check():
        model.zero_grad(set_to_none=True)
        py.backward(x, y)
        ref = hzo_ext.grads_of(model)
        model.zero_grad(set_to_none=True)
        est.backward(x, y)
        assert _max_rel(hzo_ext.grads_of(model), ref) <= 1e-12

    check()
    opt.step()  # in-place update: the same tensors
    check()
    model[1].module[0].weight = nn.Parameter(torch.randn(8, 8, dtype=torch.float64))  # a new tensor
    check()
    calls = []
    handle = model[2].module[1].register_forward_hook(lambda *a: calls.append(1))
    check()  # a new hook is a change: lowered and checked anew (the one-time checks call it too)
    calls.clear()
    check()
    assert calls and est.last_stats.forward_calls == len(calls) // 2  # half came from the Python run
    handle.remove()
    check()
    assert est.last_stats.forward_calls == 0


@needs_ext
def test_dtype_conversion_after_first_estimate():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 5)).eval()
    x, y = batch(dtype=torch.float32)
    est = hzo_ext.HZO(model, CE(), executor="cpp", split="bisect")
    est.backward(x, y)
    model.double()  # parameters keep their objects, buffers are replaced
    g_py, _, _ = _run(model, CE(), x.double(), y, "python")
    model.zero_grad(set_to_none=True)
    est.backward(x.double(), y)
    assert _max_rel(hzo_ext.grads_of(model), g_py) <= 1e-12
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        est.backward(x.double(), y)


# ---- bad input: the Python path's errors --------------------------------------------------------------

def _same_error(make_model, x, y, loss_fn=None, **kw):
    errors = []
    for executor in ("python", "cpp"):
        model = make_model()
        with pytest.raises(Exception) as info:
            hzo_ext.HZO(model, loss_fn or CE(), executor=executor, **{"split": "bisect", **kw}).backward(x, y)
        errors.append((type(info.value), str(info.value)))
        assert all(p.grad is None for p in model.parameters())
    assert errors[0] == errors[1]


def _chain(stage):
    return lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), stage(), nn.Linear(8, 5)).double()


@needs_ext
@pytest.mark.parametrize("stage", [lambda: nn.BatchNorm1d(8), lambda: nn.Dropout(0.2), MixSamples, TupleOut,
                                   lambda: nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)),
                                   lambda: nn.Linear(7, 8)])
def test_bad_stages_same_errors(stage):
    _same_error(_chain(stage), *batch())


@needs_ext
def test_bad_inputs_same_errors():
    x, y = batch()
    model = lambda: mlp(2, 8)  # noqa: E731
    _same_error(model, x.float(), y)
    _same_error(model, x, y[:3])
    _same_error(model, torch.randn(4, 7, dtype=torch.float64), y)
    _same_error(model, torch.ones(4, 6, dtype=torch.int64), y)
    _same_error(model, x, y, loss_fn=CE(reduction="none"))
    _same_error(model, x, y, split=lambda i, j: i)
    _same_error(model, x, y, loss_fn=lambda z, t: z.sum())


@needs_ext
def test_non_finite_same_errors():
    def blowup():
        model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), Blowup(), nn.Linear(4, 5)).double()
        with torch.no_grad():
            model[0].weight.zero_()
            model[0].bias.fill_(0.07)  # the clean forward is finite, a query is not
        return model

    x, y = batch()
    _same_error(blowup, x, y, eps=0.01)
    _same_error(lambda: nn.Sequential(nn.Linear(6, 4), Blowup(), nn.Linear(4, 5)).double(), x + 1, y)
    plain = lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 5)).double()  # noqa
    _same_error(plain, x * 1e308, y)  # inf in the clean forward (lowered stages)


# ---- which executor runs -----------------------------------------------------------------------------

def test_auto_falls_back_and_cpp_refuses_clearly(monkeypatch):
    model = mlp(2, 8)
    if hzo_ext.has_extension():
        assert hzo_ext.HZO(model, CE(), split="bisect").executor == "cpp"
        monkeypatch.setattr(hzo_ext._ext, "_C", None)  # as with HZO_EXT_DISABLE=1
    assert hzo_ext.HZO(model, CE(), split="bisect").executor == "python"
    assert hzo_ext.HZO(model, CE(), fast=True, split="bisect").executor == "python"
    with pytest.raises(ValueError, match="executor='cpp'.*extension is not loaded"):
        hzo_ext.HZO(model, CE(), executor="cpp", split="bisect")


@needs_ext
def test_unsupported_options_pick_python_or_raise():
    model = mlp(2, 8)
    bb = nn.Sequential(nn.Linear(6, 8), hzo_ext.BlackBox(nn.Linear(8, 5))).double()
    for kw, model_, name in (({"query_dtype": torch.float64}, model, "query_dtype"), ({}, bb, "BlackBox")):
        assert hzo_ext.HZO(model_, CE(), **{"split": "bisect", **kw}).executor == "python"
        with pytest.raises(ValueError, match=name):
            hzo_ext.HZO(model_, CE(), executor="cpp", **{"split": "bisect", **kw})
    with pytest.raises(ValueError, match="executor must be one of"):
        hzo_ext.HZO(model, CE(), executor="c++", split="bisect")
    with pytest.raises(ValueError, match="fast=True needs the C\\+\\+ executor"):
        hzo_ext.HZO(model, CE(), executor="python", fast=True, split="bisect")


def test_disabled_extension_subprocess():
    import os
    import subprocess
    import sys
    code = ("import hzo_ext, torch; from torch import nn; m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)); "
            "assert hzo_ext.HZO(m, nn.CrossEntropyLoss(), split='bisect').executor == 'python'\n"
            "try:\n  hzo_ext.HZO(m, nn.CrossEntropyLoss(), executor='cpp', split='bisect')\nexcept ValueError as e:\n  print(e)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HZO_EXT_DISABLE": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "disabled by HZO_EXT_DISABLE" in out.stdout


# ---- fast=True: less work, the same estimate up to round-off ------------------------------------------

def _fast(model, x, y, **kw):
    model.zero_grad(set_to_none=True)
    est = hzo_ext.HZO(model, CE(), executor="cpp", fast=True, **{"split": "bisect", **kw})
    est.backward(x, y)
    return hzo_ext.grads_of(model), est._cpp.last_outcome


@needs_ext
@pytest.mark.parametrize("split", ["bisect", "chain"])
@pytest.mark.parametrize("residual", [False, True])
def test_fast_stacks_small_levels_float64(residual, split):
    model = mlp(13, 16, "gelu", residual)
    x, y = batch(4)
    g_py, _, _ = _run(model, CE(), x, y, "python", split=split, chunk_size=6)
    g, out = _fast(model, x, y, split=split, chunk_size=6)
    assert _max_rel(g, g_py) <= 1e-10  # round-off only (amplified by 1/eps)
    assert out["stacked"] >= (4 if split == "bisect" else 0) and out["folded"] == 0


@needs_ext
def test_fast_reuses_its_buffers_across_estimates_float64():
    # the stacked queries keep their buffers across estimates: estimates after a weight update
    # and on another batch size still equal the Python path's
    model = mlp(13, 16, "gelu", residual=True)
    est = hzo_ext.HZO(model, CE(), executor="cpp", fast=True, chunk_size=6, split="bisect")
    for n in (4, 4, 7):
        x, y = batch(n, seed=n)
        model.zero_grad(set_to_none=True)
        est.backward(x, y)
        g = hzo_ext.grads_of(model)
        g_py, _, _ = _run(model, CE(), x, y, "python", chunk_size=6)
        assert _max_rel(g, g_py) <= 1e-10 and est._cpp.last_outcome["stacked"] >= 4
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.05)


@needs_ext
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_fast_folds_large_first_linears_float64(chunk_size):
    model = mlp(6, 64, "gelu", residual=True, din=16, dout=10)
    x, y = batch(8, 16, 10)
    g_py, _, _ = _run(model, CE(), x, y, "python", chunk_size=chunk_size)
    g, out = _fast(model, x, y, chunk_size=chunk_size)
    assert _max_rel(g, g_py) <= 1e-10 and out["folded"] > 0


@needs_ext
def test_fast_shortcut_and_float32_accuracy():
    torch.manual_seed(0)
    block = lambda: hzo_ext.ResidualBlock(nn.Sequential(nn.Linear(64, 64), nn.GELU()),  # noqa: E731
                                          shortcut=nn.Linear(64, 64))
    model = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), block(), block(), block(), nn.Linear(64, 5))
    x, y = batch(8, dtype=torch.float32)
    ref = hzo_ext.reference_grads(model, CE(), x, y)
    g, out = _fast(model, x, y)
    assert out["folded"] > 0
    assert min(hzo_ext.per_layer_cosine(model, g, ref)) >= 0.9999  # float32 noise, like the Python path
    model64 = model.double()
    g_py, _, _ = _run(model64, CE(), x.double(), y, "python")
    g, _ = _fast(model64, x.double(), y)
    assert _max_rel(g, g_py) <= 1e-10


@pytest.mark.needs_cuda
@needs_ext
def test_cuda_same_as_python():
    model = mlp(9, 16, "gelu", residual=True).cuda()
    x, y = batch(device="cuda")
    _same_as_python(model, CE(), x, y)
    model = strided_cnn(torch.float32).cuda()
    x, y = _data((3, 2, 11, 9), dtype=torch.float32)
    _same_as_python(model, CE(), x.cuda(), y.cuda())
