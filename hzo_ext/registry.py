"""What hzo_ext knows about each op of a traced graph, in one place.

For every op (a module type, a function, a tensor method name) one entry says how a piece
made of it is probed:

- ``elementwise``: acts on each coordinate of its one tensor input alone. Probed by one
  colored probe (every coordinate at once): ``hzo_ext.ops.probe_elementwise`` when the entry
  has a kernel code (csrc/core/elementwise.h), else by calling the op on the stacked +-eps
  copies. Its settings (negative_slope, ...) are read from the module on every call.
- ``affine``: affine in each tensor input with the others fixed (Linear, Conv, eval
  BatchNorm, pooling by averaging, sums, products, views, slicing, padding, cat). The +-eps
  perturbation folds exactly (``A(a + eps e_k) - A(a - eps e_k) = 2 eps A e_k``), so its
  probe is the transpose ``A^T target``, computed by the op's own VJP (no query).
- everything else is ``probed``: the op is run on perturbed copies of each tensor input
  (SPP-colored where ``hzo_ext.spp`` knows its footprint, else dense), except the inputs
  it is affine in (``affine_args``: the values of attention, ``a`` in ``a / b``), which
  fold, and the input of a layer norm or a softmax (``fused``), which takes one fused probe
  of every coordinate in closed form, ``ops.probe_layer_norm`` / ``ops.probe_softmax``.
  Opaque nodes (``BlackBox``, ``hzo_ext.opaque``, untraceable submodules) are always probed.

An entry also holds the op's SPP footprint (``footprint``: the output positions each input
position can change, ``hzo_ext.footprint``; ``hzo_ext.spp`` composes them over sub-networks)
and, for module types, why it breaks per-sample finite differences as it is set now
(``couples``: BatchNorm or Dropout in training mode, ``batch_first=False``; ``coupling`` is
what ``stages.check_stages_static`` asks). ``DECOMPOSITIONS`` are ops the traced graph holds
as the ops they compute: attention, masked or causal too (its products and mask fold, its
softmax takes the fused probe), eval ``nn.TransformerEncoder`` / ``TransformerEncoderLayer``
and ``MultiheadAttention`` self-attention (cuts inside their layers).

How the C++ executors run an op natively: ``lowering(module)`` gives the description of an
``_C.ExecNode`` (csrc/executor/stages.cpp) for the module types they run as ATen calls, and
``module_for_call`` the module equivalent to a call (``F.relu(x)``, ``torch.flatten(x, 1)``).

``register_elementwise(op, code=None)`` adds an elementwise op: the engine then probes it
with one colored probe, its footprint is the identity, and every engine reads it from here.
"""
from __future__ import annotations

import math
import operator
import types
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import ops
from .footprint import Footprint, NoFootprint, mixing, within_last_axes

__all__ = ["OpEntry", "ELEMENTWISE_CALLS", "SUMS", "ARITHMETIC", "BINARY", "ACT_CODES", "entry_for", "is_view",
           "register_elementwise", "module_for_call", "lowering", "is_stock", "binary_kind", "lookup",
           "DECOMPOSITIONS", "decompose", "CHECKS", "masked_scores", "causal_as_hinted",
           "module_entry", "coupling", "registered"]

# Kernel codes of csrc/core/elementwise.h (enum Act).
ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "gelu_tanh": 4, "tanh": 5, "sigmoid": 6,
             "silu": 7, "hardtanh": 8, "elu": 9, "hardswish": 10, "hardsigmoid": 11, "softplus": 12}

# Calls acting elementwise on their one tensor argument (footprint: identity), each with the
# module whose forward it is where there is one (the C++ executor runs it as that module; None:
# it runs in Python). Strings are tensor methods.
ELEMENTWISE_CALLS = {
    F.relu: nn.ReLU, torch.relu: nn.ReLU, "relu": nn.ReLU, "relu_": nn.ReLU, F.tanh: nn.Tanh, torch.tanh: nn.Tanh,
    "tanh": nn.Tanh, "tanh_": nn.Tanh, F.sigmoid: nn.Sigmoid, torch.sigmoid: nn.Sigmoid, "sigmoid": nn.Sigmoid,
    "sigmoid_": nn.Sigmoid, F.silu: nn.SiLU, F.gelu: nn.GELU, F.hardswish: nn.Hardswish, F.mish: nn.Mish,
    F.relu6: None, F.hardsigmoid: nn.Hardsigmoid, F.hardtanh: None, F.leaky_relu: None, F.elu: None, F.softplus: None,
    F.dropout: None, operator.neg: None, torch.neg: None, "neg": None, torch.abs: None, "abs": None, torch.exp: None,
    "exp": None, "contiguous": None, "clone": None, "clamp": None, "clamp_min": None, "detach": nn.Identity,
    torch.detach: nn.Identity}


def module_for_call(target, args: tuple, kwargs: dict) -> nn.Module | None:
    """The module whose forward computes the call ``target(x, *args[1:], **kwargs)`` on x = args[0]
    (the C++ executor then runs it as that module), or None. Elementwise calls with no other
    argument (GELU: its approximate; in-place flags are ignored: the values are the same),
    ``flatten`` with constant dims, ``adaptive_avg_pool1d/2d`` with a constant size, and a
    check of ``CHECKS`` as the identity."""
    if lookup(CHECKS, target) and len(args) == 1 and not kwargs:
        return nn.Identity()
    if target in (torch.flatten, "flatten"):
        dims = dict(zip(("start_dim", "end_dim"), args[1:]), **kwargs)
        if set(dims) - {"start_dim", "end_dim"} or not all(isinstance(v, int) for v in dims.values()):
            return None
        return nn.Flatten(dims.get("start_dim", 0), dims.get("end_dim", -1))
    if target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d) and len(args) == 2 and not kwargs:
        size = args[1]
        if isinstance(size, int) or (isinstance(size, tuple) and all(isinstance(s, (int, type(None))) for s in size)):
            return (nn.AdaptiveAvgPool1d if target is F.adaptive_avg_pool1d else nn.AdaptiveAvgPool2d)(size)
        return None
    cls = ELEMENTWISE_CALLS.get(target) if isinstance(target, str) or callable(target) else None
    if cls is None or len(args) != 1 or set(kwargs) - {"inplace", "approximate"}:
        return None
    return cls(approximate=kwargs.get("approximate", "none")) if cls is nn.GELU else cls()


