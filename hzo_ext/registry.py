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
  fold. Opaque nodes (``BlackBox``, ``hzo_ext.opaque``, untraceable submodules) are always
  probed.

How the C++ executors run an op natively: ``lowering(module)`` gives the description of an
``_C.ExecNode`` (csrc/executor/stages.cpp) for the module types they run as ATen calls, and
``module_for_call`` the module equivalent to a call (``F.relu(x)``, ``torch.flatten(x, 1)``).

``register_elementwise(op, code=None)`` adds an elementwise op: the engine then probes it
with one colored probe and the SPP footprints treat it as elementwise.
The stage-wise engines read the same knowledge: SPP footprints (``hzo_ext.spp``) treat the
elementwise modules and calls here as elementwise, and the C++ lowering (``hzo_ext.executor``)
reads the tables of calls (``ELEMENTWISE_CALLS``, ``SUMS``, ``ARITHMETIC``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OpEntry", "ELEMENTWISE_CALLS", "SUMS", "ARITHMETIC", "BINARY", "ACT_CODES", "entry_for", "is_view",
           "register_elementwise", "module_for_call", "lowering", "is_stock", "binary_kind", "lookup"]

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
    "exp": None, "contiguous": None, "clone": None, "clamp": None, "clamp_min": None}


def module_for_call(target, args: tuple, kwargs: dict) -> nn.Module | None:
    """The module whose forward computes the call ``target(x, *args[1:], **kwargs)`` on x = args[0]
    (the C++ executor then runs it as that module), or None. Elementwise calls with no other
    argument (GELU: its approximate; in-place flags are ignored: the values are the same),
    ``flatten`` with constant dims, ``adaptive_avg_pool1d/2d`` with a constant size."""
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
    (code, alpha, beta) for ``ops.probe_elementwise`` from a module's settings, or None."""
    kind: str  # "elementwise", "affine" or "probed"
    kernel: object = None
    affine_args: tuple | None = None  # affine only in these positional args (None: in all); a probed
                                      # op folds the inputs found only there


def _fixed(name):
    return lambda m=None: (ACT_CODES[name], 0.0, 0.0)


def _elementwise(kernel=None):
    return OpEntry("elementwise", kernel)


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
           "transpose", "contiguous", "clone", "unsqueeze", "squeeze", "mean", "sum", "expand", "expand_as",
           "float", "double", "half", "bfloat16", "to", "type_as"):  # casts: the VJP casts the target back
    _CALLS[_c] = _AFFINE
for _c in (operator.truediv, operator.itruediv, torch.div, "div", "div_"):
    _CALLS[_c] = OpEntry("affine", affine_args=(0,))  # a / b is affine in a only
_PROBED = OpEntry("probed")
# Probed ops affine in some inputs: those fold (the VJP), the others are probed.
_CALLS[F.scaled_dot_product_attention] = OpEntry("probed", affine_args=(2,))  # a weighted sum of the values

# Ops whose output shares its input's storage (no memory of their own in the plan's prediction).
_VIEW_CALLS = {"view", "reshape", "flatten", "permute", "transpose", "unsqueeze", "squeeze", "expand", "expand_as",
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


def entry_for(op: str, target, module: nn.Module | None, inplace_kw: bool = False) -> OpEntry:
    """The entry of an fx node (op, target), ``module`` the called submodule for call_module.
    Opaque modules and modules that override their class's forward are probed. A module whose
    class is registered only through a parent class counts only when it keeps the parent's
    forward (a subclass with its own forward is probed)."""
    from .graph import is_opaque  # graph imports this module
    if op == "call_module":
        if module is None or is_opaque(module):
            return _PROBED
        for cls in type(module).__mro__:
            if cls in _MODULES:
                if type(module).forward is not cls.forward or "forward" in module.__dict__ \
                        or getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None):
                    return _PROBED
                if isinstance(module, nn.modules.conv._ConvNd) and \
                        type(module)._conv_forward is not getattr(cls, "_conv_forward", None):
                    return _PROBED
                return _MODULES[cls]
        return _PROBED
    if op in ("call_function", "call_method"):
        return lookup(_CALLS, target, _PROBED)
    return _PROBED


# ---- how the C++ executors run a module (the ExecNode kinds of csrc/executor/stages.cpp) ----------

