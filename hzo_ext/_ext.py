"""Loads the compiled extension ``hzo_ext._C`` and remembers why when it cannot.

``HZO_EXT_DISABLE=1`` skips it, so every op runs its pure-PyTorch reference instead.
"""
from __future__ import annotations

import os

_C = None
load_error: str | None = None

if os.environ.get("HZO_EXT_DISABLE", "") not in ("", "0"):
    load_error = "disabled by HZO_EXT_DISABLE"
else:
    try:
        from . import _C  # noqa: F811  (registers the torch ops on import)
    except ImportError as exc:  # missing build, or an ABI mismatch with the installed torch
        load_error = f"{type(exc).__name__}: {exc}"


def has_extension() -> bool:
    """True when the compiled ops are loaded (and not disabled)."""
    return _C is not None