# Sums of two tensors (residual adds), and all elementwise arithmetic between tensors.
SUMS = {operator.add, operator.iadd, torch.add, "add", "add_"}
ARITHMETIC = SUMS | {operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv, torch.sub, torch.mul,
                     "sub", "sub_", "mul", "mul_", "div", "div_"}
# Arithmetic the C++ op-level engine runs natively between two values (a + b, a - b, a * b).
BINARY = {**dict.fromkeys(SUMS, "add"), **dict.fromkeys((operator.sub, operator.isub, torch.sub, "sub", "sub_"), "sub"),
          **dict.fromkeys((operator.mul, operator.imul, torch.mul, "mul", "mul_"), "mul")}


def lookup(table, target, default=None):
    """``table[target]`` (a dict) or ``target in table`` (a set), ``default`` for an unhashable
    target (a callable object used as an fx target)."""
    try:
        return table.get(target, default) if isinstance(table, dict) else target in table
    except TypeError:
        return default


def binary_kind(target) -> str:
    """"add", "sub" or "mul" for arithmetic between two values the C++ engine runs natively, else ""."""
    return lookup(BINARY, target, "")


@dataclass(frozen=True)
class OpEntry:
    """How a piece made of one op is probed (see the module docstring). ``kernel(module)`` gives
    (code, alpha, beta) for ``ops.probe_elementwise`` from a module's settings, or None.
    ``footprint(site, arg, in_sizes, out_shape)``: the op's SPP footprint (``hzo_ext.footprint``)
    on spatial input sizes ``in_sizes``, ``site`` the module (arg, out_shape None) or the fx
    node (arg: the input probed, out_shape: the per-sample output shape); raises NoFootprint
    saying why when it has none there. ``couples(module)``: why the module, as it is set now,
    breaks per-sample finite differences (mixes samples, or draws randomness per call), or None."""
    kind: str  # "elementwise", "affine" or "probed"
    kernel: object = None
    affine_args: tuple | None = None  # affine only in these positional args (None: in all); a probed
                                      # op folds the inputs found only there
    footprint: object = None
    couples: object = None
    lower: object = None  # lower(module): how the C++ executors run it natively (``lowering``), or None
    fused: object = None  # fused(site, arg): (probe, tensors) when input arg takes one fused probe,
                          # probe(a, target, eps, *tensors) -> its target (ops.probe_layer_norm, probe_softmax;
                          # tensors: the op's own, or fx nodes of them), else None
    masks: bool = False  # its -inf outputs are masked entries (attention scores), not an overflow


def _fixed(name):
    return lambda m=None: (ACT_CODES[name], 0.0, 0.0)


def _identity(site, arg, in_sizes, out_shape) -> Footprint:
    return Footprint.identity(in_sizes)


def _elementwise(kernel=None):
    return OpEntry("elementwise", kernel, footprint=_identity)


_AFFINE = OpEntry("affine")
_MODULES: dict = {
    nn.ReLU: _elementwise(_fixed("relu")),
    nn.LeakyReLU: _elementwise(lambda m: (ACT_CODES["leaky_relu"], float(m.negative_slope), 0.0)),
    nn.GELU: _elementwise(lambda m: (ACT_CODES["gelu_tanh" if m.approximate == "tanh" else "gelu"], 0.0, 0.0)),
    nn.Tanh: _elementwise(_fixed("tanh")), nn.Sigmoid: _elementwise(_fixed("sigmoid")),
    nn.SiLU: _elementwise(_fixed("silu")),
    nn.Hardtanh: _elementwise(lambda m: (ACT_CODES["hardtanh"], float(m.min_val), float(m.max_val))),  # ReLU6 too
    nn.ELU: _elementwise(lambda m: (ACT_CODES["elu"], float(m.alpha), 0.0)),
    nn.Hardswish: _elementwise(_fixed("hardswish")), nn.Hardsigmoid: _elementwise(_fixed("hardsigmoid")),
    nn.Softplus: _elementwise(lambda m: (ACT_CODES["softplus"], float(m.beta), float(m.threshold))),
    nn.Mish: _elementwise(),
}
for _t in (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
           nn.ConvTranspose3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.ZeroPad2d, nn.ConstantPad1d,
           nn.ConstantPad2d, nn.ConstantPad3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout,
           nn.Dropout1d, nn.Dropout2d, nn.Dropout3d):
    _MODULES[_t] = _AFFINE  # BatchNorm/Dropout: in eval mode (training mode is refused by the stage checks)

_CALLS: dict = {
    F.relu: _elementwise(_fixed("relu")), torch.relu: _elementwise(_fixed("relu")),
    "relu": _elementwise(_fixed("relu")), "relu_": _elementwise(_fixed("relu")),
    torch.tanh: _elementwise(_fixed("tanh")), F.tanh: _elementwise(_fixed("tanh")), "tanh": _elementwise(_fixed("tanh")),
    torch.sigmoid: _elementwise(_fixed("sigmoid")), F.sigmoid: _elementwise(_fixed("sigmoid")),
    "sigmoid": _elementwise(_fixed("sigmoid")), F.silu: _elementwise(), F.gelu: _elementwise(),
    # a stop-gradient is an identity on the values (graph.trace warns): one fused probe copies the target
    "detach": _elementwise(_fixed("identity")), torch.detach: _elementwise(_fixed("identity")),
}
for _c in ELEMENTWISE_CALLS:
    _CALLS.setdefault(_c, _elementwise())
