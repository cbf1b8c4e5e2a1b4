"""hzo_ext: Hierarchical Zeroth-Order (HZO) gradient estimation for deep networks.

Forward queries only, as a drop-in for ``loss.backward()``; see README.md, DESIGN.md and
docs/estimator.md.
"""
from . import ops
from ._ext import has_extension
from .baselines import CGE, SPSA, Backprop, SPSABlock
from .estimator import HZO, EstimateStats, Plan, Split, build_plan
from .info import info
from .graph import opaque
from .metrics import (grads_of, named_grads, per_layer_cosine, per_parameter_cosine, reference_grads,
                      reference_named_grads)
from .planner import plan, planner_backend
from .stages import BlackBox, ResidualBlock

__all__ = ["ops", "has_extension", "info", "HZO", "CGE", "SPSA", "SPSABlock", "Backprop", "BlackBox", "ResidualBlock",
           "opaque", "EstimateStats", "Plan", "Split", "build_plan", "plan", "planner_backend", "per_layer_cosine",
           "reference_grads", "grads_of", "named_grads", "reference_named_grads", "per_parameter_cosine"]
__version__ = "0.1.0"
