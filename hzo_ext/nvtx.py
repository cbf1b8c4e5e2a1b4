"""NVTX ranges for Nsight Systems / Nsight Compute (``--nvtx --nvtx-include``), named as in
docs/profiling.md: hzo/estimate, hzo/head, hzo/level<k>, hzo/split<i>-<m>-<j>/{perturb,query,
contract}, hzo/leaves. A no-op context manager when CUDA is unavailable, so CPU runs pay
nothing but a function call.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["nvtx_range"]

_ENABLED = torch.cuda.is_available()


@contextlib.contextmanager
def _range(name: str):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str):
    """``with nvtx_range("hzo/head"): ...`` marks the block on the profiler's timeline."""
    return _range(name) if _ENABLED else contextlib.nullcontext()