for _c in (operator.add, operator.iadd, operator.sub, operator.isub, operator.neg, operator.mul, operator.imul,
           operator.matmul, operator.getitem, torch.add, torch.sub, torch.mul, torch.neg, torch.matmul, torch.bmm,
           getattr, torch.flatten, torch.cat, torch.stack, torch.mean, torch.sum, torch.transpose, torch.permute, torch.reshape,
           torch.squeeze, torch.unsqueeze, F.linear, F.conv1d, F.conv2d, F.conv3d, F.avg_pool1d, F.avg_pool2d,
           F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.dropout, F.pad,
           torch.unbind, torch.chunk, torch.split, "unbind", "chunk", "split",
           "add", "add_", "sub", "sub_", "mul", "mul_", "neg", "matmul", "flatten", "view", "reshape", "permute",
           "transpose", "contiguous", "clone", "unsqueeze", "squeeze", "unflatten", torch.unflatten, "mean", "sum",
           "expand", "expand_as",
           "float", "double", "half", "bfloat16", "to", "type_as"):  # casts: the VJP casts the target back
    _CALLS[_c] = _AFFINE
for _c in (operator.truediv, operator.itruediv, torch.div, "div", "div_"):
    _CALLS[_c] = OpEntry("affine", affine_args=(0,))  # a / b is affine in a only
_PROBED = OpEntry("probed")
# Probed ops affine in some inputs: those fold (the VJP), the others are probed.
_CALLS[F.scaled_dot_product_attention] = OpEntry("probed", affine_args=(2,))  # a weighted sum of the values


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_LAYER_NORM_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")


def _causal_keep(like: torch.Tensor) -> torch.Tensor:
    """The causal mask for scores or masks like ``like`` [..., L, S]: True where key j <= query i."""
    return torch.ones(like.shape[-2:], dtype=torch.bool, device=like.device).tril()


def causal_as_hinted(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (an ``nn.MultiheadAttention`` attn_mask [.., L, S]) when it is the causal mask:
    ``is_causal=True`` beside it is torch's hint that it is, and torch then runs its causal
    kernel or the mask depending on the path (grad mode, need_weights, its fast path), so any
    other mask leaves the model without one function to differentiate (a ValueError)."""
    keep = _causal_keep(mask)
    causal = keep.logical_not() if mask.dtype == torch.bool else \
        torch.zeros(keep.shape, dtype=mask.dtype, device=mask.device).masked_fill(keep.logical_not(), -math.inf)
    if not bool((mask == causal).all()):
        raise ValueError("is_causal=True with an attention mask that is not causal: torch then runs the causal "
                         "kernel or the mask depending on grad mode and its fast path, so the model has no one "
                         "function to differentiate; pass is_causal=False, or the causal mask")
    return mask


def masked_scores(scores: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                  as_mha: bool = False) -> torch.Tensor:
    """Attention scores [..., L, S] masked as ``scaled_dot_product_attention`` masks them: a
    bool mask keeps its True entries (the others -inf), a float mask is added, ``causal`` keeps
    key j <= query i. ``as_mha``: the mask as ``nn.MultiheadAttention`` takes it (a bool mask's
    True entries are the ones masked; a 3-d mask [B * heads, L, S] is [B, heads, L, S]).
    Affine in the scores (a decomposed attention folds it)."""
    if causal:
        mask = _causal_keep(scores)
    elif as_mha and mask.dim() == 3:
        mask = mask.unflatten(0, (-1, scores.shape[-3]))
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask if as_mha and not causal else mask.logical_not(), float("-inf"))
    return scores + mask


_CALLS[masked_scores] = OpEntry("affine", affine_args=(0,), masks=True)  # the mask: a constant or a flag
_CALLS[causal_as_hinted] = _AFFINE  # the identity on a mask
# Checks that return their argument itself: the C++ engine runs them as the identity (the Python
# forward of each input shape, which precedes it, checked the value), and a recorded op reading
# one reads the checked tensor.
CHECKS = {causal_as_hinted}
for _c in (torch.masked_fill, "masked_fill", "masked_fill_"):  # x.masked_fill(mask, -inf) as users mask scores
    _CALLS[_c] = OpEntry("affine", affine_args=(0,), masks=True)


def _attention_ops(graph: fx.Graph, q: fx.Node, k: fx.Node, v: fx.Node, scale=None, mask: fx.Node | None = None,
                   causal: bool = False, as_mha: bool = False, causal_hint: bool = False) -> fx.Node:
    """``softmax(masked_scores(q @ k^T * scale)) @ v`` (``masked_scores`` for the mask)."""
    # q and k each scaled by sqrt(scale) before their product, as torch's math path does
    # (float16 products of unscaled rows overflow where the fused kernel does not); a scale
    # computed at run time or not positive scales q alone
    kt = graph.call_method("transpose", (k, -2, -1))
    if scale is None:  # torch's default 1 / sqrt(E), E the queries' last size
        scale = root = graph.call_function(operator.pow, (graph.call_method("size", (q, -1)), -0.25))
    else:
        root = scale ** 0.5 if isinstance(scale, (int, float)) and scale > 0 else None
    q = graph.call_function(operator.mul, (q, scale if root is None else root))
    kt = kt if root is None else graph.call_function(operator.mul, (kt, root))
    scores = graph.call_function(torch.matmul, (q, kt))
    if mask is not None and causal_hint:
        mask = graph.call_function(causal_as_hinted, (mask,))
    if mask is not None or causal:
        scores = graph.call_function(masked_scores, (scores, mask, causal, as_mha))
    return graph.call_function(torch.matmul, (graph.call_function(torch.softmax, (scores, -1)), v))


def _attention_steps(graph: fx.Graph, n: fx.Node) -> fx.Node | None:
    """``scaled_dot_product_attention(q, k, v)`` without dropout or GQA as the ops it computes
    (``_attention_ops``): the products and the mask fold, and only the softmax is probed, by
    its fused probe (a masked score stays -inf, so its difference is 0). Probed whole, a key
    moves every output row of its head: L*E probes, each running the whole attention."""
    bound = _call_args(n, _SDPA_ARGS)
    mask, causal = bound.get("attn_mask"), bound.get("is_causal", False)
    if set(bound) - set(_SDPA_ARGS) or bound.get("dropout_p", 0.0) != 0 or causal not in (False, True) \
            or (causal and mask is not None) or not isinstance(mask, (fx.Node, type(None))) \
            or bound.get("enable_gqa", False) is not False:
        return None  # (torch refuses a mask with is_causal=True)
    with graph.inserting_before(n):
        return _attention_ops(graph, bound["query"], bound["key"], bound["value"], bound.get("scale"), mask, causal)


def _as_built(module: nn.Module) -> bool:
    """Runs its class's forward (none set on the instance), without hooks, in eval mode."""
    return "forward" not in module.__dict__ and not module._forward_hooks and not module._forward_pre_hooks \
        and not module.training


def _plain_self_attention(mha) -> bool:
    """Batch-first self-attention with packed projections, no extra keys, stock and in eval."""
    return type(mha) is nn.MultiheadAttention and mha.batch_first and mha._qkv_same_embed_dim and \
        mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn and \
        type(mha.out_proj) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear) and \
        all(map(_as_built, mha.modules()))


