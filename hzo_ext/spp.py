"""Spatial Parallel Perturbation (SPP): footprint geometry of conv sub-networks and the coloring.

For a right sub-network F with input [C, *S] and output [C', *T] (S, T spatial), the
*footprint* of input position p is the set of output positions F(.) changes when p moves.
Per spatial axis it is kept as an interval [lo(p), hi(p)] (None: p changes nothing, e.g. a
row a strided conv skips); every output channel counts as affected. Intervals are hulls, so
they over-approximate (dilation holes, groups): the coloring stays exact, only a few more
colors than strictly needed.

The coloring (Curtis-Powell-Reid): a color is (input channel, one color class per axis), and
two positions of one color never have overlapping footprints, so one probe moves them all at
once and each output belongs to at most one of them (its *owner*). Per axis, the classes are
an optimal coloring of the interval graph (greedy by left end), so for 3x3 stride-1 convs of
depth d the classes are p mod s, s = 2d + 1, and probes = C * min(s, H) * min(s, W).

A module may declare its own geometry with a method
``spp_footprint(self, in_sizes: tuple[int, ...]) -> Footprint | None`` (None: no known
footprint, probe densely); ``Footprint.window`` covers conv-like layers.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import _torch_impl, ops, registry
from .registry import ARITHMETIC, ELEMENTWISE_CALLS
from .stages import BlackBox, ResidualBlock

__all__ = ["Footprint", "NoFootprint", "footprint_of", "graph_footprint", "SpatialColoring", "DenseColoring",
           "coloring_for", "chain_footprint", "is_barrier"]

Interval = tuple[int, int] | None  # [lo, hi] of output positions on one axis; None: none affected


class NoFootprint(Exception):
    """A sub-network whose footprint is not known (global op, unknown module): probe it densely."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}" if where else why)
        self.where, self.why = where, why


