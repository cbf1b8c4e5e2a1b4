"""Numerics of the central differences: the dtype probes run in, and eps against that dtype.

A central difference ``(F(a + eps) - F(a - eps)) / (2 eps)`` has two errors: round-off, about
``spacing / eps`` relative where ``spacing = finfo(dtype).eps * max|a|`` is the gap between
neighbouring values at a's scale, and truncation, about ``(eps / scale)^2`` for smooth F (worse
at ReLU kinks), with scale = max|a|. Below the spacing, ``a + eps`` rounds to ``a`` and the
estimate is zero or noise: refused. Where either error dominates (eps within 20 spacings, or
above 0.1 max|a|): a warning naming what is perturbed and a step that balances the two,
``finfo(dtype).eps ** (1/3) * max|a|``.
"""
from __future__ import annotations

import math
import warnings

import torch

__all__ = ["LOW_PRECISION", "probe_dtype", "check_query_dtype", "balanced_step", "max_abs", "check_step",
           "check_step_at"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
ROUNDOFF_WARN = 20.0  # warn when eps is within this many spacings of a's largest values
TRUNCATION_WARN = 0.1  # warn when eps exceeds this fraction of a's largest magnitude


def check_query_dtype(query_dtype) -> None:
    """query_dtype is None or a floating dtype at least as precise as float32."""
    if query_dtype is None:
        return
    if not isinstance(query_dtype, torch.dtype) or not query_dtype.is_floating_point:
        raise TypeError(f"query_dtype must be a floating torch.dtype or None, got {query_dtype!r}")
    if torch.finfo(query_dtype).eps > torch.finfo(torch.float32).eps:
        raise ValueError(f"query_dtype={query_dtype} is too coarse for finite differences (the +-eps "
                         f"difference drowns in round-off); float32 is the minimum, and low-precision "
                         f"models are probed in float32 by default")


def probe_dtype(model_dtype: torch.dtype, query_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the probes run in, or None for the model's own: ``query_dtype`` when given,
    float32 for float16/bfloat16 models (their probed stages run on float32 copies)."""
    if query_dtype is not None:
        return query_dtype
    return torch.float32 if model_dtype in LOW_PRECISION else None


def balanced_step(dtype: torch.dtype, scale: float) -> float:
    """The step balancing round-off and truncation for values of size ``scale``, one digit."""
    step = torch.finfo(dtype).eps ** (1 / 3) * (scale if scale > 0 else 1.0)
    return float(f"{step:.1g}")


@torch.no_grad()
def max_abs(tensors) -> list[float]:
    """max |a| of each tensor (0 when empty): one read-back for all of them (a deep model has
    many small activations; this runs on every estimate). aminmax, not the inf-norm: a tenth of
    its time on a CPU."""
    tensors = [t.detach() for t in tensors]
    full = [t for t in tensors if t.numel()]
    values = iter(torch.stack([torch.stack(torch.aminmax(t)).abs().max() for t in full]).tolist() if full else [])
    return [next(values) if t.numel() else 0.0 for t in tensors]


def check_step(eps: float, a: torch.Tensor, what: str, option: str = "eps", warned: set | None = None) -> None:
    """Refuse an eps below the resolution of a's dtype at a's scale; warn when round-off or
    truncation dominates. ``what`` names the perturbed tensor, ``option`` the argument to change;
    ``warned``: the (what, zone) already warned about, once each (a training loop is not flooded)."""
    check_step_at(eps, max_abs([a])[0], a.dtype, what, option, warned)


def check_step_at(eps: float, amax: float, dtype: torch.dtype, what: str, option: str = "eps",
                  warned: set | None = None) -> None:
    """``check_step`` for a tensor of dtype ``dtype`` whose largest magnitude is ``amax``."""
    if not (math.isfinite(amax) and amax > 0):
        return  # all zero (or non-finite, which the finiteness checks report): no scale to judge
    spacing = torch.finfo(dtype).eps * amax
    suggest = balanced_step(dtype, amax)
    scale = f"max |value| {amax:.3g}, {dtype} spacing there {spacing:.3g}"
    if eps <= spacing:
        raise ValueError(f"{option}={eps!r} is below the resolution of {dtype} at the scale of {what} "
                         f"({scale}): a +- eps rounds to a and the estimate would be zero or noise; "
                         f"use {option} of about {suggest:g}")
    zone = "round-off" if eps < ROUNDOFF_WARN * spacing else "truncation" if eps > TRUNCATION_WARN * amax else None
    if zone is None or (warned is not None and (what, zone) in warned):
        return
    if warned is not None:
        warned.add((what, zone))
    if zone == "round-off":
        warnings.warn(f"{option}={eps!r} is within {ROUNDOFF_WARN:g} spacings of {dtype} at the scale of "
                      f"{what} ({scale}): round-off dominates the finite difference; "
                      f"{option} of about {suggest:g} balances round-off and truncation", stacklevel=3)
    else:
        warnings.warn(f"{option}={eps!r} is large against {what} ({scale}): truncation dominates the "
                      f"finite difference; {option} of about {suggest:g} balances round-off and "
                      f"truncation", stacklevel=3)