def _plain_encoder_layer(layer) -> bool:
    """An eval TransformerEncoderLayer (every submodule stock and in eval: its dropouts are
    dropped from the graph) whose activation is a module or a plain function."""
    return type(layer) is nn.TransformerEncoderLayer and all(map(_as_built, layer.modules())) and \
        _plain_self_attention(layer.self_attn) and \
        isinstance(layer.activation, (nn.Module, types.FunctionType, types.BuiltinFunctionType))


def _self_attention_ops(graph: fx.Graph, attr, x: fx.Node, prefix: str, mha: nn.MultiheadAttention,
                        mask: fx.Node | None, causal_hint: bool) -> fx.Node:
    """``mha(x, x, x, attn_mask=mask)[0]`` (``_plain_self_attention``) as ops: the projections are
    linear ops on its parameters, the heads views, then ``_attention_ops``."""
    qkv = graph.call_function(F.linear, (x, attr(f"{prefix}.in_proj_weight"), attr(f"{prefix}.in_proj_bias")))
    chunks = graph.call_method("chunk", (qkv, 3, -1))
    heads = [graph.call_method("transpose", (graph.call_method("unflatten", (
        graph.call_function(operator.getitem, (chunks, i)), -1, (mha.num_heads, mha.head_dim))), 1, 2))
        for i in range(3)]
    out = _attention_ops(graph, *heads, mask=mask, as_mha=True, causal_hint=causal_hint)
    out = graph.call_method("flatten", (graph.call_method("transpose", (out, 1, 2)), -2))
    return graph.call_function(F.linear, (out, attr(f"{prefix}.out_proj.weight"), attr(f"{prefix}.out_proj.bias")))


def _encoder_layer_ops(graph: fx.Graph, attr, x: fx.Node, prefix: str, layer, mask: fx.Node | None,
                       causal_hint: bool) -> fx.Node:
    """A ``_plain_encoder_layer`` as the ops of its forward (post- or pre-norm): its
    self-attention (``_self_attention_ops``); its norms, linears and activation stay modules or
    calls of the traced graph, so cuts fall between them."""
    def module(name, v):
        return graph.call_module(f"{prefix}.{name}", (v,))

    def feed_forward(v):
        h = module("linear1", v)
        h = module("activation", h) if isinstance(layer.activation, nn.Module) else \
            graph.call_function(layer.activation, (h,))
        return module("linear2", h)

    def attention(v):
        return _self_attention_ops(graph, attr, v, f"{prefix}.self_attn", layer.self_attn, mask, causal_hint)

    if layer.norm_first:
        x = graph.call_function(operator.add, (x, attention(module("norm1", x))))
        return graph.call_function(operator.add, (x, feed_forward(module("norm2", x))))
    x = module("norm1", graph.call_function(operator.add, (x, attention(x))))
    return module("norm2", graph.call_function(operator.add, (x, feed_forward(x))))


def _attention_mask(bound: dict, mask_name: str, padding_name: str) -> tuple[bool, fx.Node | None, bool]:
    """(decomposable, attn_mask, causal hint) of a self-attention module's call: an attention
    mask (a node) or none, no key padding mask. ``is_causal=True`` is a hint that the mask is
    causal: the mask is used, checked to be causal (``masked_scores``); without a mask torch
    refuses the hint."""
    mask, hint = bound.get(mask_name), bound.get("is_causal") is True
    ok = bound.get(padding_name) is None and isinstance(mask, (fx.Node, type(None))) and (mask is not None or not hint)
    return ok, mask, hint


def _encoder_layer_steps(graph: fx.Graph, n: fx.Node, layer, attr) -> fx.Node | None:
    bound = dict(zip(("src", "src_mask", "src_key_padding_mask", "is_causal"), n.args), **n.kwargs)
    ok, mask, hint = _attention_mask(bound, "src_mask", "src_key_padding_mask")
    if not (ok and _plain_encoder_layer(layer)):
        return None  # a key padding mask, or a layer set otherwise: run whole
    with graph.inserting_before(n):
        return _encoder_layer_ops(graph, attr, bound["src"], n.target, layer, mask, hint)


def _encoder_steps(graph: fx.Graph, n: fx.Node, encoder, attr) -> fx.Node | None:
    """An eval ``nn.TransformerEncoder`` without key padding mask: its layers
    (``_encoder_layer_ops``), then its norm."""
    bound = dict(zip(("src", "mask", "src_key_padding_mask", "is_causal"), n.args), **n.kwargs)
    ok, mask, hint = _attention_mask(bound, "mask", "src_key_padding_mask")
    if not (ok and type(encoder) is nn.TransformerEncoder and _as_built(encoder)
            and all(map(_plain_encoder_layer, encoder.layers))):
        return None
    with graph.inserting_before(n):
        x = bound["src"]
        for i, layer in enumerate(encoder.layers):
            x = _encoder_layer_ops(graph, attr, x, f"{n.target}.layers.{i}", layer, mask, hint)
        return x if encoder.norm is None else graph.call_module(f"{n.target}.norm", (x,))