@dataclass(frozen=True)
class Footprint:
    """``axes[a][p]`` = interval of outputs on spatial axis a that input position p can change.
    ``channelwise``: output channel c depends on input channel c only (pooling, elementwise,
    depthwise convs), else every output channel counts as affected."""
    axes: tuple[tuple[Interval, ...], ...]
    out_sizes: tuple[int, ...]
    channelwise: bool = False

    @property
    def in_sizes(self) -> tuple[int, ...]:
        return tuple(len(ax) for ax in self.axes)

    @staticmethod
    def identity(sizes: Sequence[int]) -> "Footprint":
        return Footprint(tuple(tuple((p, p) for p in range(n)) for n in sizes), tuple(sizes), channelwise=True)

    @staticmethod
    def window(in_sizes: Sequence[int], kernel, stride, padding, dilation=1, ceil_mode: bool = False,
               out_sizes: Sequence[int] | None = None, channelwise: bool = False) -> "Footprint":
        """A sliding window (conv, pooling): output o reads inputs o*stride - padding + t*dilation,
        t < kernel. Arguments are ints or per-axis tuples; ``padding`` is the left padding
        (``out_sizes`` overrides torch's size formula, e.g. for asymmetric 'same' padding)."""
        r = len(in_sizes)
        k, s, pad, d = (_per_axis(v, r) for v in (kernel, stride, padding, dilation))
        outs = list(out_sizes) if out_sizes is not None else [
            _window_out_size(n, *args, ceil_mode) for n, *args in zip(in_sizes, k, s, pad, d)]
        axes = []
        for n, n_out, k_, s_, p_, d_ in zip(in_sizes, outs, k, s, pad, d):
            # p is read by o iff o*s - pad <= p <= o*s - pad + (k-1)*d: o in [ceil((p+pad-(k-1)d)/s), floor((p+pad)/s)]
            ax = []
            for p in range(n):
                lo = max(0, -(-(p + p_ - (k_ - 1) * d_) // s_))
                hi = min(n_out - 1, (p + p_) // s_)
                ax.append((lo, hi) if lo <= hi else None)
            axes.append(tuple(ax))
        return Footprint(tuple(axes), tuple(outs), channelwise)

    @staticmethod
    def adaptive(in_sizes: Sequence[int], out_sizes: Sequence[int]) -> "Footprint":
        """Adaptive pooling: output o of an axis n -> m reads inputs floor(o n / m) .. ceil((o+1) n / m) - 1."""
        axes = []
        for n, m in zip(in_sizes, out_sizes):
            reads = [(o * n // m, -(-(o + 1) * n // m) - 1) for o in range(m)]
            axes.append(tuple((min(o for o, (a, b) in enumerate(reads) if a <= p <= b),
                               max(o for o, (a, b) in enumerate(reads) if a <= p <= b)) for p in range(n)))
        return Footprint(tuple(axes), tuple(out_sizes), channelwise=True)

    @property
    def is_global(self) -> bool:
        """Every position can change every output position (global pooling): no two positions
        of one channel can share a probe."""
        return math.prod(self.in_sizes) > 1 and all(
            iv is not None and iv == (0, n - 1) for ax, n in zip(self.axes, self.out_sizes) for iv in ax)

    def then(self, nxt: "Footprint") -> "Footprint":
        """The footprint of ``nxt`` applied after ``self``: the hull of nxt's intervals over self's."""
        _same_sizes(self.out_sizes, nxt.in_sizes, "composition")
        axes = []
        for first, second in zip(self.axes, nxt.axes):
            ax = []
            for iv in first:
                hits = [second[q] for q in range(iv[0], iv[1] + 1) if second[q] is not None] if iv else []
                ax.append((min(h[0] for h in hits), max(h[1] for h in hits)) if hits else None)
            axes.append(tuple(ax))
        return Footprint(tuple(axes), nxt.out_sizes, self.channelwise and nxt.channelwise)

    def union(self, other: "Footprint") -> "Footprint":
        """The footprint of a sum of two branches with the same input and output sizes."""
        _same_sizes(self.in_sizes, other.in_sizes, "union (inputs)")
        _same_sizes(self.out_sizes, other.out_sizes, "union (outputs)")
        axes = []
        for a, b in zip(self.axes, other.axes):
            axes.append(tuple(x if y is None else y if x is None else (min(x[0], y[0]), max(x[1], y[1]))
                              for x, y in zip(a, b)))
        return Footprint(tuple(axes), self.out_sizes, self.channelwise and other.channelwise)


def _per_axis(v, r: int) -> tuple[int, ...]:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * r
    if len(v) != r:
        raise NoFootprint("", f"{len(v)}-d window on {r} spatial axes")
    return tuple(int(x) for x in v)


def _window_out_size(n: int, k: int, s: int, pad: int, d: int, ceil_mode: bool) -> int:
    """torch's output size of a conv/pool window (pooling_output_shape)."""
    span = n + 2 * pad - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + pad:  # the last window must start inside the input
        out -= 1
    return out


def _same_sizes(a, b, what: str) -> None:
    if tuple(a) != tuple(b):
        raise NoFootprint("", f"{what}: spatial sizes {tuple(a)} and {tuple(b)} do not match")


# ---- module geometry ------------------------------------------------------------------------

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                   nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def footprint_of(mod: nn.Module, in_sizes: tuple[int, ...], where: str = "module") -> Footprint:
    """Footprint of one module on inputs with spatial sizes ``in_sizes``; raises NoFootprint
    naming the innermost module without one."""
    try:
        return _footprint(mod, tuple(in_sizes), where)
    except NoFootprint as e:
        if e.where:
            raise
        raise NoFootprint(f"{where} ({type(mod).__name__})", e.why) from None


_HARMLESS_OVERRIDES = {"__init__", "extra_repr", "reset_parameters", "__repr__", "__setstate__"}


def _overridden_methods(mod: nn.Module) -> list[str]:
    """Methods that classes outside torch and hzo_ext define over a torch/hzo_ext base's (a
    Conv2d subclass with its own forward or _conv_forward): the base's footprint does not hold."""
    mro = type(mod).__mro__
    base = next(c for c in mro if c.__module__.startswith(("torch.", "hzo_ext.")))
    return sorted({name for c in mro[:mro.index(base)] for name, v in vars(c).items()
                   if callable(v) and hasattr(base, name) and name not in _HARMLESS_OVERRIDES})


def _mixing(in_sizes: tuple[int, ...], out_sizes: tuple[int, ...], axes) -> Footprint:
    """An op that mixes the spatial ``axes`` of each channel, every position there changing every
    output position of the axis, and keeps the other axes (same sizes) and the channels apart:
    LayerNorm over a token's features, softmax over the last axis, attention (per head)."""
    return Footprint(tuple(tuple((0, m - 1) if a in axes else (p, p) for p in range(n))
                           for a, (n, m) in enumerate(zip(in_sizes, out_sizes))), tuple(out_sizes), channelwise=True)


def _within_last_axes(in_sizes: tuple[int, ...], k: int) -> Footprint:
    """``_mixing`` of the last k axes, one probe per position there serving every channel."""
    return _mixing(in_sizes, in_sizes, range(len(in_sizes) - k, len(in_sizes)))


def _footprint(mod: nn.Module, in_sizes: tuple[int, ...], where: str) -> Footprint:
    r = len(in_sizes)
    custom = getattr(mod, "spp_footprint", None)
    if callable(custom):
        fp = custom(in_sizes)
        if fp is None:
            raise NoFootprint(f"{where} ({type(mod).__name__})", f"spp_footprint declares no footprint")
        return fp
    from .graph import GraphStage
    if isinstance(mod, GraphStage):  # chain_footprint follows it, given its input's channels
        raise NoFootprint(f"{where} (GraphStage)", "a traced piece inside a module")
    if mod._forward_hooks or mod._forward_pre_hooks:
        raise NoFootprint(f"{where} ({type(mod).__name__})", "it has forward hooks (they may change what it computes)")
    if isinstance(mod, nn.Identity) or registry.entry_for("call_module", None, mod).kind == "elementwise":
        return Footprint.identity(in_sizes)  # the registry's elementwise modules, registered ones included
    overridden = _overridden_methods(mod)
    if overridden:
        raise NoFootprint(f"{where} ({type(mod).__name__})", f"its class overrides {', '.join(overridden)} "
                                                             f"(declare spp_footprint to color through it)")
    if isinstance(mod, nn.Sequential):
        fp = Footprint.identity(in_sizes)
        for name, child in mod.named_children():
            fp = fp.then(footprint_of(child, fp.out_sizes, f"{where}.{name}"))
        return fp
    if isinstance(mod, ResidualBlock):
        skip = (Footprint.identity(in_sizes) if mod.shortcut is None
                else footprint_of(mod.shortcut, in_sizes, f"{where}.shortcut"))
        return skip.union(footprint_of(mod.module, in_sizes, f"{where}.module"))
    if isinstance(mod, BlackBox):  # non-differentiable, but its spatial structure is its module's
        return footprint_of(mod.module, in_sizes, f"{where}.module")
    if isinstance(mod, nn.modules.dropout._DropoutNd) and (not mod.training or mod.p == 0):
        return Footprint.identity(in_sizes)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.training and mod.running_mean is not None:
        return Footprint.identity(in_sizes)  # eval mode with running statistics: per-channel affine
    if isinstance(mod, _CONVS) and len(mod.kernel_size) == r:
        if mod.padding_mode != "zeros":
            raise NoFootprint(f"{where} ({type(mod).__name__})", f"padding_mode={mod.padding_mode!r} "
                                     f"(only 'zeros' is supported)")
        depthwise = mod.groups == mod.in_channels == mod.out_channels
        if mod.padding == "same":  # stride 1; torch puts the odd extra padding element on the right
            left = [d * (k - 1) // 2 for k, d in zip(mod.kernel_size, mod.dilation)]
            return Footprint.window(in_sizes, mod.kernel_size, 1, left, mod.dilation, out_sizes=in_sizes,
                                    channelwise=depthwise)
        pad = 0 if mod.padding == "valid" else mod.padding
        return Footprint.window(in_sizes, mod.kernel_size, mod.stride, pad, mod.dilation, channelwise=depthwise)
    if isinstance(mod, _POOLS):
        return Footprint.window(in_sizes, mod.kernel_size, mod.stride or mod.kernel_size, mod.padding,
                                getattr(mod, "dilation", 1), mod.ceil_mode, channelwise=True)
    if isinstance(mod, _ADAPTIVE_POOLS):
        sizes = mod.output_size if isinstance(mod.output_size, (tuple, list)) else (mod.output_size,) * r
        if len(sizes) == r:  # None keeps an axis' size
            return Footprint.adaptive(in_sizes, [n if o is None else int(o) for n, o in zip(in_sizes, sizes)])
    if isinstance(mod, nn.LayerNorm) and 0 < len(mod.normalized_shape) <= r and \
            tuple(mod.normalized_shape) == in_sizes[r - len(mod.normalized_shape):]:
        return _within_last_axes(in_sizes, len(mod.normalized_shape))
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)) and mod.dim in (-1, r + 1):  # [B, C, *S]: the last is r + 1
        return _within_last_axes(in_sizes, 1)
    if isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1 and all(n == 1 for n in in_sizes):
        return Footprint.identity(in_sizes)  # [C, 1, .., 1] -> [C]: the same elements; sizes kept as 1s
    raise NoFootprint(f"{where} ({type(mod).__name__})", f"no known footprint (global, mixing or unknown module)")


# ---- traced pieces: the footprints of functions -------------------------------------------------

_POOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, F.max_pool1d: 1, F.max_pool2d: 2,
                   F.max_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
                   F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3}


def graph_footprint(gm: fx.GraphModule, in_shape: Sequence[int], where: str = "piece") -> Footprint:
    """The footprint of a traced piece (``graph.GraphStage``) on per-sample inputs ``in_shape``
    [C, *S], node by node: modules through ``footprint_of``, the functions above, spatial slicing
    (``x[:, :, ::2, ::2]``), ``F.pad`` and flattening of [C, 1, .., 1]. Raises NoFootprint naming
    the first node it cannot follow."""
    from torch.fx.passes.shape_prop import ShapeProp
    if len(in_shape) < 2:
        raise NoFootprint(where, f"its input {tuple(in_shape)} has no spatial axes")
    dtype = next((t.dtype for t in list(gm.parameters()) + list(gm.buffers()) if t.is_floating_point()),
                 torch.float32)
    ShapeProp(gm).propagate(torch.zeros((1, *in_shape), dtype=dtype))
    fps: dict = {}

    def shape(n):
        return tuple(n.meta["tensor_meta"].shape[1:])

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            fps[n] = Footprint.identity(in_shape[1:])
            continue
        if n.op == "output":
            return fps[n.args[0]]
        ins = [a for a in n.all_input_nodes if a in fps]
        if not ins or "tensor_meta" not in n.meta:
            continue  # parameters and constants; sizes and other non-tensors
        here = f"{where}: {n.op} {getattr(n.target, '__name__', n.target)}"
        fp = fps[ins[0]]
        if n.op == "call_module" and len(ins) == 1 and n.args and n.args[0] is ins[0]:
            fps[n] = fp.then(footprint_of(gm.get_submodule(n.target), fp.out_sizes, f"{where}.{n.target}"))
        elif n.target in ELEMENTWISE_CALLS and len(ins) == 1 and shape(n) == shape(ins[0]):
            fps[n] = fp
        elif n.target in ARITHMETIC:
            if any(shape(a) != shape(n) for a in ins):
                raise NoFootprint(here, "broadcasts a state tensor")
            fps[n] = fp if len(ins) == 1 else fp.union(fps[ins[1]])
        elif n.target is operator.getitem and len(ins) == 1:
            fps[n] = fp.then(_slice_footprint(n.args[1], fp.out_sizes, shape(n), here))
        elif n.target in _POOL_FUNCTIONS and len(ins) == 1 and len(fp.out_sizes) == _POOL_FUNCTIONS[n.target]:
            if all(k == 1 for k in shape(n)[1:]):  # global pooling, whatever the kernel argument
                fps[n] = fp.then(Footprint.adaptive(fp.out_sizes, shape(n)[1:]))
            elif "adaptive" in n.target.__name__:
                fps[n] = fp.then(Footprint.adaptive(fp.out_sizes, shape(n)[1:]))
            else:
                raise NoFootprint(here, "a non-global functional pooling (use the nn module)")
        elif is_known_call(n) and len(ins) == 1 and shape(ins[0])[0] == shape(n)[0]:
            fps[n] = fp.then(call_footprint(n, ins[0], fp.out_sizes, shape(n)[1:], here))
        elif n.target is F.pad and len(ins) == 1:
            fps[n] = fp.then(_pad_footprint(n, fp.out_sizes, shape(n), here))
        elif (n.target is torch.flatten or n.op == "call_method" and n.target in ("flatten", "view", "reshape")) \
                and len(ins) == 1 and len(shape(n)) == 1 and all(k == 1 for k in fp.out_sizes):
            fps[n] = fp  # [C, 1, .., 1] -> [C]
        else:
            raise NoFootprint(here, "no known footprint for this function")
    raise NoFootprint(where, "the piece has no output")


_SOFTMAX_CALLS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, "softmax", "log_softmax"}
_KNOWN_CALLS = _SOFTMAX_CALLS | {F.layer_norm, F.scaled_dot_product_attention}


def is_known_call(n: fx.Node) -> bool:
    """A call ``call_footprint`` may know: layer_norm, softmax, scaled_dot_product_attention."""
    return n.op in ("call_function", "call_method") and registry.lookup(_KNOWN_CALLS, n.target, False)


def call_footprint(n: fx.Node, arg: fx.Node, in_sizes: tuple[int, ...], out_sizes: tuple[int, ...],
                   where: str = "call") -> Footprint:
    """The footprint of a call on its argument ``arg`` (per sample [C, *in_sizes] to
    [C, *out_sizes]). ``F.layer_norm`` over the last axes and softmax over the last axis mix
    within each channel only (``_within_last_axes``). ``F.scaled_dot_product_attention`` on
    [heads, L, E] (no mask, no dropout, one head per query head): a query row changes its own
    output row, a key or value changes every row of its head."""
    r = len(in_sizes)
    if n.target is F.layer_norm and n.args[0] is arg:
        shape = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        if all(type(v) is int for v in shape) and 0 < len(shape) <= r and shape == tuple(in_sizes[r - len(shape):]):
            return _within_last_axes(in_sizes, len(shape))
    elif n.target is F.scaled_dot_product_attention and r == 2:
        bound = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
                         n.args), **n.kwargs)
        plain = bound.get("attn_mask") is None and bound.get("dropout_p", 0.0) == 0 and not bound.get("enable_gqa")
        roles = [k for k in ("query", "key", "value") if bound.get(k) is arg]
        if plain and roles:  # a query row: its own output row (axis 0 kept when L matches)
            keeps_rows = roles == ["query"] and out_sizes[0] == in_sizes[0]
            return _mixing(in_sizes, out_sizes, (1,) if keeps_rows else (0, 1))
    elif n.target in _SOFTMAX_CALLS and n.args and n.args[0] is arg:
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dim in (-1, r + 1):  # the last axis of [B, C, *S]
            return _within_last_axes(in_sizes, 1)
    raise NoFootprint(where, "no known footprint for this call")


