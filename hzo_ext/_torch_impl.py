"""Pure-PyTorch reference implementations of the hzo_ext ops.

They define what the C++/CUDA kernels must compute (the tests compare against them) and
they are what the package runs when the compiled extension is missing or disabled
(``HZO_EXT_DISABLE=1``). Argument checking lives in ``hzo_ext.ops``, not here.
"""
from __future__ import annotations

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