def _self_attention_steps(graph: fx.Graph, n: fx.Node, mha, attr) -> fx.Node | None:
    """``out, _ = mha(x, x, x)``: self-attention without key padding mask whose weights nobody
    reads, as ``_self_attention_ops``; the items read as ``[0]`` become its output."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    bound = dict(zip(names, n.args), **n.kwargs)
    ok, mask, hint = _attention_mask(bound, "attn_mask", "key_padding_mask")
    items = [(u, u.args[1]) for u in n.users if u.op == "call_function" and u.target is operator.getitem]
    if not (ok and _plain_self_attention(mha) and bound.get("query") is bound.get("key") is bound.get("value")
            and len(items) == len(n.users) and all(i == 0 or (i == 1 and not u.users) for u, i in items)):
        return None
    with graph.inserting_before(n):
        out = _self_attention_ops(graph, attr, bound["query"], n.target, mha, mask, hint)
    for u, i in items:
        u.replace_all_uses_with(out)
        graph.erase_node(u)
    return out


# Ops the traced graph holds as the ops they compute (graph.trace), where that probes far less
# or lets the cuts fall inside: fn(graph, node, module, attr) -> the node computing the same
# value, inserted before it, or None to keep the op whole (``attr(path)``: a get_attr node of
# the tensor at path under its first name, so a tensor reached twice is one parameter). Modules
# first (their ops may hold calls decomposed next); module types by exact type.
DECOMPOSITIONS = {nn.TransformerEncoder: _encoder_steps, nn.TransformerEncoderLayer: _encoder_layer_steps,
                  nn.MultiheadAttention: _self_attention_steps,
                  F.scaled_dot_product_attention: lambda graph, n, module, attr: _attention_steps(graph, n)}


def decompose(graph: fx.Graph, root: nn.Module) -> None:
    """Replace the ops of ``DECOMPOSITIONS`` in ``graph`` (traced from ``root``) by the ops they
    compute: module calls first, then function calls (those the modules' ops hold too)."""
    first_name = {id(t): name for name, t in reversed(list(root.named_parameters(remove_duplicate=False)) +
                                                      list(root.named_buffers(remove_duplicate=False)))}

    def attr(path: str) -> fx.Node | None:
        owner, _, name = path.rpartition(".")
        t = getattr(root.get_submodule(owner), name)
        return None if t is None else graph.get_attr(first_name.get(id(t), path))

    for kind in ("call_module", "call_function"):
        for n in list(graph.nodes):
            if n.op != kind:
                continue
            mod = root.get_submodule(n.target) if kind == "call_module" else None
            fn = DECOMPOSITIONS.get(type(mod)) if mod is not None else lookup(DECOMPOSITIONS, n.target)
            new = fn(graph, n, mod, attr) if fn is not None else None
            if new is not None:
                n.replace_all_uses_with(new)
                graph.erase_node(n)


# ---- footprints (SPP) and sample coupling of the ops above --------------------------------------

def _conv(mod, arg, in_sizes, out_shape) -> Footprint:
    if mod.padding_mode != "zeros":
        raise NoFootprint("", f"padding_mode={mod.padding_mode!r} (only 'zeros' is supported)")
    depthwise = mod.groups == mod.in_channels == mod.out_channels
    if mod.padding == "same":  # stride 1; torch puts the odd extra padding element on the right
        left = [d * (k - 1) // 2 for k, d in zip(mod.kernel_size, mod.dilation)]
        return Footprint.window(in_sizes, mod.kernel_size, 1, left, mod.dilation, out_sizes=in_sizes,
                                 channelwise=depthwise)
    pad = 0 if mod.padding == "valid" else mod.padding
    return Footprint.window(in_sizes, mod.kernel_size, mod.stride, pad, mod.dilation, channelwise=depthwise)


def _pool(mod, arg, in_sizes, out_shape) -> Footprint:
    return Footprint.window(in_sizes, mod.kernel_size, mod.stride or mod.kernel_size, mod.padding,
                             getattr(mod, "dilation", 1), mod.ceil_mode, channelwise=True)


def _adaptive_pool(mod, arg, in_sizes, out_shape) -> Footprint:
    r = len(in_sizes)
    sizes = mod.output_size if isinstance(mod.output_size, (tuple, list)) else (mod.output_size,) * r
    if len(sizes) != r:
        raise NoFootprint("", f"output size {mod.output_size} on {r} spatial axes")
    return Footprint.adaptive(in_sizes, [n if o is None else int(o) for n, o in zip(in_sizes, sizes)])  # None: kept


def _batch_norm(mod, arg, in_sizes, out_shape) -> Footprint:
    if mod.training or mod.running_mean is None:
        raise NoFootprint("", "batch statistics (training mode)")
    return Footprint.identity(in_sizes)  # eval mode with running statistics: per-channel affine


def _dropout(mod, arg, in_sizes, out_shape) -> Footprint:
    if mod.training and mod.p != 0:
        raise NoFootprint("", "dropout in training mode")
    return Footprint.identity(in_sizes)


def _last_axes(in_sizes, shape) -> Footprint:
    """layer norm over ``shape``: within each channel when it is the last axes of the input."""
    r = len(in_sizes)
    if not (all(type(v) is int for v in shape) and 0 < len(shape) <= r and tuple(shape) == in_sizes[r - len(shape):]):
        raise NoFootprint("", f"normalized over {tuple(shape)}, not the last axes of {tuple(in_sizes)}")
    return within_last_axes(in_sizes, len(shape))


def _last_axis(in_sizes, dim) -> Footprint:
    """softmax over ``dim``: within each channel when it is the last axis of [B, C, *S] (r + 1)."""
    if dim not in (-1, len(in_sizes) + 1):
        raise NoFootprint("", f"softmax over dim {dim}, not the last axis")
    return within_last_axes(in_sizes, 1)


def _flatten_ones(site, arg, in_sizes, out_shape) -> Footprint:
    """Flattening [C, 1, .., 1] to [C]: the same elements (the footprint keeps the sizes as 1s)."""
    to_c = out_shape is None and site.start_dim == 1 and site.end_dim == -1 if isinstance(site, nn.Module) \
        else out_shape is not None and len(out_shape) == 1
    if not (to_c and all(n == 1 for n in in_sizes)):
        raise NoFootprint("", "it reshapes spatial axes")
    return Footprint.identity(in_sizes)


def _call_args(n: fx.Node, names: tuple, arg: fx.Node | None = None) -> dict:
    """The call's arguments by name; with ``arg``, NoFootprint unless arg is the first."""
    bound = dict(zip(names, n.args), **n.kwargs)
    if arg is not None and bound.get(names[0]) is not arg:
        raise NoFootprint("", f"probed in its argument {arg.name}, not in {names[0]}")
    return bound


def _layer_norm_shape(bound: dict) -> tuple | None:
    """F.layer_norm's normalized_shape as a tuple of ints, or None (sizes computed at run time)."""
    shape = bound.get("normalized_shape")
    shape = (shape,) if type(shape) is int else shape
    return tuple(shape) if isinstance(shape, (tuple, list)) and shape and all(type(v) is int for v in shape) \
        else None


def _layer_norm_call(n, arg, in_sizes, out_shape) -> Footprint:
    shape = _layer_norm_shape(_call_args(n, _LAYER_NORM_ARGS, arg))
    if shape is None:
        raise NoFootprint("", "normalized over sizes computed at run time")
    return _last_axes(in_sizes, shape)


def _layer_norm_probe(normalized_ndim: int, norm_eps: float):
    def probe(a, target, eps, *weight):
        return ops.probe_layer_norm(a, target, weight[0] if weight else None, normalized_ndim, norm_eps, eps)
    return probe


def _layer_norm_module_fused(m, arg) -> tuple:
    return _layer_norm_probe(len(m.normalized_shape), float(m.eps)), [] if m.weight is None else [m.weight]


def _layer_norm_call_fused(n, arg) -> tuple | None:
    bound = dict(zip(_LAYER_NORM_ARGS, n.args), **n.kwargs)
    shape, norm_eps, weight = _layer_norm_shape(bound), bound.get("eps", 1e-5), bound.get("weight")
    if bound.get("input") is not arg or shape is None or type(norm_eps) is not float:
        return None  # sizes computed at run time, or probed in its weight or bias
    return _layer_norm_probe(len(shape), norm_eps), [] if weight is None else [weight]


def _softmax_call(n, arg, in_sizes, out_shape) -> Footprint:
    return _last_axis(in_sizes, _call_args(n, ("input", "dim"), arg).get("dim"))


def _softmax_probe(dim: int):
    return lambda a, target, eps: ops.probe_softmax(a, target, dim, eps)


def _softmax_module_fused(m, arg) -> tuple | None:
    return None if type(m.dim) is not int else (_softmax_probe(m.dim), [])  # dim=None: torch guesses it


def _softmax_call_fused(n, arg) -> tuple | None:
    names = ("input", "dim", "_stacklevel", "dtype") if n.target is F.softmax else ("input", "dim", "dtype")
    bound = dict(zip(names, n.args), **n.kwargs)
    if bound.get("input") is not arg or type(bound.get("dim")) is not int or bound.get("dtype") is not None \
            or set(bound) - set(names):
        return None  # the dim guessed, a dtype cast, or other arguments: probed as other ops are
    return _softmax_probe(bound["dim"]), []


def _slicing(n, arg, in_sizes, out_shape) -> Footprint:
    """``x[:, c, s_1, .., s_r]`` with basic slices: a stride-s window of size 1 per axis."""
    index = _call_args(n, ("input", "index"), arg)["index"]
    index = index if isinstance(index, tuple) else (index,)
    r = len(in_sizes)
    if not all(isinstance(i, slice) for i in index) or len(index) > r + 2 or index[0] != slice(None):
        raise NoFootprint("", f"indexing {index!r} (only basic slices of [B, C, *spatial])")
    starts, steps = [], []
    for sl, size in zip(list(index[2:]) + [slice(None)] * (r - len(index[2:])), in_sizes):
        start, _, step = sl.indices(size)
        if step < 1:
            raise NoFootprint("", f"slice {sl} with a negative step")
        starts.append(start)
        steps.append(step)
    channels_kept = len(index) < 2 or index[1] == slice(None)
    return Footprint.window(in_sizes, 1, steps, [-p for p in starts], out_sizes=out_shape[1:],
                            channelwise=channels_kept)


def _pad(n, arg, in_sizes, out_shape) -> Footprint:
    """Constant ``F.pad``: each spatial axis shifts by its left padding; padded channels make the
    footprint non-channelwise (output channel c reads another input channel)."""
    bound = _call_args(n, ("input", "pad", "mode", "value"), arg)
    pad, mode = list(bound["pad"]), bound.get("mode", "constant")
    if mode != "constant" or any(not isinstance(p, int) or p < 0 for p in pad):
        raise NoFootprint("", f"F.pad mode={mode!r} pad={pad} (only constant, non-negative)")
    r = len(in_sizes)
    lefts = [0] * (r + 1)  # channel axis, then spatial axes
    for k in range(len(pad) // 2):
        lefts[r - k] = pad[2 * k]
    pads_channels = len(pad) > 2 * r and (pad[2 * r] or pad[2 * r + 1])
    return Footprint.window(in_sizes, 1, 1, lefts[1:], out_sizes=out_shape[1:], channelwise=not pads_channels)


def _pool_call(nd: int, adaptive: bool):
    def footprint(n, arg, in_sizes, out_shape) -> Footprint:
        if len(in_sizes) != nd:
            raise NoFootprint("", f"{nd}-d pooling on {len(in_sizes)} spatial axes")
        if not (adaptive or all(k == 1 for k in out_shape[1:])):  # global pooling, whatever the kernel
            raise NoFootprint("", "a non-global functional pooling (use the nn module)")
        return Footprint.adaptive(in_sizes, out_shape[1:])
    return footprint


def _attention(n, arg, in_sizes, out_shape) -> Footprint:
    """On [heads, L, E] without mask, dropout or GQA: a query row changes its own output row
    only, a key or value every row of its head."""
    bound = _call_args(n, _SDPA_ARGS)
    plain = bound.get("attn_mask") is None and bound.get("dropout_p", 0.0) == 0 and not bound.get("enable_gqa")
    roles = [k for k in ("query", "key", "value") if bound.get(k) is arg]
    if len(in_sizes) != 2 or not plain or not roles:
        raise NoFootprint("", "attention with a mask, dropout or GQA, or not on [heads, L, E]")
    keeps_rows = roles == ["query"] and out_shape[1] == in_sizes[0]  # axis 0 kept when L matches
    return mixing(in_sizes, tuple(out_shape[1:]), (1,) if keeps_rows else (0, 1))


_SAMPLE_MIXING = (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                  nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.RNNBase)


def _batch_statistics(mod) -> str | None:
    return None if not mod.training else (
        f"{type(mod).__name__} in training mode mixes the samples of a batch; call .eval() on it (running "
        f"statistics) or use a per-sample norm (LayerNorm, GroupNorm)")


def _random_mask(mod) -> str | None:
    return None if not (mod.training and mod.p > 0) else (
        f"{type(mod).__name__} in training mode draws a new mask per query, so the +eps and -eps copies "
        f"see different networks; call .eval() on it or remove it")


def _sequence_first(mod) -> str | None:
    return None if getattr(mod, "batch_first", True) is True else (
        f"{type(mod).__name__} with batch_first=False mixes the samples of a batch (the perturbed copies "
        f"are stacked along dim 0); build it with batch_first=True")


def _know(table: dict, keys, **facts) -> None:
    """Add ``facts`` (footprint, couples) to the entries of ``keys`` (probed when unregistered)."""
    for key in keys:
        table[key] = replace(table.get(key, _PROBED), **facts)


_know(_MODULES, (nn.Identity,), footprint=_identity)
_know(_MODULES, (nn.Conv1d, nn.Conv2d, nn.Conv3d), footprint=_conv)
_know(_MODULES, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
      footprint=_pool)
_know(_MODULES, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), footprint=_adaptive_pool)
_know(_MODULES, (nn.modules.batchnorm._BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
      footprint=_batch_norm, couples=_batch_statistics)
_know(_MODULES, (nn.modules.dropout._DropoutNd, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d),
      footprint=_dropout, couples=_random_mask)
_know(_MODULES, (nn.LayerNorm,), footprint=lambda m, a, s, o: _last_axes(s, tuple(m.normalized_shape)))
_know(_MODULES, (nn.Softmax, nn.LogSoftmax), footprint=lambda m, a, s, o: _last_axis(s, m.dim))
_know(_MODULES, (nn.Softmax,), fused=_softmax_module_fused)
_know(_MODULES, (nn.Flatten,), footprint=_flatten_ones)
_know(_MODULES, (nn.LayerNorm,), fused=_layer_norm_module_fused)
_know(_MODULES, _SAMPLE_MIXING, couples=_sequence_first)

_know(_CALLS, (operator.getitem,), footprint=_slicing)
_know(_CALLS, (F.pad,), footprint=_pad)
_know(_CALLS, (torch.flatten, "flatten", "view", "reshape"), footprint=_flatten_ones)
for _nd in (1, 2, 3):
    _know(_CALLS, (getattr(F, f"avg_pool{_nd}d"), getattr(F, f"max_pool{_nd}d")), footprint=_pool_call(_nd, False))
    _know(_CALLS, (getattr(F, f"adaptive_avg_pool{_nd}d"), getattr(F, f"adaptive_max_pool{_nd}d")),
          footprint=_pool_call(_nd, True))
_know(_CALLS, (F.layer_norm,), footprint=_layer_norm_call, fused=_layer_norm_call_fused)
_know(_CALLS, (F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, "softmax", "log_softmax"),
      footprint=_softmax_call)
_know(_CALLS, (F.softmax, torch.softmax, "softmax"), fused=_softmax_call_fused)
_know(_CALLS, (F.scaled_dot_product_attention,), footprint=_attention)
_know(_CALLS, [c for c in ELEMENTWISE_CALLS if _CALLS[c].footprint is None], footprint=_identity)  # neg, clone


# Ops whose output shares its input's storage (no memory of their own in the plan's prediction).
_VIEW_CALLS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "unsqueeze", "squeeze", "expand",
               "expand_as", torch.unflatten,
               operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
               torch.unsqueeze}
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)


def is_view(op: str, target, module: nn.Module | None) -> bool:
    """The op returns a view of its input (for memory predictions)."""
    if op == "call_module":
        return isinstance(module, _VIEW_MODULES)
    return lookup(_VIEW_CALLS, target, False)


def register_elementwise(op, code: int | str | None = None) -> None:
    """Register ``op`` (a module type, a function or a tensor method name) as elementwise: one
    colored probe per piece it forms, elementwise SPP footprint. ``code``: a kernel of
    csrc/core/elementwise.h (a name of ``ACT_CODES`` or its number), else the op is called on
    the stacked +-eps copies."""
    if isinstance(code, str):
        code = ACT_CODES[code]
    kernel = None if code is None else (lambda m=None, c=code: (c, 0.0, 0.0))
    if isinstance(op, type) and issubclass(op, nn.Module):
        _MODULES[op] = _elementwise(kernel)
    else:
        _CALLS[op] = _elementwise(kernel)
        ELEMENTWISE_CALLS.setdefault(op, None)


def _registered_class(module: nn.Module) -> type | None:
    return next((cls for cls in type(module).__mro__ if cls in _MODULES), None)


def registered(cls: type) -> bool:
    """``cls`` itself (not only a parent class) has an entry."""
    return cls in _MODULES


def module_entry(module: nn.Module) -> OpEntry:
    """The entry of ``module``'s nearest registered class, whatever its forward (the footprint
    and coupling knowledge; ``entry_for`` says how the module is probed)."""
    cls = _registered_class(module)
    return _PROBED if cls is None else _MODULES[cls]


def coupling(module: nn.Module) -> str | None:
    """Why ``module`` as it is set now breaks per-sample finite differences, or None."""
    couples = module_entry(module).couples
    return couples(module) if couples is not None else None


def entry_for(op: str, target, module: nn.Module | None, inplace_kw: bool = False) -> OpEntry:
    """The entry of an fx node (op, target), ``module`` the called submodule for call_module.
    Opaque modules and modules that override their class's forward are probed. A module whose
    class is registered only through a parent class counts only when it keeps the parent's
    forward (a subclass with its own forward is probed)."""
    from .graph import is_opaque  # graph imports this module
    if op == "call_module":
        cls = None if module is None or is_opaque(module) else _registered_class(module)
        if cls is None or type(module).forward is not cls.forward or "forward" in module.__dict__ \
                or getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None):
            return _PROBED
        if isinstance(module, nn.modules.conv._ConvNd) and \
                type(module)._conv_forward is not getattr(cls, "_conv_forward", None):
            return _PROBED
        return _MODULES[cls]
    if op in ("call_function", "call_method"):
        return lookup(_CALLS, target, _PROBED)
    return _PROBED


