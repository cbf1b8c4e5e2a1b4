"""hzo_ext::perturb and hzo_ext::contract against their pure-PyTorch references.

Run once as is (compiled kernels) and once with HZO_EXT_DISABLE=1 (the fallback path); with
the fallback, the comparisons check the public wrappers and their argument errors.
"""
import math
import os
import re

import pytest
import torch

import hzo_ext
from hzo_ext import _torch_impl, ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (B, S or T) shapes, including a 1-element feature dim and 3-D feature maps.
SHAPES = [(1, (1,)), (3, (7,)), (4, (2, 5)), (2, (3, 4, 5)), (5, (16,))]


def _coloring(kind, n, gen, device):
    if kind == "dense":
        colors = ops.dense_colors(n, device=device)
        probe_ids = torch.randperm(n, generator=gen)[: max(1, n // 2)].to(device)
    else:  # SPP-like: few colors, several coordinates per color, some colors not probed
        num_colors = max(1, n // 3)
        colors = torch.randint(0, num_colors, (n,), generator=gen).to(device)
        probe_ids = torch.randint(0, num_colors + 2, (4,), generator=gen).to(device)
    return colors, probe_ids


def _owner(kind, K, Q, N, gen, device):
    if kind == "dense":
        return ops.dense_owner(torch.randint(0, N, (K,), generator=gen), Q).to(device)
    return torch.randint(-1, N, (K, Q), generator=gen).to(device)  # -1: ignored


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["dense", "spp"])
def test_perturb_matches_reference(device, dtype, shape, kind):
    gen = torch.Generator().manual_seed(hash((str(dtype), shape, kind)) % 2**31)
    B, S = shape
    a = torch.randn(B, *S, generator=gen).to(device, dtype)
    colors, probe_ids = _coloring(kind, math.prod(S), gen, device)
    out = ops.perturb(a, colors, probe_ids, 1e-2)
    assert out.shape == (2, probe_ids.numel(), B, *S) and out.dtype == dtype
    # Same arithmetic in the same accumulation type: bit-identical.
    torch.testing.assert_close(out, _torch_impl.perturb(a, colors, probe_ids, 1e-2), rtol=0, atol=0)
    # And against the definition: only coordinates of the probed color moved, by exactly +-eps.
    moved = colors.unsqueeze(0) == probe_ids.unsqueeze(1)  # [K, N]
    delta = (out.double() - a.double()).reshape(2, probe_ids.numel(), B, -1)
    assert torch.all(delta[:, ~moved.unsqueeze(1).expand(-1, B, -1)] == 0)
    if dtype == torch.float64:
        signs = torch.tensor([1e-2, -1e-2], dtype=torch.float64, device=device).view(2, 1, 1, 1)
        expect = torch.stack([moved, moved]).unsqueeze(2).double() * signs
        torch.testing.assert_close(delta, expect.expand_as(delta), rtol=0, atol=1e-14)


TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["dense", "spp"])
@pytest.mark.parametrize("sized", [False, True])
def test_contract_matches_reference(device, dtype, shape, kind, sized):
    gen = torch.Generator().manual_seed(hash((str(dtype), shape, kind, sized)) % 2**31)
    B, T = shape
    K, Q, N = 6, math.prod(T), 9
    y = torch.randn(2, K, B, *T, generator=gen).to(device, dtype)
    target = torch.randn(B, *T, generator=gen).to(device, dtype)
    owner = _owner(kind, K, Q, N, gen, device)
    num_inputs = N + 3 if sized else int(owner.max()) + 1
    out = ops.contract(y, target, owner, 1e-3, num_inputs=num_inputs if sized else None)
    assert out.shape == (B, num_inputs) and out.dtype == dtype
    # The reference in float64 is the exact value (up to summation order).
    ref = _torch_impl.contract(y.double(), target.double(), owner, 1e-3, num_inputs)
    scale = ref.abs().max().clamp(min=1.0)
    torch.testing.assert_close(out.double() / scale, ref / scale, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_contract_exact_formula_small(device):
    # One probe, two outputs, both owned by coordinate 1 of 3; one output ignored.
    y = torch.tensor([[[[3.0, 5.0, 7.0]]], [[[1.0, 2.0, 100.0]]]], dtype=torch.float64, device=device)
    target = torch.tensor([[2.0, -1.0, 9.0]], dtype=torch.float64, device=device)
    owner = torch.tensor([[1, 1, -1]], device=device)
    out = ops.contract(y, target, owner, 0.5, num_inputs=3)
    # (2*(3-1) + -1*(5-2)) / (2*0.5) = 1
    assert out.tolist() == [[0.0, 1.0, 0.0]]


@pytest.mark.parametrize("device", DEVICES)
def test_ops_are_deterministic(device):
    gen = torch.Generator().manual_seed(0)
    K, B, Q, N = 64, 8, 128, 40
    y = torch.randn(2, K, B, Q, generator=gen).to(device)
    target = torch.randn(B, Q, generator=gen).to(device)
    owner = torch.randint(-1, N, (K, Q), generator=gen).to(device)  # many terms per output
    first = ops.contract(y, target, owner, 1e-3, num_inputs=N)
    for _ in range(5):
        assert torch.equal(ops.contract(y, target, owner, 1e-3, num_inputs=N), first)
    a = torch.randn(B, N, generator=gen).to(device)
    colors = torch.randint(0, 7, (N,), generator=gen).to(device)
    probe_ids = torch.arange(7, device=device)
    assert torch.equal(ops.perturb(a, colors, probe_ids, 1e-3), ops.perturb(a, colors, probe_ids, 1e-3))


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_then_contract_is_the_jacobian_target_product(device):
    # F linear: the contraction recovers J^T target exactly (up to round-off) for dense probes.
    gen = torch.Generator().manual_seed(1)
    B, N, Q = 3, 5, 4
    W = torch.randn(Q, N, generator=gen, dtype=torch.float64).to(device)
    a = torch.randn(B, N, generator=gen, dtype=torch.float64).to(device)
    target = torch.randn(B, Q, generator=gen, dtype=torch.float64).to(device)
    probe_ids = torch.arange(N, device=device)
    copies = ops.perturb(a, ops.dense_colors(N, device=device), probe_ids, 1e-3)
    y = copies @ W.T  # [2, K, B, Q]
    out = ops.contract(y, target, ops.dense_owner(probe_ids, Q), 1e-3, num_inputs=N)
    torch.testing.assert_close(out, target @ W, rtol=1e-10, atol=1e-12)


# ---- the dispatcher ops themselves (only with the compiled extension) ----

needs_ext = pytest.mark.skipif(not hzo_ext.has_extension(), reason="compiled extension not loaded")


def test_extension_loaded_when_expected():
    # CI sets HZO_EXPECT_EXTENSION=1: a build that silently fell back must fail there.
    if os.environ.get("HZO_EXT_DISABLE") == "1":
        assert not hzo_ext.has_extension()
        assert hzo_ext.info()["extension_error"] == "disabled by HZO_EXT_DISABLE"
    elif os.environ.get("HZO_EXPECT_EXTENSION") == "1":
        assert hzo_ext.has_extension(), hzo_ext.info()["extension_error"]
        assert hzo_ext.info()["built_for"]["torch_version"] == torch.__version__


def _opcheck_samples(device, requires_grad):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_(requires_grad)
    colors = torch.randint(0, 3, (8,), generator=gen).to(device)
    probe_ids = torch.tensor([0, 2, 1], device=device)
    y = torch.randn(2, 3, 3, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_(requires_grad)
    target = torch.randn(3, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_(requires_grad)
    owner = torch.randint(-1, 8, (3, 5), generator=gen).to(device)
    owner[0, 0] = 7  # so that contract's inferred size is 8
    return (a, colors, probe_ids), (y, target, owner)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    perturb_args, contract_args = _opcheck_samples(device, requires_grad)
    torch.library.opcheck(torch.ops.hzo_ext.perturb.default, (*perturb_args, 1e-3))
    torch.library.opcheck(torch.ops.hzo_ext.contract_sized.default, (*contract_args, 1e-3, 8))
    # contract's output size is data-dependent (max(owner) + 1): the fake kernel returns an
    # unbacked size, which opcheck's fake-tensor test cannot compare; the rest applies.
    torch.library.opcheck(torch.ops.hzo_ext.contract.default, (*contract_args, 1e-3),
                          test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    # Both ops are linear in their floating inputs; their registered VJPs must be exact.
    (a, colors, probe_ids), (y, target, owner) = _opcheck_samples(device, True)
    assert torch.autograd.gradcheck(lambda t: ops.perturb(t, colors, probe_ids, 1e-3), (a,))
    assert torch.autograd.gradcheck(lambda u, t: ops.contract(u, t, owner, 1e-3, num_inputs=8), (y, target))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    (a, colors, probe_ids), (y, target, owner) = _opcheck_samples(device, False)

    def probe_and_contract(a, colors, probe_ids, y, target, owner):
        copies = ops.perturb(a, colors, probe_ids, 1e-3)
        return copies.sum(), ops.contract(y, target, owner, 1e-3, num_inputs=8)

    compiled = torch.compile(probe_and_contract, fullgraph=True, backend="eager")
    for got, want in zip(compiled(a, colors, probe_ids, y, target, owner),
                         probe_and_contract(a, colors, probe_ids, y, target, owner)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- bad input: errors that name the problem (same type and words on both paths) ----

def _good(device="cpu"):
    a = torch.randn(2, 3, device=device)
    return dict(a=a, colors=torch.arange(3, device=device), probe_ids=torch.tensor([0, 2], device=device),
                y=torch.randn(2, 2, 2, 4, device=device), target=torch.randn(2, 4, device=device),
                owner=torch.zeros(2, 4, dtype=torch.int64, device=device), eps=1e-3, num_inputs=3)


ERR = (ValueError, TypeError)
BAD_EPS = [0.0, -1e-3, float("nan"), float("inf")]

# (change to the good arguments, what the message must say): every check of checks.cpp.
PERTURB_BAD = [(dict(eps=e), "eps must be positive and finite") for e in BAD_EPS] + [
    (dict(colors=torch.arange(3, device="meta")), "colors is on meta but a is on cpu"),
    (dict(probe_ids=torch.tensor([0, 2], device="meta")), "probe_ids is on meta but a is on cpu"),
    (dict(a=torch.randn(2, 3, device="meta")), "colors is on cpu but a is on meta"),
    (dict(a=torch.randn(2, 4)), "colors must be 1-D with prod.S. = 4"),
    (dict(a=torch.randn(3)), "a must be .B, .S."),
    (dict(a=torch.arange(6).reshape(2, 3)), "a must be a floating tensor .* got torch.int64"),
    (dict(colors=torch.arange(3).int()), "colors must be int64, got torch.int32"),
    (dict(probe_ids=torch.tensor([0.0])), "probe_ids must be int64, got torch.float32"),
    (dict(colors=torch.tensor([0, -2, 1])), "colors must be >= 0"),
    (dict(probe_ids=torch.tensor([[0, 1]])), "probe_ids must be 1-D"),
    (dict(probe_ids=torch.tensor([-1])), "probe_ids must be >= 0"),
]

CONTRACT_BAD = [(dict(eps=e), "eps must be positive and finite") for e in BAD_EPS] + [
    (dict(target=torch.randn(2, 4, device="meta")), "target is on meta but y is on cpu"),
    (dict(owner=torch.zeros(2, 4, dtype=torch.int64, device="meta")), "owner is on meta but y is on cpu"),
    (dict(y=torch.randn(3, 2, 2, 4)), r"y must be \[2, K, B, \*T\] .*got shape \[3, 2, 2, 4\]"),
    (dict(y=torch.zeros(2, 2, 2, 4, dtype=torch.int64)), "y must be a floating tensor"),
    (dict(target=torch.randn(2, 5)), r"target must be \[B, \*T\] = \[2, 4\]"),
    (dict(target=torch.randn(2, 4, dtype=torch.float64)), "target dtype torch.float64 does not match y dtype"),
    (dict(owner=torch.zeros(3, 4, dtype=torch.int64)), r"owner must be \[K, prod\(T\)\] = \[2, 4\]"),
    (dict(owner=torch.zeros(2, 4, dtype=torch.int32)), "owner must be int64"),
    (dict(owner=torch.full((2, 4), -2)), "owner entries must be >= -1"),
]

# contract_sized only: num_inputs.
SIZED_BAD = [
    (dict(num_inputs=-1), "num_inputs must be >= 0, got -1"),
    (dict(owner=torch.full((2, 4), 3)), "owner entries must be < num_inputs = 3, found 3"),
]


def _perturb_args(change):
    g = {**_good(), **change}
    return g["a"], g["colors"], g["probe_ids"], g["eps"]


def _contract_args(change, sized):
    g = {**_good(), **change}
    return (g["y"], g["target"], g["owner"], g["eps"]) + ((g["num_inputs"],) if sized else ())


@pytest.mark.parametrize("change,match", PERTURB_BAD)
def test_perturb_bad_input(change, match):
    with pytest.raises(ERR, match=match):
        ops.perturb(*_perturb_args(change))


@pytest.mark.parametrize("change,match", CONTRACT_BAD)
def test_contract_bad_input(change, match):
    with pytest.raises(ERR, match=match):
        ops.contract(*_contract_args(change, sized=False))


@pytest.mark.parametrize("change,match", CONTRACT_BAD + SIZED_BAD)
def test_contract_sized_bad_input(change, match):
    y, target, owner, eps, num_inputs = _contract_args(change, sized=True)
    with pytest.raises(ERR, match=match):
        ops.contract(y, target, owner, eps, num_inputs=num_inputs)


def _error(fn, args):
    with pytest.raises(Exception) as info:
        fn(*args)
    return type(info.value), str(info.value)


def assert_same_error(compiled, fallback, args, match):
    """The compiled op and the fallback raise the same exception type with the same message."""
    got, want = _error(compiled, args), _error(fallback, args)
    assert got == want
    assert got[0] in ERR and re.search(match, got[1]), got


@needs_ext
@pytest.mark.parametrize("change,match", PERTURB_BAD)
def test_perturb_errors_same_as_fallback(change, match):
    assert_same_error(torch.ops.hzo_ext.perturb, _torch_impl.perturb, _perturb_args(change), match)


@needs_ext
@pytest.mark.parametrize("change,match", CONTRACT_BAD)
def test_contract_errors_same_as_fallback(change, match):
    assert_same_error(torch.ops.hzo_ext.contract, _torch_impl.contract, _contract_args(change, False), match)


@needs_ext
@pytest.mark.parametrize("change,match", CONTRACT_BAD + SIZED_BAD)
def test_contract_sized_errors_same_as_fallback(change, match):
    assert_same_error(torch.ops.hzo_ext.contract_sized, _torch_impl.contract, _contract_args(change, True), match)


@pytest.mark.parametrize("eps", [-1e-3, 0.0, -0.1, -1.0, -100.0, -1e-5, -1.5e-7, -123456.789, -1e16, -2.5e300,
                                 -5e-324, float("nan"), float("inf"), float("-inf")])
def test_eps_message_prints_the_value_passed(eps):
    # Python's repr of the double given, on both paths: -1e-3 is "-0.001", no float32 digits.
    impls = [_torch_impl.perturb] + ([torch.ops.hzo_ext.perturb] if hzo_ext.has_extension() else [])
    for impl in impls:
        _, message = _error(impl, _perturb_args(dict(eps=eps)))
        assert message.endswith(f"eps must be positive and finite, got {eps!r}"), (impl, message)
    if eps == -1e-3:
        assert message.endswith("got -0.001")


# ---- empty tensors: the compiled ops and the fallback give the same (empty or zero) results ----

@pytest.mark.parametrize("B,S,K", [(0, (3,), 2), (2, (3,), 0), (2, (0,), 2), (0, (2, 0), 0)])
def test_perturb_empty(B, S, K):
    a = torch.randn(B, *S)
    colors, probe_ids = torch.zeros(math.prod(S), dtype=torch.int64), torch.arange(K)
    want = _torch_impl.perturb(a, colors, probe_ids, 1e-3)
    assert want.shape == (2, K, B, *S)
    if hzo_ext.has_extension():
        assert torch.equal(torch.ops.hzo_ext.perturb(a, colors, probe_ids, 1e-3), want)


@pytest.mark.parametrize("K,B,T", [(3, 0, (4,)), (0, 2, (4,)), (3, 2, (0,)), (0, 0, (2, 0))])
@pytest.mark.parametrize("num_inputs", [None, 0, 5])
def test_contract_empty(K, B, T, num_inputs):
    Q = math.prod(T)
    y, target = torch.randn(2, K, B, *T), torch.randn(B, *T)
    owner = torch.randint(-1, 5, (K, Q), generator=torch.Generator().manual_seed(K * 7 + Q))
    if num_inputs == 0:
        owner.fill_(-1)
    want = _torch_impl.contract(y, target, owner, 1e-3, num_inputs)
    expect_n = int(owner.max()) + 1 if num_inputs is None and owner.numel() else (num_inputs or 0)
    assert want.shape == (B, expect_n) and torch.all(want == 0)
    if hzo_ext.has_extension():
        got = (torch.ops.hzo_ext.contract(y, target, owner, 1e-3) if num_inputs is None
               else torch.ops.hzo_ext.contract_sized(y, target, owner, 1e-3, num_inputs))
        assert torch.equal(got, want)


@pytest.mark.needs_cuda
def test_device_mismatch():
    g = _good()
    with pytest.raises(ERR, match="colors is on cpu but a is on cuda"):
        ops.perturb(g["a"].cuda(), g["colors"], g["probe_ids"].cuda(), 1e-3)
    with pytest.raises(ERR, match="target is on cpu but y is on cuda"):
        ops.contract(g["y"].cuda(), g["target"], g["owner"].cuda(), 1e-3)


@pytest.mark.parametrize("shape, ndim, weighted", [((3, 5, 8), 1, True), ((2, 4, 3, 5), 2, True), ((4, 6), 1, False)])
def test_probe_layer_norm_is_the_central_difference_of_the_layer_norm(shape, ndim, weighted):
    """The closed form equals running F.layer_norm on x +- eps e_j for every coordinate j of a
    row and contracting with the target (float64)."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g, dtype=torch.float64)
    norm = shape[-ndim:]
    w = torch.randn(*norm, generator=g, dtype=torch.float64) if weighted else None
    b = torch.randn(*norm, generator=g, dtype=torch.float64)
    eps, E = 1e-3, math.prod(norm)
    expect = torch.zeros(*shape[:-ndim], E, dtype=torch.float64)
    for j in range(E):
        e = torch.zeros(E, dtype=torch.float64)
        e[j] = eps
        moved = [F.layer_norm(x + sign * e.reshape(norm), norm, w, b, 1e-5) for sign in (1, -1)]
        expect[..., j] = (t * (moved[0] - moved[1])).sum(tuple(range(-ndim, 0))) / (2 * eps)
    got = ops.probe_layer_norm(x, t, w, ndim, 1e-5, eps)
    assert ((got.reshape(expect.shape) - expect).abs().max() / expect.abs().max()).item() < 1e-10


@pytest.mark.parametrize("shape, dim, masked", [((3, 5, 8), -1, False), ((2, 4, 3, 5), 1, False), ((4, 6), -1, True)])
def test_probe_softmax_is_the_central_difference_of_the_softmax(shape, dim, masked):
    """The closed form equals running softmax on x +- eps e_j for every coordinate j of a row
    and contracting with the target (float64); a masked (-inf) coordinate gets 0."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g, dtype=torch.float64)
    if masked:
        x[:, ::3] = float("-inf")
    eps, n = 1e-3, shape[dim]
    expect = torch.zeros(shape, dtype=torch.float64)
    for j in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[j] = eps
        e = e.reshape([n if d == dim % len(shape) else 1 for d in range(len(shape))])
        moved = [torch.softmax(x + sign * e, dim) for sign in (1, -1)]
        expect.select(dim, j).copy_((t * (moved[0] - moved[1])).sum(dim) / (2 * eps))
    got = ops.probe_softmax(x, t, dim, eps)
    assert ((got - expect).abs().max() / expect.abs().max()).item() < 1e-10
    if masked:
        assert (got[:, ::3] == 0).all()
