"""The hzo_ext torch ops: batched symmetric +-eps perturbation and Jacobian-target contraction.

Each public function here runs the compiled kernel (CPU or CUDA) through the dispatcher when
the extension is loaded, else the pure-PyTorch reference in ``_torch_impl``; both give the
same results and the same argument errors. Fake kernels (torch.compile) and autograd formulas
are registered here, guarded by the extension having loaded.
"""
from __future__ import annotations

import math

import torch

from . import _torch_impl
from ._ext import has_extension

__all__ = ["perturb", "contract", "contract_spp", "dense_colors", "dense_owner"]


def perturb(a: torch.Tensor, colors: torch.Tensor, probe_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """Perturbed copies of ``a`` [B, *S]: returns [2, K, B, *S] where copy k adds +eps (first
    half) or -eps (second half) to every coordinate i with ``colors[i] == probe_ids[k]``."""
    if has_extension():
        return torch.ops.hzo_ext.perturb(a, colors, probe_ids, eps)
    _check_perturb(a, colors, probe_ids, eps)
    return _torch_impl.perturb(a, colors, probe_ids, eps)


def contract(y: torch.Tensor, target: torch.Tensor, owner: torch.Tensor, eps: float,
             num_inputs: int | None = None) -> torch.Tensor:
    """Jacobian-target contraction: returns [B, num_inputs] with
    ``out[b, owner[k,q]] += target[b,q] * (y[0,k,b,q] - y[1,k,b,q]) / (2 eps)``, owner -1 ignored.

    ``num_inputs`` (prod(S)) defaults to ``max(owner) + 1``; pass it when trailing input
    coordinates may own no output, and for static shapes under torch.compile."""
    if has_extension():
        if num_inputs is None:
            return torch.ops.hzo_ext.contract(y, target, owner, eps)
        return torch.ops.hzo_ext.contract_sized(y, target, owner, eps, num_inputs)
    num_inputs = _check_contract(y, target, owner, eps, num_inputs)
    return _torch_impl.contract(y, target, owner, eps, num_inputs)


def contract_spp(y: torch.Tensor, target: torch.Tensor, colors: torch.Tensor, probe_start: int,
                 boxes: torch.Tensor, in_shape, channelwise: bool, eps: float) -> torch.Tensor:
    """``contract`` for an SPP coloring, owners computed on the fly from the footprint geometry.

    y [2, K, B, Cout, *T]: the outputs for the probes (colors) probe_start .. probe_start+K-1;
    target [B, Cout, *T]; colors int64 [prod(in_shape)] as given to ``perturb``; boxes int64
    [2, sum(S)]: the lo/hi output interval each input position of each spatial axis can change
    (lo > hi: none); in_shape [C, *S] (1-3 spatial axes); channelwise: output channel c' depends
    on input channel c' only. Input (c, p) of color probe_start + k gets the sum of
    ``target * (y[0, k] - y[1, k]) / (2 eps)`` over its box, every other input 0. The coloring
    must keep boxes of one color disjoint (then this equals ``contract`` with its owner map,
    which is never materialised). Returns [B, prod(in_shape)]."""
    in_shape = [int(n) for n in in_shape]
    if has_extension():
        return torch.ops.hzo_ext.contract_spp(y, target, colors, probe_start, boxes, in_shape, channelwise, eps)
    _check_contract_spp(y, target, colors, probe_start, boxes, in_shape, channelwise, eps)
    return _torch_impl.contract_spp(y, target, colors, probe_start, boxes, in_shape, channelwise, eps)


def dense_colors(num_coords: int, device=None) -> torch.Tensor:
    """The coloring of dense probing: every coordinate its own color."""
    return torch.arange(num_coords, device=device)


def dense_owner(probe_ids: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Owner map of dense probes: every output of probe k is attributed to coordinate probe_ids[k]."""
    return probe_ids.reshape(-1, 1).expand(-1, num_outputs).contiguous()


# ---- argument checks of the fallback path (the C++ ops make the same ones in checks.cpp) ----

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_eps(eps: float, op: str) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"{op}: eps must be positive and finite, got {eps}")


def _check_index(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str) -> None:
    if t.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be int64, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_perturb(a, colors, probe_ids, eps) -> None:
    op = "hzo_ext::perturb"
    _check_eps(eps, op)
    if a.dtype not in _FLOATING:
        raise TypeError(f"{op}: a must be a floating tensor (float16, bfloat16, float32, float64), got {a.dtype}")
    if a.dim() < 2:
        raise ValueError(f"{op}: a must be [B, *S] with at least one feature dimension, got shape {tuple(a.shape)}")
    _check_index(colors, a, op, "colors", "a")
    _check_index(probe_ids, a, op, "probe_ids", "a")
    n = math.prod(a.shape[1:])
    if colors.dim() != 1 or colors.numel() != n:
        raise ValueError(f"{op}: colors must be 1-D with prod(S) = {n} entries for a of shape "
                         f"{tuple(a.shape)}, got shape {tuple(colors.shape)}")
    if probe_ids.dim() != 1:
        raise ValueError(f"{op}: probe_ids must be 1-D [K], got shape {tuple(probe_ids.shape)}")
    if colors.numel() and int(colors.min()) < 0:
        raise ValueError(f"{op}: colors must be >= 0 (out of range)")
    if probe_ids.numel() and int(probe_ids.min()) < 0:
        raise ValueError(f"{op}: probe_ids must be >= 0 (out of range)")


def _check_target(y, target, op: str, layout: str) -> None:
    """target matches y [2, K, B, ...] in device, dtype and shape (y's dims after the first two)."""
    if target.device != y.device:
        raise ValueError(f"{op}: target is on {target.device} but y is on {y.device}")
    if target.dtype != y.dtype:
        raise TypeError(f"{op}: target dtype {target.dtype} does not match y dtype {y.dtype}")
    if tuple(target.shape) != tuple(y.shape[2:]):
        raise ValueError(f"{op}: target must be {layout} = {tuple(y.shape[2:])} to match y of shape "
                         f"{tuple(y.shape)}, got shape {tuple(target.shape)}")


def _check_contract(y, target, owner, eps, num_inputs) -> int:
    op = "hzo_ext::contract" if num_inputs is None else "hzo_ext::contract_sized"
    _check_eps(eps, op)
    if y.dtype not in _FLOATING:
        raise TypeError(f"{op}: y must be a floating tensor (float16, bfloat16, float32, float64), got {y.dtype}")
    if y.dim() < 4 or y.shape[0] != 2:
        raise ValueError(f"{op}: y must be [2, K, B, *T] (the +eps and -eps outputs), got shape {tuple(y.shape)}")
    _check_target(y, target, op, "[B, *T]")
    _check_index(owner, y, op, "owner", "y")
    K, Q = y.shape[1], math.prod(target.shape[1:])
    if tuple(owner.shape) != (K, Q):
        raise ValueError(f"{op}: owner must be [K, prod(T)] = [{K}, {Q}], got shape {tuple(owner.shape)}")
    lo, hi = (int(owner.min()), int(owner.max())) if owner.numel() else (-1, -1)
    if lo < -1:
        raise ValueError(f"{op}: owner entries must be >= -1 (-1 = ignored), found {lo} (out of range)")
    if num_inputs is None:
        return hi + 1
    if num_inputs < 0:
        raise ValueError(f"{op}: num_inputs must be >= 0, got {num_inputs}")
    if hi >= num_inputs:
        raise ValueError(f"{op}: owner entries must be < num_inputs = {num_inputs}, found {hi} (out of range)")
    return num_inputs


def _check_contract_spp(y, target, colors, probe_start, boxes, in_shape, channelwise, eps) -> None:
    op = "hzo_ext::contract_spp"
    _check_eps(eps, op)
    if y.dtype not in _FLOATING:
        raise TypeError(f"{op}: y must be a floating tensor (float16, bfloat16, float32, float64), got {y.dtype}")
    r = len(in_shape) - 1
    if not 1 <= r <= 3:
        raise ValueError(f"{op}: in_shape must be [C, *S] with 1 to 3 spatial axes, got {list(in_shape)}")
    if min(in_shape) <= 0:
        raise ValueError(f"{op}: in_shape sizes must be positive, got {list(in_shape)}")
    if y.dim() != 4 + r or y.shape[0] != 2:
        raise ValueError(f"{op}: y must be [2, K, B, Cout, *T] with {r} spatial axes (the +eps and -eps "
                         f"outputs), got shape {tuple(y.shape)}")
    _check_target(y, target, op, "[B, Cout, *T]")
    if probe_start < 0:
        raise ValueError(f"{op}: probe_start must be >= 0, got {probe_start}")
    _check_index(colors, y, op, "colors", "y")
    _check_index(boxes, y, op, "boxes", "y")
    if colors.dim() != 1 or colors.numel() != math.prod(in_shape):
        raise ValueError(f"{op}: colors must be 1-D with prod(in_shape) = {math.prod(in_shape)} entries, got "
                         f"shape {tuple(colors.shape)}")
    positions = sum(in_shape[1:])
    if tuple(boxes.shape) != (2, positions):
        raise ValueError(f"{op}: boxes must be [2, sum(S)] = [2, {positions}] (lo and hi per input position of "
                         f"each axis), got shape {tuple(boxes.shape)}")
    if channelwise and y.shape[3] != in_shape[0]:
        raise ValueError(f"{op}: channelwise needs as many output channels as input channels, got "
                         f"{y.shape[3]} and {in_shape[0]}")
    limit = torch.cat([torch.full((n,), t, device=boxes.device) for n, t in zip(in_shape[1:], y.shape[4:])])
    lo, hi = boxes[0], boxes[1]
    if bool(((lo <= hi) & ((lo < 0) | (hi >= limit))).any()):
        raise ValueError(f"{op}: boxes hold an interval outside the output axis (out of range)")


# ---- fake kernels and autograd, for the dispatcher ops (only when the extension loaded) ----

def _contract_backward(ctx, grad_out):
    """Both ops are linear: contract's VJP gathers grad_out through the owner map."""
    y, target, owner = ctx.saved_tensors
    K, B = y.shape[1], y.shape[2]
    keep = (owner >= 0).to(grad_out.dtype)  # [K, Q]
    g = grad_out.index_select(1, owner.clamp(min=0).reshape(-1)).reshape(B, K, -1).transpose(0, 1)
    g = g * keep.unsqueeze(1) / (2 * ctx.eps)  # [K, B, Q]: d out / d (y_plus - y_minus) contracted
    t = target.reshape(1, B, -1)
    yf = y.reshape(2, K, B, -1)
    grad_y = torch.stack([g * t, -g * t]).reshape(y.shape) if ctx.needs_input_grad[0] else None
    grad_t = (g * (yf[0] - yf[1])).sum(0).reshape(target.shape) if ctx.needs_input_grad[1] else None
    return (grad_y, grad_t) + (None,) * (ctx.num_args - 2)


def _setup_contract(ctx, inputs, output):
    y, target, owner, eps = inputs[:4]
    ctx.eps, ctx.num_args = eps, len(inputs)
    ctx.save_for_backward(y, target, owner)


def _setup_contract_spp(ctx, inputs, output):
    y, target, colors, probe_start, boxes, in_shape, channelwise, eps = inputs
    ctx.eps, ctx.num_args = eps, len(inputs)
    owner = _torch_impl.spp_owner(colors, probe_start, y.shape[1], boxes, in_shape, y.shape[3:], channelwise)
    ctx.save_for_backward(y, target, owner)


def _perturb_backward(ctx, grad_out):
    return grad_out.sum(dim=(0, 1)), None, None, None


def _setup_perturb(ctx, inputs, output):
    pass


if has_extension():
    @torch.library.register_fake("hzo_ext::perturb")
    def _perturb_fake(a, colors, probe_ids, eps):
        return a.new_empty((2, probe_ids.shape[0], *a.shape))

    @torch.library.register_fake("hzo_ext::contract")
    def _contract_fake(y, target, owner, eps):
        num_inputs = torch.library.get_ctx().new_dynamic_size()  # max(owner) + 1: data-dependent
        return y.new_empty((y.shape[2], num_inputs))

    @torch.library.register_fake("hzo_ext::contract_sized")
    def _contract_sized_fake(y, target, owner, eps, num_inputs):
        return y.new_empty((y.shape[2], num_inputs))

    @torch.library.register_fake("hzo_ext::contract_spp")
    def _contract_spp_fake(y, target, colors, probe_start, boxes, in_shape, channelwise, eps):
        return y.new_empty((y.shape[2], math.prod(in_shape)))

    torch.library.register_autograd("hzo_ext::contract_spp", _contract_backward, setup_context=_setup_contract_spp)
    torch.library.register_autograd("hzo_ext::perturb", _perturb_backward, setup_context=_setup_perturb)
    torch.library.register_autograd("hzo_ext::contract", _contract_backward, setup_context=_setup_contract)
    torch.library.register_autograd("hzo_ext::contract_sized", _contract_backward,
                                    setup_context=_setup_contract)
