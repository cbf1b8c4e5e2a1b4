"""hzo_ext::contract_spp (owners computed from the footprint geometry) against the owner-map
contract and the pure-PyTorch reference, on colorings of real conv sub-networks."""
import math
import re

import pytest
import torch
from torch import nn

import hzo_ext
from hzo_ext import _torch_impl, ops, spp

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
needs_ext = pytest.mark.skipif(not hzo_ext.has_extension(), reason="compiled extension not loaded")

# (modules, per-sample input shape): strides, dilation, padding, pooling, 1-d and 3-d, channelwise
GEOMETRIES = {
    "stride2_dilation2": ([nn.Conv2d(3, 4, 3, 2, 1), nn.GELU(), nn.Conv2d(4, 2, 3, 1, 2, dilation=2)], (3, 11, 9)),
    "conv_chain": ([nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)], (2, 13, 12)),
    "conv1d_pool": ([nn.Conv1d(2, 3, 5, padding=2), nn.MaxPool1d(3, stride=2, ceil_mode=True)], (2, 23)),
    "conv3d": ([nn.Conv3d(2, 2, 3, padding=1)], (2, 5, 6, 7)),
    "channelwise_pool": ([nn.AvgPool2d(3, stride=1, padding=1), nn.GELU()], (3, 10, 7)),
    "depthwise": ([nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Tanh()], (3, 9, 9)),
    "global_pool_flatten": ([nn.AdaptiveAvgPool2d(1), nn.Flatten()], (4, 5, 6)),
    "tiny": ([nn.Conv1d(2, 2, 3, padding=1)], (2, 7)),  # for gradcheck: few elements
}


