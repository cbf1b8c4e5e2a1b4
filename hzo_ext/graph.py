"""Any model as a chain of stages: torch.fx traces it, cuts fall where one tensor is live.

An ``nn.Sequential`` (or a list) is the chain of its elements, as before. Any other module is
traced with torch.fx. Its graph is cut at every point of the topological order where exactly
one tensor is live (values that depend only on parameters and constants are recomputed where
they are used, so they never hold a cut open). The piece between two cuts is a stage: the leaf
module itself when the piece is one module call on the state (a Conv2d, a ReLU: the layer
knowledge of SPP and the C++ executor applies), else a ``GraphStage``, the piece's own fx graph
sharing the model's submodules and parameters (a residual block, a function call).

Opaque nodes are run, never looked into: ``BlackBox`` modules, modules marked with
``hzo_ext.opaque(module)``, and submodules torch.fx cannot trace (one warning names them).

``ModelWatch(model).changed()`` tells when the module tree, a parameter or buffer, or a torch
module's setting changed; the estimators ask it on every call and rebuild their stages, so a
stage appended after construction is used, never ignored.
"""
from __future__ import annotations

import inspect
import itertools
import math
import operator
import sys
import types
import warnings

import torch
from torch import fx, nn

from . import registry

__all__ = ["Stages", "GraphStage", "opaque", "is_opaque", "trace", "Traced", "stages_of", "ModelWatch"]

_OPAQUE_ATTR = "_hzo_opaque"
# Node results that are not tensors (sizes, dims): such a value never makes a cut.
_META_METHODS = {"size", "dim", "numel", "stride", "nelement", "ndimension", "is_contiguous", "get_device"}
_META_FUNCTIONS = {getattr, len, operator.getitem, torch.numel}
# Arithmetic, comparisons and asserts: on sizes alone they give sizes, bools or None
# (timm's ``_assert(H == self.img_size[0], ...)``).
_SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                    operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                    operator.not_, operator.and_, operator.or_, operator.pow, torch._assert,
                    math.sqrt, math.ceil, math.floor}  # 1 / math.sqrt(k.size(-1)) scales attention
# Attributes that are sizes or settings of a tensor (x.mT, x.T, x.real are tensors: not meta).
_META_ATTRS = {"shape", "ndim", "dtype", "device", "layout", "is_cuda", "requires_grad"}


def opaque(module: nn.Module) -> nn.Module:
    """Mark ``module`` opaque: traced models run it as one node, never looking into it."""
    setattr(module, _OPAQUE_ATTR, True)
    return module


def is_opaque(module: nn.Module) -> bool:
    """Run whole, never looked into: a BlackBox or a module marked with ``opaque``."""
    from .stages import BlackBox
    return isinstance(module, BlackBox) or getattr(module, _OPAQUE_ATTR, False)


class Stages(list):
    """The stages of a model (a list of modules) with their names in the model (``names[l-1]``)."""

    def __init__(self, modules, names=None):
        super().__init__(modules)
        self.names = list(names) if names is not None else [None] * len(self)


class GraphStage(nn.Module):
    """A piece of a traced model: its fx graph, on the model's own submodules and parameters."""

    def __init__(self, root: nn.Module, graph: fx.Graph, label: str):
        super().__init__()
        self.piece = fx.GraphModule(root, graph)
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.piece(x)

    def extra_repr(self) -> str:
        return self.label


def _is_setting(v) -> bool:
    """A plain setting, or a function a module calls (TransformerEncoderLayer.activation)."""
    if isinstance(v, tuple):
        return all(map(_is_setting, v))
    return isinstance(v, (bool, int, float, str, type(None), types.FunctionType, types.BuiltinFunctionType))


