"""The planner from Python: ``hzo_ext.plan(model, x)`` and which implementation plans.

``hzo_ext.build_plan(shapes, batch, ...)`` plans from per-sample shapes alone;
``hzo_ext.plan(model, x, ...)`` plans the splits ``HZO(model, ...)`` would run for input x
(one clean forward for the shapes; no loss needed). Both use the C++ planner
(``csrc/core/plan.h``, bound as ``hzo_ext._C.build_plan``) when the extension is loaded and
the pure-Python one otherwise, with identical results (docs/planner.md).
"""
from __future__ import annotations

import torch

from . import _ext
from .estimator import HZO, Plan

__all__ = ["plan", "planner_backend"]


def _no_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    raise AssertionError("hzo_ext.plan never evaluates the loss")


def plan(model, x: torch.Tensor, split="bisect", chunk_size: int | None = None, spp="auto",
         query_dtype: torch.dtype | None = None) -> Plan:
    """The tree of splits, probes, queries and predicted query memory of one HZO estimate of
    ``model`` on input ``x``; the options are HZO's. Prints readably: ``print(hzo_ext.plan(m, x))``."""
    est = HZO(model, _no_loss, split=split, chunk_size=chunk_size, spp=spp, query_dtype=query_dtype)
    return est.plan(x)


def planner_backend() -> str:
    """'cpp' when build_plan runs the C++ planner, 'python' on the fallback."""
    return "cpp" if getattr(_ext._C, "build_plan", None) is not None else "python"
