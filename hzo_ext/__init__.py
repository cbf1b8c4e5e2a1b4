"""hzo_ext: Hierarchical Zeroth-Order (HZO) gradient estimation for deep networks.

Forward queries only, as a drop-in for ``loss.backward()``; see README.md and DESIGN.md.
"""
from . import ops
from ._ext import has_extension
from .info import info

__all__ = ["ops", "has_extension", "info"]
__version__ = "0.1.0"