class ModelWatch:
    """What a model's stages, their geometry and their lowering were made from, read again
    cheaply on every call: the identity of every module's parameters, buffers and children (a
    replaced or appended module, a replaced parameter or buffer), the parameters' shapes and
    requires_grad, every module's number of forward hooks, its class and any forward set on the
    instance, and the plain settings (stride,
    negative_slope, training, ...) of torch modules and of the modules in ``traced`` (those
    torch.fx traced through: it bakes their ``self.scale`` or ``self.use_act`` into the graph;
    other modules run their own Python, which reads their attributes anew). In-place updates
    of values (optimizer steps, load_state_dict) change nothing."""

    def __init__(self, model, traced=()):
        tops = model if isinstance(model, (list, tuple)) else [model]
        mods = [m for top in tops if isinstance(top, nn.Module) for m in top.modules()]
        self._tops = list(tops)
        self._dicts = [d for m in mods for d in (m._parameters, m._buffers, m._modules)]
        self._params = [p for m in mods for p in m._parameters.values() if p is not None]
        traced = set(map(id, traced))
        self._settings = [(m.__dict__, k) for m in mods if type(m).__module__.startswith("torch.") or id(m) in traced
                          for k, v in m.__dict__.items() if not k.startswith("_") and _is_setting(v)]
        self._mods = mods
        self._seen = self._read()

    def _read(self) -> tuple:
        values = itertools.chain.from_iterable(map(dict.values, self._dicts))
        return (list(map(id, self._tops)), list(map(id, values)), [p.shape for p in self._params],
                [p.requires_grad for p in self._params], [d.get(k) for d, k in self._settings],
                [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self._mods],
                [(type(m), m.__dict__.get("forward")) for m in self._mods])  # a patched class or forward

    def changed(self) -> bool:
        return self._read() != self._seen


# ---- tracing --------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    def __init__(self, opaque_ids: set):
        super().__init__()
        self.opaque_ids = opaque_ids
        self.without_grad: set = set()  # nodes traced inside torch.no_grad() (fx keeps no trace of it)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if not torch.is_grad_enabled() and node.op.startswith("call"):
            self.without_grad.add(node)
        return node

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .registry import entry_for  # registered module types are ops, never traced into
        return id(m) in self.opaque_ids or is_opaque(m) or super().is_leaf_module(m, qualname) or \
            entry_for("call_module", None, m).kind != "probed"


def _defaults(module: nn.Module) -> dict:
    """The defaults of forward's arguments after the first: traced as those constants."""
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _traces(module: nn.Module, opaque_ids: set) -> bool:
    try:
        _Tracer(opaque_ids).trace(module, concrete_args=_defaults(module))
        return True
    except Exception:  # noqa: BLE001 (whatever the user's forward raises on proxies)
        return False


def _untraceable(module: nn.Module, prefix: str, opaque_ids: set):
    """(name, module) of the innermost submodule that does not trace (module itself when all its
    children do), or None when module traces."""
    if _traces(module, opaque_ids):
        return None
    for name, child in module.named_children():
        if id(child) in opaque_ids or _Tracer(opaque_ids).is_leaf_module(child, name):
            continue
        found = _untraceable(child, f"{prefix}.{name}" if prefix else name, opaque_ids)
        if found is not None:
            return found
    return prefix, module


def _trace(model: nn.Module) -> tuple[fx.Graph, list[str], set]:
    """The model's graph, with untraceable submodules made opaque (their names returned), and
    the nodes traced inside torch.no_grad()."""
    opaque_ids: set = set()
    names: list[str] = []
    while True:
        try:
            tracer = _Tracer(opaque_ids)
            with torch.enable_grad():
                return tracer.trace(model, concrete_args=_defaults(model)), names, tracer.without_grad
        except Exception as exc:  # noqa: BLE001
            name, bad = _untraceable(model, "", opaque_ids) or ("", model)
            if bad is model:
                raise TypeError(f"torch.fx cannot trace {type(model).__name__}.forward ({type(exc).__name__}: "
                                f"{exc}); pass an nn.Sequential of stages, or mark the parts that do not trace "
                                f"with hzo_ext.opaque(module)") from exc
            opaque_ids.add(id(bad))
            names.append(f"{name} ({type(bad).__name__})")