# ---- how the C++ executors run a module (the ExecNode kinds of csrc/executor/stages.cpp) ----------

def is_stock(mod: nn.Module, cls: type, *methods: str) -> bool:
    """mod runs cls's own forward (and the named helper methods): no subclass override, no
    forward set on the instance."""
    return "forward" not in mod.__dict__ and all(getattr(type(mod), m) is getattr(cls, m)
                                                 for m in ("forward",) + methods)


def _tup(v, nd: int) -> list[int]:
    v = list(v) if isinstance(v, (tuple, list)) else [v] * nd
    return [int(x) for x in v]


def lowering(mod: nn.Module) -> tuple | None:
    """(kind, tensors, ints, floats, text) of the ExecNode calling the ATen op ``mod``'s forward
    calls (its entry's ``lower``), with the module's own tensors (an optimizer's updates are
    seen), or None."""
    if "forward" in mod.__dict__:  # a forward set on the instance runs in Python
        return None
    lower = module_entry(mod).lower
    return lower(mod) if lower is not None else None


def _lower_linear(m):
    return ("linear", [m.weight, m.bias], [], [], "") if is_stock(m, nn.Linear) else None


def _lower_conv(cls, nd):
    def lower(m):
        if not is_stock(m, cls, "_conv_forward") or m.padding_mode != "zeros":
            return None
        text = m.padding if isinstance(m.padding, str) else ""
        pad = [0] * nd if text else _tup(m.padding, nd)
        return "conv", [m.weight, m.bias], [nd, m.groups] + _tup(m.stride, nd) + pad + _tup(m.dilation, nd), [], text
    return lower


