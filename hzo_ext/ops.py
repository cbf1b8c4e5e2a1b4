"""The hzo_ext torch ops: batched symmetric +-eps perturbation and Jacobian-target contraction.

Each public function here runs the compiled kernel (CPU or CUDA) through the dispatcher when
the extension is loaded, else the pure-PyTorch reference in ``_torch_impl``; both give the
same results and the same argument errors. Fake kernels (torch.compile, and the Meta dispatch
a meta-device argument selects) and autograd formulas are registered here, guarded by the
extension having loaded; the fake kernels make the checks that need no tensor values.
"""
from __future__ import annotations

import math

import torch

from . import _torch_impl
from ._ext import has_extension

__all__ = ["perturb", "contract", "contract_spp", "probe_elementwise", "probe_linear", "probe_conv2d", "probe_layer_norm",
           "probe_softmax", "dense_colors", "dense_owner"]


def perturb(a: torch.Tensor, colors: torch.Tensor, probe_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """Perturbed copies of ``a`` [B, *S]: returns [2, K, B, *S] where copy k adds +eps (first
    half) or -eps (second half) to every coordinate i with ``colors[i] == probe_ids[k]``."""
    if has_extension():
        return torch.ops.hzo_ext.perturb(a, colors, probe_ids, eps)
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
    return _torch_impl.contract_spp(y, target, colors, probe_start, boxes, in_shape, channelwise, eps)


def probe_elementwise(z: torch.Tensor, target: torch.Tensor, eps: float, act: int, alpha: float = 0.0,
                      beta: float = 0.0) -> torch.Tensor:
    """Fused probe of an elementwise piece s (kernel code ``act``, hzo_ext.registry.ACT_CODES;
    alpha/beta its settings): ``target * (s(z + eps) - s(z - eps)) / (2 eps)``, every
    coordinate's +-eps pair and the contraction in one pass, no perturbed copy in memory."""
    if has_extension():
        return torch.ops.hzo_ext.probe_elementwise(z, target, eps, act, alpha, beta)
    return _torch_impl.probe_elementwise(z, target, eps, act, alpha, beta)


def probe_linear(z: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, eps: float, act: int,
                 alpha: float = 0.0, beta: float = 0.0) -> torch.Tensor:
    """Fused probe of a Linear-then-elementwise piece ``s(W a + b)``, z = W a + b [B, Q] the clean
    output, weight = W [Q, K]: ``out[b, k] = sum_q target[b, q] (s(z[b, q] + eps W[q, k]) -
    s(z[b, q] - eps W[q, k])) / (2 eps)``, the perturbation folded through W exactly."""
    if has_extension():
        return torch.ops.hzo_ext.probe_linear(z, weight, target, eps, act, alpha, beta)
    return _torch_impl.probe_linear(z, weight, target, eps, act, alpha, beta)


def probe_conv2d(z: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, in_size, stride=(1, 1),
                 padding=(0, 0), dilation=(1, 1), groups: int = 1, eps: float = 1e-3, act: int = 0,
                 alpha: float = 0.0, beta: float = 0.0) -> torch.Tensor:
    """Fused probe of a Conv2d-then-elementwise piece ``s(conv(a) + bias)``: z = conv(a) + bias
    [B, Cout, Ho, Wo], weight [Cout, Cin / groups, KH, KW], in_size = a's [H, W]. Each input
    coordinate (c, iy, ix) gets the sum over the outputs (o, oy, ox) it feeds through tap (ky, kx)
    of ``target * (s(z + eps W[o, c', ky, kx]) - s(z - eps W[o, c', ky, kx])) / (2 eps)``:
    [B, Cin, H, W], no perturbed copy in memory."""
    args = ([int(v) for v in in_size], [int(v) for v in stride], [int(v) for v in padding],
            [int(v) for v in dilation], int(groups))
    if has_extension():
        return torch.ops.hzo_ext.probe_conv2d(z, weight, target, *args, eps, act, alpha, beta)
    return _torch_impl.probe_conv2d(z, weight, target, *args, eps, act, alpha, beta)


def probe_layer_norm(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, normalized_ndim: int,
                     norm_eps: float, eps) -> torch.Tensor:
    """Fused probe of a layer norm over the last ``normalized_ndim`` axes of x (``weight`` its
    scale or None; its bias cancels): for every coordinate j of a row,
    ``sum_i target_i (LN(x + eps e_j)_i - LN(x - eps e_j)_i) / (2 eps)``, the central difference
    of the whole layer norm, in closed form: moving x_j by +-eps moves the centred row by
    +-eps (e_j - 1/E) and its variance by +-2 eps xc_j / E + eps^2 (E - 1) / E^2, so with
    u = target * weight, r+- = rsqrt(var+- + norm_eps):
    ``(sum(u xc) (r+ - r-) + eps (u_j - sum(u) / E) (r+ + r-)) / (2 eps)``, with
    r+ - r- = -4 eps xc_j / E (r+ r-)^2 / (r+ + r-) written out so that nothing cancels. The
    same numbers as running the layer norm on the 2E perturbed copies (up to their round-off,
    which this form avoids), in O(E) per row instead of O(E^2). ``eps`` is a float or a 0-dim
    tensor (the C++ engine replays this as recorded ATen calls with eps as an input)."""
    dims = tuple(range(-normalized_ndim, 0))
    n = math.prod(x.shape[-normalized_ndim:])
    xc = x - x.mean(dims, keepdim=True)
    var = (xc * xc).mean(dims, keepdim=True)
    u = target if weight is None else target * weight
    moved, drift = 2 * eps * xc / n, eps * eps * (n - 1) / (n * n)
    r_plus = torch.rsqrt(var + moved + drift + norm_eps)
    r_minus = torch.rsqrt(var - moved + drift + norm_eps)
    total, mean = (u * xc).sum(dims, keepdim=True), u.sum(dims, keepdim=True) / n
    r_sum = r_plus + r_minus
    return (u - mean) * r_sum / 2 - 2 * total * xc * (r_plus * r_minus) ** 2 / (n * r_sum)


def probe_softmax(x: torch.Tensor, target: torch.Tensor, dim: int, eps) -> torch.Tensor:
    """Fused probe of a softmax over ``dim``: for every coordinate j of a row,
    ``sum_i target_i (S(x + eps e_j)_i - S(x - eps e_j)_i) / (2 eps)``, the central difference
    of the whole softmax, in closed form: moving x_j by d multiplies exp(x_j) by e^d, so
    ``S(x + d e_j)_i = s_i e^(d [i = j]) / (1 + s_j (e^d - 1))``. With T = sum_i target_i s_i
    and a+- = expm1(+-eps) the difference is
    ``s_j (target_j - T) (a+ - a-) / ((1 + s_j a+) (1 + s_j a-)) / (2 eps)``: nothing cancels,
    a masked (-inf) x_j gives 0, and it is O(n) per row instead of the 2n copies of the row.
    ``eps`` is a float or a 0-dim tensor (the C++ engine replays this as recorded ATen calls)."""
    s = torch.softmax(x, dim)
    total = (target * s).sum(dim, keepdim=True)
    e = eps if isinstance(eps, torch.Tensor) else torch.tensor(eps, dtype=x.dtype, device=x.device)
    a_plus, a_minus = torch.expm1(e), torch.expm1(-e)
    return s * (target - total) * ((a_plus - a_minus) / (2 * e)) / ((1 + s * a_plus) * (1 + s * a_minus))


def dense_colors(num_coords: int, device=None) -> torch.Tensor:
    """The coloring of dense probing: every coordinate its own color."""
    return torch.arange(num_coords, device=device)


def dense_owner(probe_ids: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Owner map of dense probes: every output of probe k is attributed to coordinate probe_ids[k]."""
    return probe_ids.reshape(-1, 1).expand(-1, num_outputs).contiguous()


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
        _torch_impl.check_perturb(a, colors, probe_ids, eps, values=False)
        return a.new_empty((2, probe_ids.shape[0], *a.shape))

    @torch.library.register_fake("hzo_ext::contract")
    def _contract_fake(y, target, owner, eps):
        _torch_impl.check_contract(y, target, owner, eps, None, values=False)
        num_inputs = torch.library.get_ctx().new_dynamic_size()  # max(owner) + 1: data-dependent
        return y.new_empty((y.shape[2], num_inputs))

    @torch.library.register_fake("hzo_ext::contract_sized")
    def _contract_sized_fake(y, target, owner, eps, num_inputs):
        _torch_impl.check_contract(y, target, owner, eps, num_inputs, values=False)
        return y.new_empty((y.shape[2], num_inputs))

    @torch.library.register_fake("hzo_ext::contract_spp")
    def _contract_spp_fake(y, target, colors, probe_start, boxes, in_shape, channelwise, eps):
        _torch_impl.check_contract_spp(y, target, colors, probe_start, boxes, in_shape, channelwise, eps,
                                       values=False)
        return y.new_empty((y.shape[2], math.prod(in_shape)))

    @torch.library.register_fake("hzo_ext::probe_elementwise")
    def _probe_elementwise_fake(z, target, eps, act, alpha, beta):
        _torch_impl.check_probe_elementwise(z, target, eps, act)
        return torch.empty_like(z)

    @torch.library.register_fake("hzo_ext::probe_linear")
    def _probe_linear_fake(z, weight, target, eps, act, alpha, beta):
        _torch_impl.check_probe_linear(z, weight, target, eps, act)
        return z.new_empty((z.shape[0], weight.shape[1]))

    @torch.library.register_fake("hzo_ext::probe_conv2d")
    def _probe_conv2d_fake(z, weight, target, in_size, stride, padding, dilation, groups, eps, act, alpha, beta):
        _torch_impl.check_probe_conv2d(z, weight, target, in_size, stride, padding, dilation, groups, eps, act)
        return z.new_empty((z.shape[0], weight.shape[1] * groups, in_size[0], in_size[1]))

    torch.library.register_autograd("hzo_ext::contract_spp", _contract_backward, setup_context=_setup_contract_spp)
    torch.library.register_autograd("hzo_ext::perturb", _perturb_backward, setup_context=_setup_perturb)
    torch.library.register_autograd("hzo_ext::contract", _contract_backward, setup_context=_setup_contract)
    torch.library.register_autograd("hzo_ext::contract_sized", _contract_backward,
                                    setup_context=_setup_contract)
