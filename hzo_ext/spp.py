"""Spatial Parallel Perturbation (SPP): the footprints of sub-networks and their coloring.

For a right sub-network F with input [C, *S] and output [C', *T] (S, T spatial), the
*footprint* of input position p is the set of output positions F(.) changes when p moves
(``hzo_ext.footprint``: intervals per axis). Each op's own footprint is the registry's
(``OpEntry.footprint``); this module composes them along chains of modules, through
containers (Sequential, ResidualBlock, BlackBox) and traced pieces, and colors the result.

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
from typing import Sequence

import torch
from torch import fx, nn

from . import _torch_impl, ops, registry
from .footprint import Footprint, Interval, NoFootprint
from .stages import BlackBox, ResidualBlock

__all__ = ["Footprint", "NoFootprint", "footprint_of", "call_footprint", "graph_footprint", "SpatialColoring",
           "DenseColoring", "coloring_for", "coloring_for_call", "chain_footprint", "is_barrier"]


# ---- modules and traced pieces ----------------------------------------------------------------

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


def _footprint(mod: nn.Module, in_sizes: tuple[int, ...], where: str) -> Footprint:
    custom = getattr(mod, "spp_footprint", None)
    if callable(custom):
        fp = custom(in_sizes)
        if fp is None:
            raise NoFootprint(f"{where} ({type(mod).__name__})", "spp_footprint declares no footprint")
        return fp
    from .graph import GraphStage, is_opaque
    if isinstance(mod, GraphStage):  # chain_footprint follows it, given its input's channels
        raise NoFootprint(f"{where} (GraphStage)", "a traced piece inside a module")
    if is_opaque(mod) and not isinstance(mod, BlackBox):
        raise NoFootprint(f"{where} ({type(mod).__name__})", "marked opaque: run whole, never looked into "
                                                             "(declare spp_footprint to color through it)")
    if mod._forward_hooks or mod._forward_pre_hooks:
        raise NoFootprint(f"{where} ({type(mod).__name__})", "it has forward hooks (they may change what it computes)")
    overridden = [] if registry.registered(type(mod)) else _overridden_methods(mod)  # registered: as it is
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
    footprint = registry.module_entry(mod).footprint
    if footprint is None:
        raise NoFootprint(f"{where} ({type(mod).__name__})", "no known footprint (global, mixing or unknown module)")
    return footprint(mod, None, in_sizes, None)


def call_footprint(n: fx.Node, arg: fx.Node, in_sizes: tuple[int, ...], out_shape: tuple[int, ...],
                   where: str = "call") -> Footprint:
    """The registry's footprint of a call or method on its argument ``arg``, from spatial sizes
    ``in_sizes`` to the per-sample output shape ``out_shape``; NoFootprint naming ``where``."""
    entry = registry.entry_for(n.op, n.target, None)
    if entry.footprint is None:
        raise NoFootprint(where, "no known footprint for this function")
    try:
        return entry.footprint(n, arg, tuple(in_sizes), tuple(out_shape))
    except NoFootprint as e:
        raise NoFootprint(where, e.why) from None


def graph_footprint(gm: fx.GraphModule, in_shape: Sequence[int], where: str = "piece") -> Footprint:
    """The footprint of a traced piece (``graph.GraphStage``) on per-sample inputs ``in_shape``
    [C, *S], node by node: modules through ``footprint_of``, calls through ``call_footprint``,
    sums of two branches as the union. Raises NoFootprint naming the first node it cannot follow."""
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
        if not hasattr(n.meta["tensor_meta"], "shape"):
            raise NoFootprint(here, "it gives a tuple")
        fp = fps[ins[0]]
        if n.op == "call_module" and len(ins) == 1 and n.args and n.args[0] is ins[0]:
            fps[n] = fp.then(footprint_of(gm.get_submodule(n.target), fp.out_sizes, f"{where}.{n.target}"))
        elif n.op != "call_module" and registry.lookup(registry.ARITHMETIC, n.target):
            if any(shape(a) != shape(n) for a in ins):
                raise NoFootprint(here, "broadcasts a state tensor")
            fps[n] = fp if len(ins) == 1 else fp.union(fps[ins[1]])
        elif n.op != "call_module" and len(ins) == 1:
            if registry.entry_for(n.op, n.target, None).kind == "elementwise" and shape(n) != shape(ins[0]):
                raise NoFootprint(here, "broadcasts a state tensor")
            fps[n] = fp.then(call_footprint(n, ins[0], fp.out_sizes, shape(n), here))
        else:
            raise NoFootprint(here, "no known footprint for this function")
    raise NoFootprint(where, "the piece has no output")


def coloring_for_call(n: fx.Node, arg: fx.Node, in_shape: Sequence[int], out_shape: Sequence[int]
                      ) -> SpatialColoring:
    """SPP coloring of one call (``call_footprint``) on its argument ``arg`` of per-sample shape
    ``in_shape`` [C, *S] to ``out_shape`` [C, *T] (the same channels: they stay apart)."""
    if len(in_shape) < 2 or len(out_shape) != len(in_shape) or out_shape[0] != in_shape[0]:
        raise NoFootprint(str(n.name), f"input {tuple(in_shape)}, output {tuple(out_shape)}")
    fp = call_footprint(n, arg, tuple(in_shape[1:]), tuple(out_shape), str(n.name))
    if fp.out_sizes != tuple(out_shape[1:]):
        raise NoFootprint(str(n.name), f"the geometry predicts {fp.out_sizes}, the op gives {tuple(out_shape[1:])}")
    return SpatialColoring(in_shape, out_shape, fp)


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