def _user_stacklevel() -> int:
    """The ``stacklevel`` (1: the function calling warnings.warn, which calls this) of the first
    frame outside hzo_ext, so that a warning points at the user's line (HZO(...),
    est.backward(...)) whatever the depth inside."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("hzo_ext"):
        frame, level = frame.f_back, level + 1
    return level


def _warn_stop_gradients(graph: fx.Graph, without_grad: set) -> None:
    """``.detach()``, ``.data`` and ``torch.no_grad()`` inside forward are autograd instructions;
    a zeroth-order estimate follows the values, so gradients flow through them in the op-level
    engine (a stage-wise engine's autograd leaf honours them inside its stage; a detached
    parameter gets none): one warning naming them. ``x.data`` becomes ``x.detach()``."""
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is getattr and n.args[1:] == ("data",):
            with graph.inserting_before(n):
                detached = graph.call_method("detach", (n.args[0],))
            n.replace_all_uses_with(detached)
            graph.erase_node(n)
    stops = [n.name for n in graph.nodes if n in without_grad or (n.op.startswith("call") and n.target in (
        "detach", "detach_", torch.detach))]
    if stops:
        shown = ", ".join(stops[:6]) + (f" and {len(stops) - 6} more" if len(stops) > 6 else "")
        warnings.warn(f"{shown}: .detach(), .data and torch.no_grad() inside forward are autograd instructions; a "
                      f"zeroth-order estimate follows the values, so gradients flow through them (split='auto'; "
                      f"inside one stage of split='bisect'/'chain' the stage's autograd leaf honours them, and a "
                      f"detached parameter gets none)", stacklevel=_user_stacklevel())


# ---- cutting --------------------------------------------------------------------------------

def _is_meta(node: fx.Node, meta: set) -> bool:
    """The node's value is a size, a dim or another non-tensor derived from shapes."""
    if node.op == "call_method" and node.target in _META_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _META_ATTRS
    if node.op == "call_function" and node.target in _META_FUNCTIONS:
        return node.target is not operator.getitem or any(a in meta for a in node.all_input_nodes)
    if node.op == "call_function" and node.target in _SIZE_ARITHMETIC:
        return all(a in meta for a in node.all_input_nodes)
    return False


_NOT_SIZES = {"device", "dtype", "ndim", "layout", "is_cuda", "requires_grad"}


def _other_than_batch(n: fx.Node, batch_sizes: set) -> bool:
    """The meta node n is certainly not a tensor's first size (x.size(1), x.shape[2], x.device,
    arithmetic on such sizes); anything else (x.shape, x.size(0), numel) may hold the batch's."""
    k = n.args[1] if len(n.args) > 1 else None
    if n.op == "call_function" and n.target is getattr:
        return k in _NOT_SIZES
    if n.op == "call_method":
        return n.target in ("dim", "ndimension", "get_device", "is_contiguous") or (
            n.target == "size" and type(k) is int and k >= 1)
    if n.op == "call_function" and n.target is operator.getitem:  # x.shape[k]
        return type(k) is int and k >= 1
    return n.op == "call_function" and n.target in _SIZE_ARITHMETIC and \
        not any(a in batch_sizes for a in n.all_input_nodes)


class Traced:
    """A model's graph with its one input ``x`` and output ``out``; ``order``: the nodes whose
    value depends on x (x first), in topological order; ``meta``: those of them that are sizes
    or other non-tensors; ``shared``: those that are tensors made from constants and sizes
    other than the batch's (no target, the same for every sample); ``through``: the modules
    whose Python fx ran (the root and containers, not the leaves it recorded as calls)."""

    def __init__(self, graph: fx.Graph, x: fx.Node, out: fx.Node, order: list, meta: set, through: list,
                 shared: set = frozenset()):
        self.graph, self.x, self.out, self.order, self.meta, self.through = graph, x, out, order, meta, through
        self.shared = shared