def coloring_for_call(n: fx.Node, arg: fx.Node, in_shape: Sequence[int], out_shape: Sequence[int]
                      ) -> SpatialColoring:
    """SPP coloring of one call (``call_footprint``) on its argument ``arg`` of per-sample shape
    ``in_shape`` [C, *S] to ``out_shape`` [C, *T] (the same channels: they stay apart)."""
    if len(in_shape) < 2 or len(out_shape) != len(in_shape) or out_shape[0] != in_shape[0]:
        raise NoFootprint(str(n.name), f"input {tuple(in_shape)}, output {tuple(out_shape)}")
    fp = call_footprint(n, arg, tuple(in_shape[1:]), tuple(out_shape[1:]), str(n.name))
    return SpatialColoring(in_shape, out_shape, fp)


def _slice_footprint(index, in_sizes, out_shape, where: str) -> Footprint:
    """``x[:, c, s_1, .., s_r]`` with basic slices: a stride-s window of size 1 per axis."""
    index = index if isinstance(index, tuple) else (index,)
    r = len(in_sizes)
    if not all(isinstance(i, slice) for i in index) or len(index) > r + 2 or index[0] != slice(None):
        raise NoFootprint(where, f"indexing {index!r} (only basic slices of [B, C, *spatial])")
    spatial = list(index[2:]) + [slice(None)] * (r - len(index[2:]))
    starts, steps = [], []
    for sl, n in zip(spatial, in_sizes):
        start, _, step = sl.indices(n)
        if step < 1:
            raise NoFootprint(where, f"slice {sl} with a negative step")
        starts.append(start)
        steps.append(step)
    channels_kept = len(index) < 2 or index[1] == slice(None)
    return Footprint.window(in_sizes, 1, steps, [-p for p in starts], out_sizes=out_shape[1:],
                            channelwise=channels_kept)


