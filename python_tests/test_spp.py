"""SPP (coloring) against dense HZO and float64 autograd; probe counts; fallbacks."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hzo_ext
from hzo_ext import spp
from hzo_ext.models import digits_cnn

CE = nn.CrossEntropyLoss


def _seeded(model: nn.Module, dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model.to(dtype)


def strided_cnn(dtype=torch.float64, c: int = 3) -> nn.Sequential:
    """Stride 2, dilation 2, a residual block, a strided residual block with a 1x1 shortcut,
    pooling, and a global-pool head."""
    return _seeded(nn.Sequential(
        nn.Sequential(nn.Conv2d(2, c, 3, padding=1), nn.Tanh()),
        nn.Sequential(nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GELU()),
        nn.Sequential(nn.Conv2d(c, c, 3, dilation=2, padding=2), nn.GELU()),
        hzo_ext.ResidualBlock(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1))),
        hzo_ext.ResidualBlock(nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), nn.SiLU(), nn.Conv2d(c, c, 3, 1, 1)),
                              shortcut=nn.Conv2d(c, c, 1, stride=2)),
        nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), nn.Identity()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 4)),
    ), dtype)


def conv_chain(depth: int, c: int = 2, dtype=torch.float64) -> nn.Sequential:
    """3x3 stride-1 convs, GELU: the footprint radius of k stages is k."""
    return _seeded(nn.Sequential(*[nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU()) for _ in range(depth)]),
                   dtype)


def _data(shape, classes=4, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randint(0, classes, (shape[0],), generator=g)


def _grads(model, loss_fn, x, y, **kw):
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense-fallback warning of the head
        est = hzo_ext.HZO(model, loss_fn, **{"split": "bisect", **kw})  # the stage-wise engine's SPP
        est.backward(x, y)
    return hzo_ext.grads_of(model), est


def _dense_same_tree(model, loss_fn, x, y, est):
    """Dense HZO on the tree of splits ``est`` (SPP) used: SPP's bisect keeps barrier stages
    (the head) out of long right halves, and a different tree rounds differently."""
    return _grads(model, loss_fn, x, y, split=est._split_policy(est.plan(x).shapes), spp=False)


def _max_rel(ga, gb) -> float:
    return max(((ga[k] - gb[k]).abs().max() / gb[k].abs().max()).item() for k in gb)


@pytest.mark.parametrize("split", ["bisect", "chain"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_spp_equals_dense(dtype, tol, split):
    model = strided_cnn(dtype)
    x, y = _data((3, 2, 11, 9), dtype=dtype)  # odd sizes
    g_spp, est = _grads(model, CE(), x, y, split=split, spp="auto")
    g_dense, dense = _dense_same_tree(model, CE(), x, y, est)
    assert est.last_stats.probes < dense.last_stats.probes
    assert _max_rel(g_spp, g_dense) <= tol


@pytest.mark.parametrize("split", ["bisect", "chain"])
def test_spp_float64_cosine(split):
    model = strided_cnn()
    x, y = _data((3, 2, 11, 9))
    ref = hzo_ext.reference_grads(model, CE(), x, y)
    g, _ = _grads(model, CE(), x, y, split=split)
    assert min(hzo_ext.per_layer_cosine(model, g, ref)) >= 0.99999


def test_spp_true_on_conv_chain_with_chunks():
    # every split colored (MSE on feature maps: no global stage); chunking gives the same result
    model = conv_chain(4)
    x = _data((2, 2, 7, 10))[0]
    target = torch.randn(2, 2, 7, 10, dtype=torch.float64)
    g, est = _grads(model, nn.MSELoss(), x, target, spp=True)
    g_chunked, _ = _grads(model, nn.MSELoss(), x, target, spp=True, chunk_size=7)
    g_dense, _ = _grads(model, nn.MSELoss(), x, target, spp=False)
    assert all(not s.dense for s in est.plan(x).splits)
    assert _max_rel(g, g_dense) <= 1e-10 and _max_rel(g_chunked, g_dense) <= 1e-10


@pytest.mark.parametrize("size", [16, 32])
def test_probes_per_split_do_not_grow_with_resolution(size):
    c, model = 2, conv_chain(6)
    est = hzo_ext.HZO(model, nn.MSELoss(), split="bisect")
    plan = est.plan(torch.zeros(1, c, size, size, dtype=torch.float64))
    for s in plan.splits:
        width = min(2 * (s.j - s.m) + 1, size)  # s = 2d + 1 for d 3x3 stride-1 stages
        assert s.probes == c * width * width
        assert s.queries == 2 * s.probes * (s.j - s.m)
    assert plan.fd_layer_evals == est.plan(torch.zeros(1, c, 40, 40, dtype=torch.float64)).fd_layer_evals


def test_small_image_caps_colors():
    # H, W < s: every position its own class, probes = C*min(s,H)*min(s,W) = dense
    est = hzo_ext.HZO(conv_chain(6), nn.MSELoss(), split="chain", spp=True)
    plan = est.plan(torch.zeros(1, 2, 3, 20, dtype=torch.float64))
    assert [s.probes for s in plan.splits] == [2 * 3 * 3] * len(plan.splits)


class Shuffle(nn.Module):
    """A spatially global op the geometry does not know."""

    def forward(self, x):
        return x.flip(-1)


def test_unknown_module_falls_back_to_dense_with_one_warning():
    model = _seeded(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Sequential(nn.GELU(), Shuffle()),
                                  nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)), torch.float64)
    x, t = _data((2, 2, 6, 6))[0], torch.randn(2, 2, 6, 6, dtype=torch.float64)
    est = hzo_ext.HZO(model, nn.MSELoss(), split="chain")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.backward(x, t)
        est.backward(x, t)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "Shuffle" in msgs[0] and "stage 2" in msgs[0]
    assert [s.dense for s in est.plan(x).splits] == [False, False, True]  # only (0,1,2] sees Shuffle
    with pytest.raises(ValueError, match="spp=True.*Shuffle"):
        hzo_ext.HZO(model, nn.MSELoss(), split="chain", spp=True).backward(x, t)
    g, _ = _grads(model, nn.MSELoss(), x, t)
    g_dense, _ = _grads(model, nn.MSELoss(), x, t, spp=False)
    assert _max_rel(g, g_dense) <= 1e-10


class DeclaredConv(nn.Module):
    """A module declaring its footprint (a 3x3 'same' window) through spp_footprint."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x))

    def spp_footprint(self, in_sizes):
        return spp.Footprint.window(in_sizes, kernel=3, stride=1, padding=1)


