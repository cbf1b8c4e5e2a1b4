"""Footprint geometry: which output positions each input position of an op can change.

For an op with per-sample input [C, *S] and output [C', *T] (S, T spatial), the *footprint*
of input position p is kept per spatial axis as an interval [lo(p), hi(p)] of output positions
(None: p changes nothing, e.g. a row a strided conv skips); every output channel counts as
affected unless the footprint is channelwise. Intervals are hulls, so they over-approximate
(dilation holes, groups): a coloring built on them stays exact, with a few more colors than
strictly needed. Which op has which footprint is the registry's knowledge
(``hzo_ext.registry``); composing them over sub-networks and coloring is ``hzo_ext.spp``'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Interval", "NoFootprint", "Footprint", "mixing", "within_last_axes"]

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


def mixing(in_sizes: tuple[int, ...], out_sizes: tuple[int, ...], axes) -> Footprint:
    """An op that mixes the spatial ``axes`` of each channel, every position there changing every
    output position of the axis, and keeps the other axes (same sizes) and the channels apart:
    LayerNorm over a token's features, softmax over the last axis, attention (per head)."""
    return Footprint(tuple(tuple((0, m - 1) if a in axes else (p, p) for p in range(n))
                           for a, (n, m) in enumerate(zip(in_sizes, out_sizes))), tuple(out_sizes), channelwise=True)


def within_last_axes(in_sizes: tuple[int, ...], k: int) -> Footprint:
    """``mixing`` of the last k axes, one probe per position there serving every channel."""
    return mixing(in_sizes, in_sizes, range(len(in_sizes) - k, len(in_sizes)))