def _case(name, B=3, dtype=torch.float64, device="cpu", seed=0):
    mods, in_shape = GEOMETRIES[name]
    with torch.no_grad():
        out_shape = tuple(nn.Sequential(*mods)(torch.zeros(1, *in_shape)).shape[1:])
    col = spp.coloring_for(mods, in_shape, out_shape)
    gen = torch.Generator().manual_seed(seed)
    start, K = 1, col.num_colors - 1  # a chunk: not every color
    y = torch.randn(2, K, B, *col.geometry_out, generator=gen, dtype=torch.float64).to(device, dtype)
    target = torch.randn(B, *col.geometry_out, generator=gen, dtype=torch.float64).to(device, dtype)
    return col, y, target, torch.arange(start, start + K, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_matches_owner_map_contract(device, name):
    col, y, target, ids = _case(name, device=device)
    got = col.contract(y, target, ids, 1e-3)
    owner = col.owner(ids, math.prod(col.out_shape))
    want = ops.contract(y, target, owner, 1e-3, num_inputs=col.num_inputs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ref = _torch_impl.contract_spp(y, target, col.colors(device), int(ids[0]), col.boxes(device),
                                   list(col.in_shape), col.channelwise, 1e-3)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # coordinates of colors outside the chunk get exactly 0
    outside = (col.colors(device) < ids[0]) | (col.colors(device) > ids[-1])
    assert outside.any() and torch.all(got[:, outside] == 0)


def test_channelwise_colors_and_probe_counts():
    pool, _ = _case("global_pool_flatten")[:2]
    assert pool.channelwise and pool.num_colors == 5 * 6  # one probe per position, all channels at once
    conv = _case("conv_chain")[0]
    assert not conv.channelwise and conv.num_colors == 2 * 5 * 5  # C * s^2, s = 2 * 2 + 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_low_precision(device, dtype, tol):
    col, y, target, ids = _case("stride2_dilation2", dtype=dtype, device=device)
    got = col.contract(y, target, ids, 1e-1)
    assert got.dtype == dtype
    want = col.contract(y.double(), target.double(), ids, 1e-1)  # accumulation in float32 at least
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    col, y, target, ids = _case("conv_chain", B=5, dtype=torch.float32, device=device)
    first = col.contract(y, target, ids, 1e-3)
    for _ in range(4):
        assert torch.equal(col.contract(y, target, ids, 1e-3), first)


@needs_ext
@pytest.mark.needs_cuda
def test_cuda_equals_cpu():
    col, y, target, ids = _case("conv3d", dtype=torch.float64)
    torch.testing.assert_close(col.contract(y.cuda(), target.cuda(), ids.cuda(), 1e-3).cpu(),
                               col.contract(y, target, ids, 1e-3), rtol=1e-12, atol=1e-12)


def _op_args(device="cpu", requires_grad=False, name="stride2_dilation2"):
    col, y, target, ids = _case(name, B=2, device=device)
    return (y.requires_grad_(requires_grad), target.requires_grad_(requires_grad), col.colors(device),
            int(ids[0]), col.boxes(device), list(col.in_shape), col.channelwise, 1e-3)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    torch.library.opcheck(torch.ops.hzo_ext.contract_spp.default, _op_args(device, requires_grad, "tiny"))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    y, target, *rest = _op_args(device, requires_grad=True, name="tiny")
    assert torch.autograd.gradcheck(lambda u, t: ops.contract_spp(u, t, *rest), (y, target))


ERR = (ValueError, TypeError)
NAMES = ["y", "target", "colors", "probe_start", "boxes", "in_shape", "channelwise", "eps"]
# (change to the good arguments, what the message must say): every check of prepare_contract_spp.
BAD = [(dict(eps=e), "eps must be positive") for e in (0.0, -1e-3, float("nan"))] + [
    (dict(target=lambda a: a["target"].to("meta")), "target is on meta but y is on cpu"),
    (dict(colors=lambda a: a["colors"].to("meta")), "colors is on meta but y is on cpu"),
    (dict(boxes=lambda a: a["boxes"].to("meta")), "boxes is on meta but y is on cpu"),
    (dict(y=lambda a: a["y"].long()), "y must be a floating tensor"),
    (dict(y=lambda a: a["y"].float()), "target dtype torch.float64 does not match y dtype torch.float32"),
    (dict(y=lambda a: a["y"][0]), r"y must be \[2, K, B, Cout, \*T\]"),
    (dict(target=lambda a: a["target"][:, :1]), r"target must be \[B, Cout, \*T\]"),
    (dict(colors=lambda a: a["colors"][1:]), "colors must be 1-D"),
    (dict(colors=lambda a: a["colors"].int()), "colors must be int64, got torch.int32"),
    (dict(boxes=lambda a: a["boxes"].int()), "boxes must be int64, got torch.int32"),
    (dict(boxes=lambda a: a["boxes"][:, 1:]), r"boxes must be \[2, sum\(S\)\]"),
    (dict(boxes=lambda a: a["boxes"] + 100), "out of range"),
    (dict(in_shape=[3, 99]), "spatial axes"),
    (dict(in_shape=[3, 0, 5]), r"in_shape sizes must be positive, got \[3, 0, 5\]"),
    (dict(channelwise=True), "channelwise needs as many output channels"),
    (dict(probe_start=-1), "probe_start must be >= 0"),
]


def _bad_args(change):
    args = dict(zip(NAMES, _op_args()))
    for k, v in change.items():
        args[k] = v(args) if callable(v) else v
    return [args[n] for n in NAMES]


@pytest.mark.parametrize("change,match", BAD)
def test_bad_input(change, match):
    with pytest.raises(ERR, match=match):
        ops.contract_spp(*_bad_args(change))


@needs_ext
@pytest.mark.parametrize("change,match", BAD)
def test_errors_same_as_fallback(change, match):
    # Same exception type and message from the compiled op and the fallback.
    errors = []
    for impl in (torch.ops.hzo_ext.contract_spp, _torch_impl.contract_spp):
        with pytest.raises(Exception) as info:
            impl(*_bad_args(change))
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
    assert errors[0][0] in ERR and re.search(match, errors[0][1]), errors[0]


@pytest.mark.parametrize("K,B", [(0, 2), (3, 0), (0, 0)])
def test_empty(K, B):
    y, target, *rest = _op_args()
    y, target = y[:, :K, :B], target[:B]
    want = _torch_impl.contract_spp(y, target, *rest)
    assert want.shape == (B, math.prod(rest[3])) and torch.all(want == 0)
    if hzo_ext.has_extension():
        assert torch.equal(torch.ops.hzo_ext.contract_spp(y, target, *rest), want)