def _lower_batch_norm(cls, ranks):
    def lower(m):
        if not is_stock(m, cls, "_check_input_dim") or m.training or m.running_mean is None or m.running_var is None:
            return None
        momentum = 0.0 if m.momentum is None else float(m.momentum)
        return "batch_norm", [m.weight, m.bias, m.running_mean, m.running_var], ranks, [momentum, float(m.eps)], ""
    return lower


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _lower_dropout(m):
    return None if type(m) not in _DROPOUTS or m.training else ("identity", [], [], [], "")


def _lower_simple(cls, kind, floats=lambda m: []):
    """An activation, Identity or Flatten: its class's own forward (a subclass keeping it too).
    Never in place as the module asks: its input may be a clean activation later probes read
    (the values are the same; query intermediates nothing else holds are still overwritten)."""
    def lower(m):
        if type(m).forward is not cls.forward:
            return None
        if kind == "gelu":
            return kind, [], [], [], m.approximate
        if kind == "flatten":
            return kind, [], [m.start_dim, m.end_dim], [], ""
        return kind, [], [0], [float(f) for f in floats(m)], ""
    return lower


def _lower_max_pool(cls, nd):
    def lower(m):
        if type(m) is not cls or m.return_indices:
            return None
        return "max_pool", [], [nd, int(m.ceil_mode)] + _tup(m.kernel_size, nd) + _tup(m.stride, nd) + \
            _tup(m.padding, nd) + _tup(m.dilation, nd), [], ""
    return lower