def test_declared_footprint():
    model = _seeded(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), DeclaredConv(), DeclaredConv()), torch.float64)
    x, t = _data((2, 2, 12, 12))[0], torch.randn(2, 2, 12, 12, dtype=torch.float64)
    g, est = _grads(model, nn.MSELoss(), x, t, spp=True, split="chain")
    g_dense, _ = _grads(model, nn.MSELoss(), x, t, spp=False, split="chain")
    assert [s.probes for s in est.plan(x).splits] == [2 * 9, 2 * 9]
    assert _max_rel(g, g_dense) <= 1e-10


def test_conv1d_and_maxpool_ceil_mode():
    model = _seeded(nn.Sequential(nn.Sequential(nn.Conv1d(2, 3, 5, padding=2), nn.GELU()),
                                  nn.Sequential(nn.MaxPool1d(3, stride=2, ceil_mode=True), nn.Conv1d(3, 3, 3)),
                                  nn.Conv1d(3, 3, 3, padding="same", dilation=2), nn.Dropout(0.5).eval()),
                    torch.float64)
    x = _data((2, 2, 23))[0]
    t = torch.randn_like(model(x))
    g, est = _grads(model, nn.MSELoss(), x, t, split="chain")
    g_dense, _ = _grads(model, nn.MSELoss(), x, t, spp=False, split="chain")
    assert _max_rel(g, g_dense) <= 1e-9


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layouts(layout, dtype):
    # float32: SPP vs dense in the same layout (another layout runs other conv kernels, whose
    # round-off the 1/(2 eps) of finite differences amplifies to ~1e-3); float64: across layouts
    model = strided_cnn(dtype)
    x, y = _data((3, 2, 11, 18), dtype=dtype)
    x = x[..., ::2]  # non-contiguous [3, 2, 11, 9]
    g_contiguous, _ = _grads(model, CE(), x.contiguous(), y)
    if layout == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    g, est = _grads(model, CE(), x, y)
    if dtype == torch.float64:
        assert _max_rel(g, g_contiguous) <= 1e-10
    else:
        # channels-last convs (oneDNN) block the 2K*B query rows by K, so SPP and dense queries
        # round differently there: 1.4e-5 measured; contiguous stays within 1e-5
        tol = 1e-5 if layout == "strided" else 5e-5
        assert _max_rel(g, _dense_same_tree(model, CE(), x, y, est)[0]) <= tol


def test_digits_cnn_spp_accuracy():
    model = digits_cnn().double()
    x, y = _data((4, 1, 8, 8), classes=10)
    ref = hzo_ext.reference_grads(model, CE(), x, y)
    g, est = _grads(model, CE(), x, y, split="chain")
    assert any(not s.dense for s in est.plan(x).splits)
    assert min(hzo_ext.per_layer_cosine(model, g, ref)) >= 0.99999


class GatedConv(nn.Module):
    """A gated conv block: chunk gives a tuple inside a traced stage."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4 * 36, 3)

    def forward(self, x):
        a, b = self.c1(x).chunk(2, 1)
        return self.fc(torch.tanh(self.c2(a * torch.sigmoid(b))).flatten(1))


@pytest.mark.parametrize("split", ["bisect", "chain"])
def test_a_tuple_valued_call_in_a_traced_stage_has_no_footprint(split):
    """graph_footprint read a shape off chunk's tuple (AttributeError) in the stage-wise engines."""
    torch.manual_seed(0)
    model = GatedConv().double()
    x, y = torch.randn(3, 3, 6, 6, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    ref = hzo_ext.reference_named_grads(model, nn.MSELoss(), x, y)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that names the piece probed densely
        hzo_ext.HZO(model, nn.MSELoss(), eps=1e-4, split=split).backward(x, y)
    assert min(hzo_ext.per_parameter_cosine(hzo_ext.named_grads(model), ref).values()) >= 0.9999
