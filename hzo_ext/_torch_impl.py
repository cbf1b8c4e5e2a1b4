"""Pure-PyTorch reference implementations of the hzo_ext ops.

They define what the C++/CUDA kernels must compute (the tests compare against them) and
they are what the package runs when the compiled extension is missing or disabled
(``HZO_EXT_DISABLE=1``). Each op checks its arguments like csrc/ops/checks.cpp: same order
(devices first), same exception type (ValueError for values, shapes and devices, TypeError for
dtypes), same message text. The ``check_*`` functions with ``values=False`` skip the
data-dependent checks: they are also what the fake kernels in ``hzo_ext.ops`` run.
"""
from __future__ import annotations

import math

import torch


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 accumulate in float32, like the kernels.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def perturb(a: torch.Tensor, colors: torch.Tensor, probe_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """[B, *S] -> [2, K, B, *S]; copy k moves every coordinate of color probe_ids[k] by +eps / -eps."""
    check_perturb(a, colors, probe_ids, eps)
    B, N, K = a.shape[0], colors.numel(), probe_ids.numel()  # explicit sizes: any of them may be 0
    acc = _accumulate_dtype(a.dtype)
    mask = (colors.reshape(1, N) == probe_ids.reshape(K, 1)).to(acc)  # [K, N]
    shift = torch.stack([mask * eps, mask * -eps])  # [2, K, N]
    out = a.reshape(1, 1, B, N).to(acc) + shift.unsqueeze(2)
    return out.to(a.dtype).reshape(2, K, *a.shape)


def contract(y: torch.Tensor, target: torch.Tensor, owner: torch.Tensor, eps: float,
             num_inputs: int | None = None) -> torch.Tensor:
    """out[b, owner[k,q]] += target[b,q] * (y[0,k,b,q] - y[1,k,b,q]) / (2 eps); owner -1 is ignored.
    num_inputs None: max(owner) + 1 (hzo_ext::contract), else hzo_ext::contract_sized."""
    num_inputs = check_contract(y, target, owner, eps, num_inputs)
    return _contract(y, target, owner, eps, num_inputs)


def _contract(y, target, owner, eps, num_inputs):
    K, B, Q = y.shape[1], y.shape[2], owner.shape[1]
    acc = _accumulate_dtype(y.dtype)
    yf = y.reshape(2, K, B, Q).to(acc)
    terms = (yf[0] - yf[1]) * target.reshape(1, B, Q).to(acc) / (2 * eps)  # [K, B, Q]
    idx = owner.reshape(-1)
    keep = idx >= 0
    vals = terms.permute(1, 0, 2).reshape(B, K * Q)[:, keep]
    out = torch.zeros(B, num_inputs, dtype=acc, device=y.device)
    out.index_add_(1, idx[keep], vals)
    return out.to(y.dtype)


def spp_owner(colors: torch.Tensor, probe_start: int, K: int, boxes: torch.Tensor, in_shape, out_shape,
              channelwise: bool) -> torch.Tensor:
    """The owner map [K, prod(out_shape)] contract_spp implies: output (c', t) of probe k belongs to
    the input (c, p) of color probe_start + k whose box holds t (and c == c' when channelwise)."""
    S = tuple(in_shape[1:])
    Cout, T = out_shape[0], tuple(out_shape[1:])
    P, Qs, r = math.prod(S), math.prod(T), len(S)
    lo_hi = torch.split(boxes, list(S), dim=1)  # per axis [2, S_a]
    owner = torch.full((K, Cout, Qs), -1, dtype=torch.int64, device=colors.device)
    k_all = colors - probe_start
    inputs = torch.nonzero((k_all >= 0) & (k_all < K)).reshape(-1)
    box = torch.ones((inputs.numel(),) + (1,) * r, dtype=torch.bool, device=colors.device)
    rest = inputs % P
    for a in reversed(range(r)):  # box[n, *t] = t_a in [lo, hi] of input n's position on every axis
        pos, rest = rest % S[a], rest // S[a]
        t = torch.arange(T[a], device=colors.device)
        member = (t >= lo_hi[a][0, pos].unsqueeze(1)) & (t <= lo_hi[a][1, pos].unsqueeze(1))  # [N, T_a]
        shape = [inputs.numel()] + [1] * r
        shape[a + 1] = T[a]
        box = box & member.reshape(shape)
    n, q = torch.nonzero(box.reshape(inputs.numel(), Qs), as_tuple=True)
    src = inputs[n]
    if channelwise:
        owner[k_all[src], src // P, q] = src
    else:
        owner[k_all[src], :, q] = src.unsqueeze(1)
    return owner.reshape(K, Cout * Qs)


def contract_spp(y: torch.Tensor, target: torch.Tensor, colors: torch.Tensor, probe_start: int,
                 boxes: torch.Tensor, in_shape, channelwise: bool, eps: float) -> torch.Tensor:
    """contract with the owner map spp_owner builds from the coloring's geometry."""
    check_contract_spp(y, target, colors, probe_start, boxes, in_shape, channelwise, eps)
    owner = spp_owner(colors, probe_start, y.shape[1], boxes, in_shape, y.shape[3:], channelwise)
    return _contract(y, target, owner, eps, math.prod(in_shape))


# ---- argument checks, in the order and words of csrc/ops/checks.cpp ----

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_eps(eps: float, op: str) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        shown = repr(float(eps)) if isinstance(eps, (int, float)) else repr(eps)
        raise ValueError(f"{op}: eps must be positive and finite, got {shown}")


def _check_device(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_floating(t: torch.Tensor, op: str, name: str) -> None:
    if t.dtype not in _FLOATING:
        raise TypeError(f"{op}: {name} must be a floating tensor (float16, bfloat16, float32, float64), "
                        f"got {t.dtype}")


def _check_int64(t: torch.Tensor, op: str, name: str) -> None:
    if t.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be int64, got {t.dtype}")


def _check_target(y, target, op: str, layout: str) -> None:
    """target matches y [2, K, B, ...] in dtype and shape (y's dims after the first two)."""
    if target.dtype != y.dtype:
        raise TypeError(f"{op}: target dtype {target.dtype} does not match y dtype {y.dtype}")
    if target.shape != y.shape[2:]:
        raise ValueError(f"{op}: target must be {layout} = {list(y.shape[2:])} to match y of shape "
                         f"{list(y.shape)}, got shape {list(target.shape)}")


def check_perturb(a, colors, probe_ids, eps, values: bool = True) -> None:
    op = "hzo_ext::perturb"
    _check_device(colors, a, op, "colors", "a")
    _check_device(probe_ids, a, op, "probe_ids", "a")
    _check_eps(eps, op)
    _check_floating(a, op, "a")
    if a.dim() < 2:
        raise ValueError(f"{op}: a must be [B, *S] with at least one feature dimension, got shape {list(a.shape)}")
    _check_int64(colors, op, "colors")
    _check_int64(probe_ids, op, "probe_ids")
    n = math.prod(a.shape[1:])
    if colors.dim() != 1 or colors.numel() != n:
        raise ValueError(f"{op}: colors must be 1-D with prod(S) = {n} entries for a of shape "
                         f"{list(a.shape)}, got shape {list(colors.shape)}")
    if probe_ids.dim() != 1:
        raise ValueError(f"{op}: probe_ids must be 1-D [K], got shape {list(probe_ids.shape)}")
    if not values:
        return
    if colors.numel() and int(colors.min()) < 0:
        raise ValueError(f"{op}: colors must be >= 0 (out of range)")
    if probe_ids.numel() and int(probe_ids.min()) < 0:
        raise ValueError(f"{op}: probe_ids must be >= 0 (out of range)")


def check_contract(y, target, owner, eps, num_inputs, values: bool = True) -> int | None:
    """Returns num_inputs; when None, max(owner) + 1 (None without the value checks)."""
    op = "hzo_ext::contract" if num_inputs is None else "hzo_ext::contract_sized"
    _check_device(target, y, op, "target", "y")
    _check_device(owner, y, op, "owner", "y")
    _check_eps(eps, op)
    _check_floating(y, op, "y")
    if y.dim() < 4 or y.shape[0] != 2:
        raise ValueError(f"{op}: y must be [2, K, B, *T] (the +eps and -eps outputs), got shape {list(y.shape)}")
    _check_target(y, target, op, "[B, *T]")
    _check_int64(owner, op, "owner")
    K, Q = y.shape[1], math.prod(target.shape[1:])
    if owner.shape != (K, Q):
        raise ValueError(f"{op}: owner must be [K, prod(T)] = [{K}, {Q}], got shape {list(owner.shape)}")
    if num_inputs is not None and num_inputs < 0:
        raise ValueError(f"{op}: num_inputs must be >= 0, got {num_inputs}")
    if not values:
        return num_inputs
    lo, hi = (int(owner.min()), int(owner.max())) if owner.numel() else (-1, -1)
    if lo < -1:
        raise ValueError(f"{op}: owner entries must be >= -1 (-1 = ignored), found {lo} (out of range)")
    if num_inputs is None:
        return hi + 1
    if hi >= num_inputs:
        raise ValueError(f"{op}: owner entries must be < num_inputs = {num_inputs}, found {hi} (out of range)")
    return num_inputs


def check_contract_spp(y, target, colors, probe_start, boxes, in_shape, channelwise, eps,
                       values: bool = True) -> None:
    op = "hzo_ext::contract_spp"
    _check_device(target, y, op, "target", "y")
    _check_device(colors, y, op, "colors", "y")
    _check_device(boxes, y, op, "boxes", "y")
    _check_eps(eps, op)
    _check_floating(y, op, "y")
    r = len(in_shape) - 1
    if not 1 <= r <= 3:
        raise ValueError(f"{op}: in_shape must be [C, *S] with 1 to 3 spatial axes, got {list(in_shape)}")
    if min(in_shape) <= 0:
        raise ValueError(f"{op}: in_shape sizes must be positive, got {list(in_shape)}")
    if y.dim() != 4 + r or y.shape[0] != 2:
        raise ValueError(f"{op}: y must be [2, K, B, Cout, *T] with {r} spatial axes (the +eps and -eps "
                         f"outputs), got shape {list(y.shape)}")
    _check_target(y, target, op, "[B, Cout, *T]")
    if probe_start < 0:
        raise ValueError(f"{op}: probe_start must be >= 0, got {probe_start}")
    _check_int64(colors, op, "colors")
    _check_int64(boxes, op, "boxes")
    if colors.dim() != 1 or colors.numel() != math.prod(in_shape):
        raise ValueError(f"{op}: colors must be 1-D with prod(in_shape) = {math.prod(in_shape)} entries, got "
                         f"shape {list(colors.shape)}")
    positions = sum(in_shape[1:])
    if boxes.shape != (2, positions):
        raise ValueError(f"{op}: boxes must be [2, sum(S)] = [2, {positions}] (lo and hi per input position of "
                         f"each axis), got shape {list(boxes.shape)}")
    if channelwise and y.shape[3] != in_shape[0]:
        raise ValueError(f"{op}: channelwise needs as many output channels as input channels, got "
                         f"{y.shape[3]} and {in_shape[0]}")
    if not values:
        return
    limit = torch.cat([torch.full((n,), t, device=boxes.device) for n, t in zip(in_shape[1:], y.shape[4:])])
    lo, hi = boxes[0], boxes[1]
    if bool(((lo <= hi) & ((lo < 0) | (hi >= limit))).any()):
        raise ValueError(f"{op}: boxes hold an interval outside the output axis (out of range)")


# ---- fused probes (csrc/core/elementwise.h) ------------------------------------------------------

# The elementwise functions by kernel code (hzo_ext.registry.ACT_CODES), as torch defines them.
ACT_FUNCTIONS = {
    0: lambda x, a, b: x,
    1: lambda x, a, b: torch.relu(x),
    2: lambda x, a, b: torch.nn.functional.leaky_relu(x, a),
    3: lambda x, a, b: torch.nn.functional.gelu(x),
    4: lambda x, a, b: torch.nn.functional.gelu(x, approximate="tanh"),
    5: lambda x, a, b: torch.tanh(x),
    6: lambda x, a, b: torch.sigmoid(x),
    7: lambda x, a, b: torch.nn.functional.silu(x),
    8: lambda x, a, b: torch.nn.functional.hardtanh(x, a, b),
    9: lambda x, a, b: torch.nn.functional.elu(x, a),
    10: lambda x, a, b: torch.nn.functional.hardswish(x),
    11: lambda x, a, b: torch.nn.functional.hardsigmoid(x),
    12: lambda x, a, b: torch.nn.functional.softplus(x, a, b),
}


def _check_act(act: int, op: str) -> None:
    if not 0 <= act < len(ACT_FUNCTIONS):
        raise ValueError(f"{op}: act must be a code in [0, {len(ACT_FUNCTIONS)}), got {act}")


def _check_same_dtype(other, z, op: str, name: str) -> None:
    if other.dtype != z.dtype:
        raise TypeError(f"{op}: {name} dtype {other.dtype} does not match z dtype {z.dtype}")


def check_probe_elementwise(z, target, eps, act) -> None:
    op = "hzo_ext::probe_elementwise"
    _check_device(target, z, op, "target", "z")
    _check_eps(eps, op)
    _check_act(act, op)
    _check_floating(z, op, "z")
    _check_same_dtype(target, z, op, "target")
    if target.shape != z.shape:
        raise ValueError(f"{op}: target must have the shape of z, {list(z.shape)}, got shape {list(target.shape)}")


def _check_weighted_probe(z, weight, target, eps, act, op: str) -> None:
    """The checks shared by probe_linear and probe_conv2d."""
    _check_device(weight, z, op, "weight", "z")
    _check_device(target, z, op, "target", "z")
    _check_eps(eps, op)
    _check_act(act, op)
    _check_floating(z, op, "z")
    _check_same_dtype(weight, z, op, "weight")
    _check_same_dtype(target, z, op, "target")


def check_probe_linear(z, weight, target, eps, act) -> None:
    op = "hzo_ext::probe_linear"
    _check_weighted_probe(z, weight, target, eps, act, op)
    if z.dim() != 2:
        raise ValueError(f"{op}: z must be [B, Q], got shape {list(z.shape)}")
    if weight.dim() != 2 or weight.shape[0] != z.shape[1]:
        raise ValueError(f"{op}: weight must be [Q, K] with Q = {z.shape[1]}, got shape {list(weight.shape)}")
    if target.shape != z.shape:
        raise ValueError(f"{op}: target must have the shape of z, {list(z.shape)}, got shape {list(target.shape)}")


def probe_elementwise(z, target, eps, act, alpha, beta):
    """target * (s(z + eps) - s(z - eps)) / (2 eps), s the elementwise function of code act."""
    check_probe_elementwise(z, target, eps, act)
    acc = _accumulate_dtype(z.dtype)
    s, zz = ACT_FUNCTIONS[act], z.to(acc)
    out = target.to(acc) * (s(zz + eps, alpha, beta) - s(zz - eps, alpha, beta)) / (2 * eps)
    return out.to(z.dtype)


def probe_linear(z, weight, target, eps, act, alpha, beta):
    """out[b, k] = sum_q target[b, q] (s(z[b, q] + eps W[q, k]) - s(z[b, q] - eps W[q, k])) / (2 eps)."""
    check_probe_linear(z, weight, target, eps, act)
    acc = _accumulate_dtype(z.dtype)
    s = ACT_FUNCTIONS[act]
    zz, h = z.to(acc).unsqueeze(2), eps * weight.to(acc).unsqueeze(0)  # [B, Q, 1], [1, Q, K]
    diff = s(zz + h, alpha, beta) - s(zz - h, alpha, beta)  # [B, Q, K]
    return ((target.to(acc).unsqueeze(2) * diff).sum(1) / (2 * eps)).to(z.dtype)


def check_probe_conv2d(z, weight, target, in_size, stride, padding, dilation, groups, eps, act) -> None:
    op = "hzo_ext::probe_conv2d"
    _check_weighted_probe(z, weight, target, eps, act, op)
    if z.dim() != 4:
        raise ValueError(f"{op}: z must be [B, Cout, Ho, Wo], got shape {list(z.shape)}")
    if target.shape != z.shape:
        raise ValueError(f"{op}: target must have the shape of z, {list(z.shape)}, got shape {list(target.shape)}")
    if not len(in_size) == len(stride) == len(padding) == len(dilation) == 2:
        raise ValueError(f"{op}: in_size, stride, padding and dilation must have 2 entries each")
    if not (groups >= 1 and weight.dim() == 4 and weight.shape[0] == z.shape[1] and z.shape[1] % groups == 0):
        raise ValueError(f"{op}: weight must be [Cout, Cin / groups, KH, KW] with Cout = {z.shape[1]} divisible by "
                         f"groups = {groups}, got shape {list(weight.shape)}")
    for a in range(2):
        if not (stride[a] >= 1 and dilation[a] >= 1 and padding[a] >= 0 and in_size[a] >= 1):
            raise ValueError(f"{op}: stride and dilation must be >= 1, padding >= 0, in_size >= 1")
        k = weight.shape[2 + a]
        expect = (in_size[a] + 2 * padding[a] - dilation[a] * (k - 1) - 1) // stride[a] + 1
        if z.shape[2 + a] != expect:
            raise ValueError(f"{op}: z's spatial size {list(z.shape[2:])} is not that of a conv of {list(in_size)} "
                             f"(expected {expect} on axis {a})")


def probe_conv2d(z, weight, target, in_size, stride, padding, dilation, groups, eps, act, alpha, beta):
    """Fused probe of conv2d-then-s: for each tap (ky, kx), every output's +-eps W[o, c, ky, kx]
    pair contracted with the target, summed over the group's outputs o and scattered to the
    input position it came from; [B, Cin, H, W]."""
    check_probe_conv2d(z, weight, target, in_size, stride, padding, dilation, groups, eps, act)
    acc = _accumulate_dtype(z.dtype)
    s = ACT_FUNCTIONS[act]
    B, Cout, Ho, Wo = z.shape
    G, cin_g, KH, KW = groups, weight.shape[1], weight.shape[2], weight.shape[3]
    (sy, sx), (py, px), (dy, dx) = stride, padding, dilation
    zz = z.to(acc).reshape(B, G, Cout // G, 1, Ho, Wo)
    tt = target.to(acc).reshape(B, G, Cout // G, 1, Ho, Wo)
    out = torch.zeros(B, G * cin_g, in_size[0] + 2 * py, in_size[1] + 2 * px, dtype=acc, device=z.device)
    for ky in range(KH):
        for kx in range(KW):
            h = eps * weight[:, :, ky, kx].to(acc).reshape(1, G, Cout // G, cin_g, 1, 1)
            part = (tt * (s(zz + h, alpha, beta) - s(zz - h, alpha, beta))).sum(2)  # [B, G, cin_g, Ho, Wo]
            out[:, :, ky * dy: ky * dy + sy * (Ho - 1) + 1: sy, kx * dx: kx * dx + sx * (Wo - 1) + 1: sx] += \
                part.reshape(B, G * cin_g, Ho, Wo)
    return (out[:, :, py: py + in_size[0], px: px + in_size[1]] / (2 * eps)).to(z.dtype)