def _pad_footprint(n: fx.Node, in_sizes, out_shape, where: str) -> Footprint:
    """Constant ``F.pad``: each spatial axis shifts by its left padding; padded channels make
    the footprint non-channelwise (output channel c reads another input channel)."""
    pad = list(n.args[1] if len(n.args) > 1 else n.kwargs["pad"])
    mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
    if mode != "constant" or any(not isinstance(p, int) or p < 0 for p in pad):
        raise NoFootprint(where, f"F.pad mode={mode!r} pad={pad} (only constant, non-negative)")
    r = len(in_sizes)
    lefts = [0] * (r + 1)  # channel axis, then spatial axes
    for k in range(len(pad) // 2):
        lefts[r - k] = pad[2 * k]
    pads_channels = len(pad) > 2 * r and (pad[2 * r] or pad[2 * r + 1])
    return Footprint.window(in_sizes, 1, 1, lefts[1:], out_sizes=out_shape[1:], channelwise=not pads_channels)


# ---- the coloring and the owner map ---------------------------------------------------------

def _color_axis(intervals: Sequence[Interval]) -> list[int]:
    """Fewest color classes on one axis such that same-class footprints are disjoint: greedy by
    left end, optimal for interval graphs. Positions with no footprint take class 0."""
    colors, last_hi = [0] * len(intervals), []  # last_hi[c]: right end of the last interval of class c
    for p in sorted((p for p, iv in enumerate(intervals) if iv), key=lambda p: intervals[p][0]):
        lo, hi = intervals[p]
        c = next((c for c, h in enumerate(last_hi) if h < lo), len(last_hi))
        last_hi[c:c + 1] = [hi]
        colors[p] = c
    return colors


class DenseColoring:
    """Dense probing as a coloring: every coordinate of a_m [B, *S] its own color."""

    def __init__(self, num_inputs: int):
        self.num_inputs = self.num_colors = num_inputs

    def colors(self, device) -> torch.Tensor:
        return ops.dense_colors(self.num_inputs, device=device)

    def owner(self, probe_ids: torch.Tensor, num_outputs: int) -> torch.Tensor:
        return ops.dense_owner(probe_ids, num_outputs)

    def contract(self, y: torch.Tensor, target: torch.Tensor, probe_ids: torch.Tensor, eps: float) -> torch.Tensor:
        """delta [B, num_inputs] of the probes probe_ids from their outputs y [2, K, B, *T]."""
        return ops.contract(y, target, self.owner(probe_ids, math.prod(y.shape[3:])), eps, num_inputs=self.num_inputs)

    def __repr__(self) -> str:
        return f"DenseColoring({self.num_colors} probes)"


class SpatialColoring:
    """SPP coloring of a sub-network from a_m [C, *S] to a_j [C', *T] with footprint ``fp``.

    Color id = c * prod(n) + mixed-radix (class_1, ..., class_r), n_a the classes of axis a:
    probes = C * prod(n). A channelwise footprint (output channel c' depends on input channel
    c' only) drops the channel from the color: probes = prod(n). ``contract`` attributes each
    output to the one input coordinate of its probe's color whose footprint box holds it, with
    the boxes computed on the fly (``ops.contract_spp``): no owner map in memory.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], fp: Footprint):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.geometry_out = (self.out_shape[0],) + tuple(fp.out_sizes)  # [C', *T] even after a Flatten of 1s
        self.channelwise = fp.channelwise
        self.axis_colors = [_color_axis(ax) for ax in fp.axes]
        self.classes = tuple(max(c) + 1 if c else 1 for c in self.axis_colors)  # n_a per axis
        self.num_inputs = math.prod(self.in_shape)
        self.num_colors = (1 if self.channelwise else self.in_shape[0]) * math.prod(self.classes)
        # [2, sum(S)]: lo / hi of each input position's footprint interval, axis after axis (lo > hi: none)
        ivs = [iv or (0, -1) for ax in fp.axes for iv in ax]
        self._boxes = torch.tensor([[iv[0] for iv in ivs], [iv[1] for iv in ivs]], dtype=torch.int64)
        self._cache: dict = {}

    def __repr__(self) -> str:
        channels = "channelwise" if self.channelwise else f"{self.in_shape[0]} channels"
        return (f"SpatialColoring({self.num_colors} probes = {channels} x "
                f"{' x '.join(map(str, self.classes))} classes, dense {self.num_inputs})")

    def colors(self, device) -> torch.Tensor:
        """[prod(C, *S)] color of every input coordinate (C-order flattening of [C, *S])."""
        key = ("colors", device)
        if key not in self._cache:
            r = len(self.classes)
            per_channel = 0 if self.channelwise else math.prod(self.classes)
            ids = torch.arange(self.in_shape[0]).reshape(-1, *[1] * r) * per_channel
            stride = 1
            for a in reversed(range(r)):
                shape = [1] * (r + 1)
                shape[a + 1] = -1
                ids = ids + torch.tensor(self.axis_colors[a]).reshape(shape) * stride
                stride *= self.classes[a]
            self._cache[key] = ids.expand(self.in_shape).reshape(-1).to(device)
        return self._cache[key]

    def boxes(self, device) -> torch.Tensor:
        key = ("boxes", device)
        if key not in self._cache:
            self._cache[key] = self._boxes.to(device)
        return self._cache[key]

    def _probe_start(self, probe_ids: torch.Tensor) -> int:
        """contract_spp takes a contiguous range of colors (as the estimator's chunks are)."""
        start = int(probe_ids[0]) if probe_ids.numel() else 0
        if not torch.equal(probe_ids.cpu(), torch.arange(start, start + probe_ids.numel())):
            raise ValueError("SPP: probe_ids must be a contiguous range of colors")
        return start

    def contract(self, y: torch.Tensor, target: torch.Tensor, probe_ids: torch.Tensor, eps: float) -> torch.Tensor:
        """delta [B, num_inputs] of the probes probe_ids from their outputs y [2, K, B, *T]."""
        if math.prod(y.shape[3:]) != math.prod(self.out_shape):
            raise ValueError(f"SPP: the sub-network gave {tuple(y.shape[3:])} outputs per sample, the "
                             f"geometry predicts {self.out_shape}")
        y = y.reshape(*y.shape[:3], *self.geometry_out)
        target = target.reshape(target.shape[0], *self.geometry_out)
        return ops.contract_spp(y, target, self.colors(y.device), self._probe_start(probe_ids),
                                self.boxes(y.device), self.in_shape, self.channelwise, eps)

    def owner(self, probe_ids: torch.Tensor, num_outputs: int) -> torch.Tensor:
        """int64 [K, num_outputs], the owner map ``contract`` never builds (for tests and callers of
        ``ops.contract``): 8 * K * prod(C', *T) bytes per chunk."""
        if num_outputs != math.prod(self.out_shape):
            raise ValueError(f"SPP owner map: the sub-network gave {num_outputs} outputs per sample, the "
                             f"geometry predicts {self.out_shape}")
        device = probe_ids.device
        return _torch_impl.spp_owner(self.colors(device), self._probe_start(probe_ids), probe_ids.numel(),
                                     self.boxes(device), self.in_shape, self.geometry_out, self.channelwise)


def coloring_for(modules: Sequence[nn.Module], in_shape: Sequence[int], out_shape: Sequence[int],
                 names: Sequence[str] | None = None, in_shapes: Sequence[Sequence[int]] | None = None
                 ) -> SpatialColoring:
    """SPP coloring of the chain ``modules`` from per-sample shape ``in_shape`` [C, *S] to
    ``out_shape`` [C', *T] (or [C'] after global pooling and Flatten); raises NoFootprint
    (naming the module) when it is not local. ``in_shapes``: each module's per-sample input
    shape (needed to follow traced pieces, ``graph.GraphStage``)."""
    fp = chain_footprint(modules, in_shape, names, in_shapes)
    flat_ok = len(out_shape) == 1 and all(n == 1 for n in fp.out_sizes)  # [C', 1, .., 1] flattened
    if not flat_ok and (len(out_shape) != len(in_shape) or fp.out_sizes != tuple(out_shape[1:])):
        raise NoFootprint("sub-network", f"the geometry predicts spatial output {fp.out_sizes}, the model gives "
                                         f"{tuple(out_shape[1:])}")
    return SpatialColoring(in_shape, out_shape, fp)


def chain_footprint(modules: Sequence[nn.Module], in_shape: Sequence[int],
                    names: Sequence[str] | None = None, in_shapes: Sequence[Sequence[int]] | None = None
                    ) -> Footprint:
    """The footprint of the chain ``modules`` on per-sample inputs ``in_shape`` [C, *S]
    (``in_shapes``: each module's own input shape, for traced pieces)."""
    from .graph import GraphStage
    if len(in_shape) < 2:
        raise NoFootprint("sub-network", f"its input {tuple(in_shape)} has no spatial axes ([C, *spatial])")
    fp = Footprint.identity(in_shape[1:])
    for k, mod in enumerate(modules):
        where = names[k] if names else f"module {k}"
        if isinstance(mod, GraphStage) and in_shapes is not None:
            fp = fp.then(graph_footprint(mod.piece, in_shapes[k], where))
        else:
            fp = fp.then(footprint_of(mod, fp.out_sizes, where))
    return fp


def is_barrier(module: nn.Module, in_shape: Sequence[int]) -> bool:
    """True when ``module`` on spatial inputs [C, *S] makes every right sub-network holding it
    (almost) dense: it has no footprint, or a global one (global pooling). The estimator keeps
    such stages out of long SPP right halves (``HZO``'s barrier-aware bisect)."""
    if len(in_shape) < 2:
        return False
    try:
        return chain_footprint([module], in_shape, in_shapes=[in_shape]).is_global
    except NoFootprint:
        return True