def _lower_avg_pool(cls, nd):
    def lower(m):
        if type(m) is not cls:
            return None
        div = getattr(m, "divisor_override", None)
        return "avg_pool", [], [nd, int(m.ceil_mode), int(m.count_include_pad), int(div is not None), int(div or 0)] + \
            _tup(m.kernel_size, nd) + _tup(m.stride, nd) + _tup(m.padding, nd), [], ""
    return lower


def _lower_adaptive_avg_pool(cls, nd):
    def lower(m):
        size = list(m.output_size) if isinstance(m.output_size, (tuple, list)) else [m.output_size] * nd
        if type(m) is not cls or (nd == 1 and size[0] is None):  # adaptive_avg_pool1d takes no None
            return None
        return "adaptive_avg_pool", [], [nd] + [-1 if v is None else int(v) for v in size], [], ""
    return lower


_know(_MODULES, (nn.Linear,), lower=_lower_linear)
for _cls, _nd in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3)):
    _know(_MODULES, (_cls,), lower=_lower_conv(_cls, _nd))
for _cls, _ranks in ((nn.BatchNorm1d, [2, 3]), (nn.BatchNorm2d, [4]), (nn.BatchNorm3d, [5])):
    _know(_MODULES, (_cls,), lower=_lower_batch_norm(_cls, _ranks))
_know(_MODULES, (nn.modules.dropout._DropoutNd,) + _DROPOUTS[:4], lower=_lower_dropout)
for _cls, _kind, *_floats in (
        (nn.ReLU, "relu"), (nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid"), (nn.SiLU, "silu"), (nn.Mish, "mish"),
        (nn.Hardswish, "hardswish"), (nn.Hardsigmoid, "hardsigmoid"), (nn.Identity, "identity"),
        (nn.Flatten, "flatten"), (nn.GELU, "gelu"), (nn.LeakyReLU, "leaky_relu", lambda m: [m.negative_slope]),
        (nn.ELU, "elu", lambda m: [m.alpha]), (nn.Softplus, "softplus", lambda m: [m.beta, m.threshold]),
        (nn.Hardtanh, "hardtanh", lambda m: [m.min_val, m.max_val])):  # Hardtanh: ReLU6 too
    _know(_MODULES, (_cls,), lower=_lower_simple(_cls, _kind, *_floats))
for _nd in (1, 2):
    _know(_MODULES, (getattr(nn, f"MaxPool{_nd}d"),), lower=_lower_max_pool(getattr(nn, f"MaxPool{_nd}d"), _nd))
    _know(_MODULES, (getattr(nn, f"AvgPool{_nd}d"),), lower=_lower_avg_pool(getattr(nn, f"AvgPool{_nd}d"), _nd))
    _know(_MODULES, (getattr(nn, f"AdaptiveAvgPool{_nd}d"),),
          lower=_lower_adaptive_avg_pool(getattr(nn, f"AdaptiveAvgPool{_nd}d"), _nd))
