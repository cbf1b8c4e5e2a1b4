"""Pure-PyTorch reference implementations of the hzo_ext ops.

They define what the C++/CUDA kernels must compute (the tests compare against them) and
they are what the package runs when the compiled extension is missing or disabled
(``HZO_EXT_DISABLE=1``). Argument checking lives in ``hzo_ext.ops``, not here.
"""
from __future__ import annotations

import math

import torch


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 accumulate in float32, like the kernels.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def perturb(a: torch.Tensor, colors: torch.Tensor, probe_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """[B, *S] -> [2, K, B, *S]; copy k moves every coordinate of color probe_ids[k] by +eps / -eps."""
    B = a.shape[0]
    acc = _accumulate_dtype(a.dtype)
    mask = (colors.reshape(1, -1) == probe_ids.reshape(-1, 1)).to(acc)  # [K, prod(S)]
    shift = torch.stack([mask * eps, mask * -eps])  # [2, K, prod(S)]
    flat = a.reshape(B, -1).to(acc)
    out = flat.reshape(1, 1, B, -1) + shift.unsqueeze(2)
    return out.to(a.dtype).reshape(2, probe_ids.numel(), *a.shape)


def contract(y: torch.Tensor, target: torch.Tensor, owner: torch.Tensor, eps: float,
             num_inputs: int) -> torch.Tensor:
    """out[b, owner[k,q]] += target[b,q] * (y[0,k,b,q] - y[1,k,b,q]) / (2 eps); owner -1 is ignored."""
    K, B = y.shape[1], y.shape[2]
    acc = _accumulate_dtype(y.dtype)
    yf = y.reshape(2, K, B, -1).to(acc)
    terms = (yf[0] - yf[1]) * target.reshape(1, B, -1).to(acc) / (2 * eps)  # [K, B, T]
    idx = owner.reshape(-1)
    keep = idx >= 0
    vals = terms.permute(1, 0, 2).reshape(B, -1)[:, keep]
    out = torch.zeros(B, num_inputs, dtype=acc, device=y.device)
    out.index_add_(1, idx[keep], vals)
    return out.to(y.dtype)


def spp_owner(colors: torch.Tensor, probe_start: int, K: int, boxes: torch.Tensor, in_shape, out_shape,
              channelwise: bool) -> torch.Tensor:
    """The owner map [K, prod(out_shape)] contract_spp implies: output (c', t) of probe k belongs to
    the input (c, p) of color probe_start + k whose box holds t (and c == c' when channelwise)."""
    C, S = in_shape[0], tuple(in_shape[1:])
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
    return owner.reshape(K, -1)


def contract_spp(y: torch.Tensor, target: torch.Tensor, colors: torch.Tensor, probe_start: int,
                 boxes: torch.Tensor, in_shape, channelwise: bool, eps: float) -> torch.Tensor:
    """contract with the owner map spp_owner builds from the coloring's geometry."""
    owner = spp_owner(colors, probe_start, y.shape[1], boxes, in_shape, y.shape[3:], channelwise)
    return contract(y, target, owner, eps, math.prod(in_shape))