_SIMPLE = {nn.ReLU.forward: "relu", nn.Tanh.forward: "tanh", nn.Sigmoid.forward: "sigmoid",
           nn.SiLU.forward: "silu", nn.Mish.forward: "mish", nn.Hardswish.forward: "hardswish",
           nn.Hardsigmoid.forward: "hardsigmoid",
           nn.Identity.forward: "identity", nn.Flatten.forward: "flatten", nn.GELU.forward: "gelu",
           nn.LeakyReLU.forward: "leaky_relu", nn.ELU.forward: "elu", nn.Softplus.forward: "softplus",
           nn.Hardtanh.forward: "hardtanh"}
_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BATCHNORM_RANKS = {nn.BatchNorm1d: [2, 3], nn.BatchNorm2d: [4], nn.BatchNorm3d: [5]}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


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
    calls, with the module's own tensors (an optimizer's updates are seen), or None."""
    if "forward" in mod.__dict__:  # a forward set on the instance runs in Python
        return None
    if is_stock(mod, nn.Linear):
        return "linear", [mod.weight, mod.bias], [], [], ""
    for cls, nd in _CONVS.items():
        if isinstance(mod, cls):
            if not is_stock(mod, cls, "_conv_forward") or mod.padding_mode != "zeros":
                return None
            text = mod.padding if isinstance(mod.padding, str) else ""
            pad = [0] * nd if text else _tup(mod.padding, nd)
            return "conv", [mod.weight, mod.bias], [nd, mod.groups] + _tup(mod.stride, nd) + pad + \
                _tup(mod.dilation, nd), [], text
    for cls, ranks in _BATCHNORM_RANKS.items():
        if isinstance(mod, cls):
            if not is_stock(mod, cls, "_check_input_dim") or mod.training or mod.running_mean is None \
                    or mod.running_var is None:
                return None
            momentum = 0.0 if mod.momentum is None else float(mod.momentum)
            return "batch_norm", [mod.weight, mod.bias, mod.running_mean, mod.running_var], ranks, \
                [momentum, float(mod.eps)], ""
    if type(mod) in _DROPOUTS:
        return None if mod.training else ("identity", [], [], [], "")
    kind = _SIMPLE.get(type(mod).forward)
    if kind == "gelu":
        return kind, [], [], [], mod.approximate
    if kind == "flatten":
        return kind, [], [mod.start_dim, mod.end_dim], [], ""
    if kind is not None:
        floats = {"leaky_relu": lambda: [mod.negative_slope], "elu": lambda: [mod.alpha],
                  "softplus": lambda: [mod.beta, mod.threshold],
                  "hardtanh": lambda: [mod.min_val, mod.max_val]}.get(kind, list)()
        # Never in place as the module asks: its input may be a clean activation later probes read
        # (the values are the same; query intermediates nothing else holds are still overwritten).
        return kind, [], [0], [float(f) for f in floats], ""
    if type(mod) in (nn.MaxPool1d, nn.MaxPool2d) and not mod.return_indices:
        nd = 1 if type(mod) is nn.MaxPool1d else 2
        return "max_pool", [], [nd, int(mod.ceil_mode)] + _tup(mod.kernel_size, nd) + _tup(mod.stride, nd) + \
            _tup(mod.padding, nd) + _tup(mod.dilation, nd), [], ""
    if type(mod) in (nn.AvgPool1d, nn.AvgPool2d):
        nd = 1 if type(mod) is nn.AvgPool1d else 2
        div = getattr(mod, "divisor_override", None)
        return "avg_pool", [], [nd, int(mod.ceil_mode), int(mod.count_include_pad), int(div is not None),
                                int(div or 0)] + _tup(mod.kernel_size, nd) + _tup(mod.stride, nd) + \
            _tup(mod.padding, nd), [], ""
    if type(mod) in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
        nd = 1 if type(mod) is nn.AdaptiveAvgPool1d else 2
        size = list(mod.output_size) if isinstance(mod.output_size, (tuple, list)) else [mod.output_size] * nd
        if nd == 1 and size[0] is None:  # adaptive_avg_pool1d takes no None
            return None
        return "adaptive_avg_pool", [], [nd] + [-1 if s is None else int(s) for s in size], [], ""
    return None