def trace(model: nn.Module) -> Traced:
    """Trace ``model`` (untraceable submodules opaque, one warning naming them), keep one input."""
    graph, untraced, without_grad = _trace(model)
    if untraced:
        warnings.warn(f"torch.fx cannot trace {', '.join(untraced)}: run as opaque nodes (whole, never split)",
                      stacklevel=_user_stacklevel())
    _warn_stop_gradients(graph, without_grad)
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if not inputs:
        raise TypeError(f"{type(model).__name__}.forward takes no input")
    x = inputs[0]
    # Arguments after x keep their defaults; fx guards them with asserts that nothing else uses.
    extra = set(inputs[1:])
    for n in nodes:
        if n.op != "output" and n not in extra and any(a in extra for a in n.all_input_nodes):
            extra.add(n)
    if any(u not in extra for n in extra for u in n.users):
        raise TypeError(f"{type(model).__name__}.forward uses {len(inputs)} inputs "
                        f"({', '.join(n.target for n in inputs)}); the estimators pass one tensor x [B, ...]")
    for n in reversed(nodes):
        if n in extra:
            graph.erase_node(n)
    registry.decompose(graph, model)
    nodes = list(graph.nodes)
    out = next(n for n in nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node):
        raise TypeError(f"{type(model).__name__}.forward returns {type(out).__name__}; the estimators need "
                        f"one tensor [B, ...]")

    # Values that depend on x are state; the rest (parameters, constants) are recomputed per piece.
    state, meta = {x}, set()
    for n in nodes:
        if n.op not in ("placeholder", "output") and any(a in state for a in n.all_input_nodes):
            state.add(n)
            if _is_meta(n, meta):
                meta.add(n)
    # Tensors made from constants and sizes other than the batch's alone (a causal mask
    # torch.ones(L, L, device=x.device).tril()): the same for every sample and every probe, never
    # given a target or stacked with the batch. A size that may be the batch's (x.shape,
    # x.size(0), numel) makes a tensor per sample (cls_token.expand(x.shape[0], -1, -1)), and a
    # parameter one that needs a target for its leaf (position embeddings of arange(x.size(1))).
    params = {name for name, _ in model.named_parameters()}
    reads_params = lambda n: (n.op == "get_attr" and n.target in params) or (  # noqa: E731
        n.op == "call_module" and next(model.get_submodule(n.target).parameters(), None) is not None)
    data, batch_sizes, trained = {x}, set(), set()
    for n in nodes:
        if reads_params(n) or any(a in trained for a in n.all_input_nodes):
            trained.add(n)
        if n in meta:
            if not _other_than_batch(n, batch_sizes):
                batch_sizes.add(n)
        elif n in state and (n in trained or any(a in data or a in batch_sizes for a in n.all_input_nodes)):
            data.add(n)
    shared = state - data - meta
    order = [n for n in nodes if n in state]  # x first
    leaves = {n.target for n in nodes if n.op == "call_module"}
    through = [m for name, m in model.named_modules()
               if not any(name == leaf or name.startswith(leaf + ".") for leaf in leaves)]
    return Traced(graph, x, out, order, meta, through, shared)


def stages_of(model: nn.Module) -> Stages:
    """The chain of stages of a traced model (see the module docstring)."""
    t = trace(model)
    out, order, meta = t.out, t.order, t.meta
    pos = {n: i for i, n in enumerate(order)}
    last_use = {n: max([pos[u] for u in n.users if u in pos] + [len(order) if n is out else -1]) for n in order}

    cuts = [0]  # positions i: the single live value after order[i]
    for i, n in enumerate(order[1:], start=1):
        live = [v for v in order[:i + 1] if last_use[v] > i]
        if len(live) == 1 and live[0] is n and n not in meta and i < pos[out] \
                and not all(u.target is operator.getitem for u in n.users):
            cuts.append(i)
    cuts.append(pos[out])
    if pos[out] == 0:
        raise TypeError(f"{type(model).__name__}.forward returns its input unchanged: nothing to estimate")

    modules, names = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = order[a + 1:b + 1]
        only = piece[0]
        if len(piece) == 1 and only.op == "call_module" and only.args == (order[a],) and not only.kwargs:
            modules.append(model.get_submodule(only.target))
            names.append(only.target)
        else:
            modules.append(GraphStage(model, _piece_graph(order[a], piece), _label(piece)))
            names.append(_label(piece))
    return Stages(modules, names)


def _piece_graph(inp: fx.Node, piece: list[fx.Node]) -> fx.Graph:
    """A graph of the nodes ``piece`` on the input ``inp``, recomputing the constants it uses."""
    g = fx.Graph()
    env = {inp: g.placeholder("x")}

    def copy(n: fx.Node) -> fx.Node:
        if n not in env:
            for a in n.all_input_nodes:
                copy(a)  # a constant's inputs (get_attr, other constants)
            env[n] = g.node_copy(n, lambda a: env[a])
        return env[n]

    for n in piece:
        copy(n)
    g.output(env[piece[-1]])
    return g


def _label(piece: list[fx.Node]) -> str:
    names = [str(n.target) if n.op == "call_module" else n.name for n in piece]
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
