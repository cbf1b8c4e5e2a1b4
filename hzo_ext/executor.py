"""The C++ executor of HZO estimates: lowering of stages, and the Python side of one estimate.

``HZO(..., executor="cpp")`` (or ``"auto"`` when the extension is loaded and every option is
supported) runs a whole estimate in C++ (``csrc/executor``): clean forward, loss head, the
splits level by level (``hzo_ext::perturb``, the right sub-network, ``hzo_ext::contract_sized``
or, for SPP splits, ``contract_spp``), leaves. Each stage is *lowered* here into a tree of
``_C.ExecNode``: a standard module (Linear, Conv1d/2d/3d, eval BatchNorm, activations,
pooling, Flatten, eval Dropout, Identity, Sequential, ``ResidualBlock``) becomes a node that calls the same ATen op with the same
arguments as the module's forward (and holds the module's own parameter tensors, so optimizer
updates are seen); anything else becomes a callback into Python, called once per use. Models of
standard modules only make no Python call during an estimate.

The queries are bit-for-bit those of the Python path, so the targets agree exactly; the leaves
run as one autograd call and may differ by round-off. ``fast=True`` trades that bitwise
agreement for less work: +-eps folded into large first Linears of right sub-networks, small
same-shaped right sub-networks of a level stacked into one batched query, small GELUs on ATen's
kernel rather than oneDNN's (docs/executor.md).
"""
from __future__ import annotations

import functools
import itertools
import math
import operator
import re
import time

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from . import _ext
from .registry import CHECKS, SUMS, binary_kind, is_stock as _stock, lookup, lowering, module_for_call
from .stages import BlackBox, ResidualBlock, check_batch, check_stages_dynamic, check_stages_static, run_stage

__all__ = ["unsupported_option", "select", "CppExecutor", "lower"]

EXECUTORS = ("auto", "python", "cpp")


# ---- which estimators the C++ executor runs ------------------------------------------------------

def unsupported_option(est) -> str | None:
    """Why the C++ executor cannot run this estimator (naming the option), or None."""
    if not _ext.has_extension():
        return f"the compiled extension is not loaded ({_ext.load_error})"
    if est.query_dtype is not None:
        return f"query_dtype={est.query_dtype} is not supported by the C++ executor"
    if getattr(est, "process_group", None) is not None:
        return "process_group is not supported by the C++ executor"
    if getattr(est, "query_parallel", None):
        return "query_parallel is not supported by the C++ executor"
    for l, stage in enumerate(est.stages, start=1):
        for name, mod in stage.named_modules():
            if isinstance(mod, BlackBox):
                where = f", submodule {name!r}" if name else ""
                return (f"stage {l} ({type(stage).__name__}){where} is a BlackBox (zeroth-order leaves run "
                        f"on the Python path)")
    return None


def select(est, executor: str, fast: bool):
    """The CppExecutor for ``est``, or None for the Python path; ValueError for executor='cpp'
    (or fast=True) when the C++ executor cannot run it."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if not isinstance(fast, bool):
        raise ValueError(f"fast must be a bool, got {fast!r}")
    if executor == "python":
        if fast:
            raise ValueError("fast=True needs the C++ executor (executor='cpp' or 'auto')")
        return None
    why = unsupported_option(est)
    if why is None:
        return CppExecutor(est, fast)
    if executor == "cpp":
        raise ValueError(f"executor='cpp': {why}; use executor='python' or 'auto'")
    return None  # auto: the Python path (fast=True changes nothing there but the round-off)


# ---- lowering ------------------------------------------------------------------------------------

def _copy_in(fn):
    """Python code called from C++ gets a copy of its input: it may write it in place, and the
    input may be a clean activation that later probes read. That keeps the model's meaning only
    where nothing else reads the input afterwards: Python modules whose input another branch
    also reads (the first module of a residual branch or shortcut) are not lowered around (see
    ``_first_runs_in_python``); the enclosing block runs in Python instead."""
    return lambda a: fn(a.clone())


def _first_runs_in_python(mod: nn.Module, python: list) -> bool:
    """The first module ``mod`` runs on its input is one lowering left to Python."""
    while _stock(mod, nn.Sequential) and len(mod):
        mod = mod[0]
    return any(m is mod for m in python)


def _hooked(mod: nn.Module) -> bool:
    return bool(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks)


def _node(mod: nn.Module, callback, watch: list, python: list):
    """The ExecNode of one module. `callback(mod)` makes its Python fallback (recorded in
    `python`). `watch` collects (module, lowered natively) for revalidation: a native module
    must not change, a module run in Python for its hooks must keep them."""
    from . import _C
    Node = _C.ExecNode

    def fallback():
        python.append(mod)
        return Node("callback", [], [], [], "", [], _copy_in(callback(mod)))

    if _hooked(mod):
        watch.append((mod, False))
        return fallback()
    if parametrize.is_parametrized(mod) or isinstance(mod, nn.modules.lazy.LazyModuleMixin):
        return fallback()
    node = _native(mod, callback, watch, python)
    if node is None:
        return fallback()
    watch.append((mod, True))
    return node



def _writes_input(n: fx.Node, module: nn.Module | None = None) -> bool:
    """An in-place call (``x.add_(1)``, ``F.relu(x, inplace=True)``, ``x += 1``) or module
    (``ELU(inplace=True)``: ``module`` is the one n calls)."""
    if n.op == "call_module":
        return getattr(module, "inplace", False) is True
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return bool(n.kwargs.get("inplace")) or (name.endswith("_") and not name.startswith("_")) or (
        n.op == "call_function" and name.startswith("i") and getattr(operator, name, None) is n.target)


def _function_module(n: fx.Node) -> nn.Module | None:
    """The module whose forward is the call n on its first argument (``registry.module_for_call``),
    or None."""
    return module_for_call(n.target, n.args, n.kwargs) if n.op in ("call_function", "call_method") else None


def _lower_piece(stage, callback, watch: list, python: list):
    """The node of a traced piece (graph.GraphStage) made of module calls, lowerable functions
    and sums of two branches from one value (residual blocks), or None (the piece runs in
    Python). Nodes it cannot lower that have one state input run as one-node callbacks."""
    from . import _C
    from .graph import GraphStage, _piece_graph
    Node = _C.ExecNode
    g = stage.piece.graph
    x = next(n for n in g.nodes if n.op == "placeholder")
    out = next(n for n in g.nodes if n.op == "output").args[0]
    state = {x}
    for n in g.nodes:
        if n.op not in ("placeholder", "output") and any(a in state for a in n.all_input_nodes):
            state.add(n)
    ops: dict = {}  # state node -> (its one state input or the two added ones, its node or None)
    for n in g.nodes:
        if n not in state or n is x:
            continue
        ins = [a for a in n.all_input_nodes if a in state]
        if any(u.target is operator.getitem and isinstance(u.args[1], int) for u in n.users):
            return None  # a tuple (an LSTM's output): the ExecNodes pass tensors; the piece runs in Python
        writes = _writes_input(n, stage.piece.get_submodule(n.target) if n.op == "call_module" else None)
        if n.target in SUMS and len(ins) == 2 and len(n.args) == 2 and not n.kwargs and not writes:
            ops[n] = (tuple(ins), None)
        elif len(ins) != 1:
            return None  # a value from several (products, cat, sizes, g.add_(h)): the piece runs in Python
        elif writes and len(ins[0].users) > 1:
            return None  # in place on a value other nodes read (x.relu_(); b(x)): the piece runs in Python
        elif n.op == "call_module" and n.args == (ins[0],) and not n.kwargs:
            sub = stage.piece.get_submodule(n.target)
            ops[n] = (ins[0], _node(sub, callback, watch, python))
            if len(ins[0].users) > 1 and _first_runs_in_python(sub, python):
                return None  # Python code on a value other nodes read: the piece runs in Python
        elif (as_module := _function_module(n)) is not None:
            ops[n] = (ins[0], _native(as_module, callback, watch, python))
        else:  # one node in Python: slicing, padding, other functions
            one = GraphStage(stage.piece, _piece_graph(ins[0], [n]), n.name)
            python.append(one)
            ops[n] = (ins[0], Node("callback", [], [], [], "", [], _copy_in(callback(one))))

    def ancestors(v):  # v and the values it is computed from, nearest first, along first inputs
        chain = [v]
        while chain[-1] is not x:
            src = ops[chain[-1]][0]
            chain.append(src[0] if isinstance(src, tuple) else src)
        return chain

    def chain(nodes):
        return Node("seq", [], [], [], "", nodes, None) if nodes else Node("identity", [], [], [], "", [], None)

    def seq(v, base) -> list:  # the nodes computing v from base (None inside: not lowerable)
        nodes = []
        while v is not base:
            src, node = ops[v]
            if isinstance(src, tuple):  # v = a + b: a residual block on their nearest common value
                a, b = src
                common = next(c for c in ancestors(a) if c in set(ancestors(b)))
                branch, skip = seq(a, common), seq(b, common)
                if not branch:  # (common) + b: the same sum, the other way round
                    branch, skip = skip, branch
                node = None if None in branch + skip else Node(
                    "residual", [], [], [], "", [chain(branch)] + ([chain(skip)] if skip else []), None)
                v = common
            else:
                v = src
            nodes.append(node)
        return nodes[::-1]

    try:
        nodes = seq(out, x)
    except (KeyError, StopIteration):  # a value not computed from x along the recorded inputs
        return None
    if None in nodes:
        return None
    return Node("seq", [], [], [], "", nodes, None)


def _native(mod: nn.Module, callback, watch: list, python: list):
    """The node of a standard module, calling the ATen op its forward calls, or None."""
    from . import _C
    from .graph import GraphStage
    Node = _C.ExecNode
    if isinstance(mod, GraphStage):
        return _lower_piece(mod, callback, watch, python)
    if _stock(mod, nn.Sequential):
        return Node("seq", [], [], [], "", [_node(c, callback, watch, python) for c in mod if c is not None], None)
    if _stock(mod, ResidualBlock):
        kids = [mod.module] + ([] if mod.shortcut is None else [mod.shortcut])
        nodes = [_node(c, callback, watch, python) for c in kids]
        if any(_first_runs_in_python(c, python) for c in kids):
            return None  # it may write the input the other path reads: the block runs in Python
        return Node("residual", [], [], [], "", nodes, None)
    low = lowering(mod)  # a leaf module type the C++ executors run natively
    return None if low is None else Node(*low, [], None)


def lower(stages) -> tuple[list, list, set]:
    """(ExecNode per stage, the modules to watch (see _node), the stages with Python parts)."""
    watch: list = []
    nodes, python_stages = [], set()
    for l, stage in enumerate(stages, start=1):
        top = functools.partial(run_stage, stages, l)  # a whole stage in Python: the Python path's errors
        python: list = []
        nodes.append(_node(stage, lambda mod, top=top, stage=stage: top if mod is stage else mod, watch, python))
        if python:
            python_stages.add(l)
    return nodes, watch, python_stages


_MODE_MATTERS = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _state(watch) -> tuple:
    """What lowering read from the modules that can change without a new object: hooks, the
    identity of parameters, buffers and children (a replaced tensor or child means lowering
    again), and the mode of BatchNorm/Dropout. Flat lists, so the per-estimate check is cheap."""
    mods = [m for m, native in watch if native]
    hooked = [m for m, native in watch if not native]
    hook_dicts = [d for m in mods for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                            m._backward_pre_hooks)]
    dicts = [d for m in mods for d in (m._parameters, m._buffers, m._modules) if d]
    moded = [m for m in mods if isinstance(m, _MODE_MATTERS)]
    return hook_dicts, hooked, dicts, _ids(dicts), moded, [m.training for m in moded]


def _ids(dicts) -> list[int]:
    return list(map(id, itertools.chain.from_iterable(map(dict.values, dicts))))


def _same_state(state) -> bool:
    hook_dicts, hooked, dicts, ids, moded, modes = state
    return (not any(hook_dicts) and all(map(_hooked, hooked)) and _ids(dicts) == ids
            and [m.training for m in moded] == modes)


# ---- one estimate ----------------------------------------------------------------------------------

_REDUCTIONS = {"mean": 1, "sum": 2}


def _loss_spec(loss) -> tuple:
    """(kind, weight, ignore_index, label_smoothing, reduction) of a loss the C++ head runs natively."""
    fn = loss.reduced
    if fn is not None and fn.reduction in _REDUCTIONS:
        if _stock(fn, nn.CrossEntropyLoss):
            return ("cross_entropy", fn.weight, int(fn.ignore_index), float(fn.label_smoothing),
                    _REDUCTIONS[fn.reduction])
        if _stock(fn, nn.MSELoss):
            return "mse", None, -100, 0.0, _REDUCTIONS[fn.reduction]
    return "callback", None, -100, 0.0, 1


class CppExecutor:
    """Runs ``HZO.backward`` in C++ for one estimator; lowering and plans are cached and
    re-validated cheaply on every call (parameter/buffer/child identity, modes, hooks)."""

    def __init__(self, est, fast: bool = False):
        self.est = est
        self.fast = fast
        self._low = None  # see _lower
        self._options = None  # see _read_options
        self._plans: dict = {}
        self.last_outcome: dict = {}  # the C++ side's counts of the last estimate (folded, stacked, ...)

    # -- cache

    def _lower(self):
        """(Executor, the lowered modules' state, stages with Python parts, first parameter of
        each stage)."""
        est = self.est
        from . import _C
        nodes, watch, python_stages = lower(est.stages)
        params = [list(s.parameters()) for s in est.stages]
        kind, weight, ignore, smoothing, reduction = _loss_spec(est.loss)
        core = _C.Executor(nodes, params, kind, weight, ignore, smoothing, reduction, est.eps,
                           est.eps_mode == "relative", est.chunk_size, self.fast)
        self._low = (core, _state(watch), python_stages, [p[0] for p in params if p])
        self._options = self._read_options()
        self._plans.clear()
        return self._low

    def _read_options(self) -> tuple:
        """The estimator's options the lowering and the plans were made with (eps schedules change them)."""
        est = self.est
        return est.eps, est.eps_mode, est.chunk_size, est.spp, est._stage_split

    def _plan(self, core, x, acts):
        from . import _C
        key = (tuple(x.shape), x.dtype, x.device)
        plan = self._plans.get(key)
        if plan is None:
            est = self.est
            shapes = [tuple(a.shape[1:]) for a in acts]
            py_plan = est._build_plan(shapes, x.shape[0], x.dtype.itemsize)
            levels = []
            for level in py_plan.levels:
                rows = []
                for s in level:
                    coloring = est._split_coloring(s.m, s.j, shapes)
                    n, q = math.prod(shapes[s.m]), math.prod(shapes[s.j])
                    if s.dense:
                        rows.append((s.i, s.m, s.j, s.probes, s.queries, n, q, None))
                        continue
                    spp = (coloring.colors(x.device), coloring.boxes(x.device), coloring.in_shape,
                           coloring.geometry_out, coloring.channelwise)
                    rows.append((s.i, s.m, s.j, s.probes, s.queries, n, q, spp))
                levels.append(rows)
            plan = (_C.ExecPlan(levels, math.prod(shapes[-1]), est.chunk_size, str(x.device)), py_plan)
            self._plans[key] = plan
        return plan

    # -- the estimate

    def _checked_lowering(self, x, y):
        """The Python path's input and static checks (stages.check_batch, check_stages_static),
        in its order, then the lowering, done again when a lowered module changed. With an
        unchanged lowering, check_batch's per-stage parameter loop runs quickly (the full check,
        for its message, only when something is wrong) and the static check only for stages
        that run in Python (the lowering's state covers the others' modes)."""
        est = self.est
        if self._low is None or not _same_state(self._low[1]) or self._options != self._read_options():
            check_batch(x, y, est.stages)
            check_stages_static(est.stages)
            return self._lower()
        check_batch(x, y, [])
        if any((p.is_floating_point() and p.dtype != x.dtype) or p.device != x.device for p in self._low[3]):
            check_batch(x, y, est.stages)
        if self._low[2]:
            check_stages_static(est.stages)
        return self._low

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from .estimator import EstimateStats
        t0 = time.perf_counter()
        est = self.est
        core, _, python_stages, _ = self._checked_lowering(x, y)
        stats = est.last_stats = EstimateStats()
        try:
            return self._estimate(core, python_stages, x, y, stats, t0)
        finally:
            core.release()  # activations and graphs, also when a check raised

    def _estimate(self, core, python_stages, x, y, stats, t0) -> torch.Tensor:
        from .estimator import _check_finite
        est = self.est
        try:
            acts = core.forward(x)
        except Exception:
            est._clean_forward(x)  # raises the Python path's error for this input
            raise
        stats.forward_calls = core.forward_python_calls
        key = (tuple(x.shape), x.dtype, x.device)
        if est.check_samples and key not in est._dynamic_checked:
            # lowered stages are per-sample ATen ops by construction: check the Python ones
            check_stages_dynamic(est.stages, acts, only=python_stages)
            est._dynamic_checked.add(key)
        plan, py_plan = self._plan(core, x, acts)
        est._check_steps(acts, [s.m for s in py_plan.splits] + [len(acts) - 1])
        native = self._native_loss(acts[-1], y)
        loss = None if native and est.loss._checked else est.loss.check_reproduces(acts[-1], y)
        callback = None if native else est._per_sample_loss(y, x.shape[0])
        out = self.last_outcome = core.estimate(plan, y, callback, loss is None)
        stats.forward_calls += out["python_calls"]
        stats.loss_evals += out["loss_evals"]
        if out["failure"] == "head":
            _check_finite(out["bad"], "the per-sample loss on perturbed logits (loss head)")
        if out["failure"]:  # name the stage as the Python path does: rerun that split's queries
            s = py_plan.levels[out["level"]][out["index"]] if out["failure"] == "split" else None
            if s is not None:
                shapes = [tuple(a.shape[1:]) for a in acts]
                est._check_probe(out["bad"], est.stages, acts[s.m], s.m, s.j, est._step(acts[s.m]),
                                 f"while probing split ({s.i}, {s.m}, {s.j}] (perturbed a_{s.m})",
                                 est._split_coloring(s.m, s.j, shapes))
            raise ValueError(f"non-finite value (inf/nan) in the C++ executor's {out['failure']}")
        stats.fd_layer_evals, stats.probes, stats.splits = out["fd_layer_evals"], out["probes"], out["splits"]
        stats.seconds = time.perf_counter() - t0
        return (out["loss"] if loss is None else loss).detach()

    def _native_loss(self, logits: torch.Tensor, y: torch.Tensor) -> bool:
        """The C++ head runs the loss itself (CrossEntropy/MSE with plain targets), else it calls
        the Python per-sample loss."""
        kind = _loss_spec(self.est.loss)[0]
        if kind == "cross_entropy":
            if y.dtype == torch.int64:
                return y.dim() == logits.dim() - 1
            return y.dtype == logits.dtype and y.shape == logits.shape
        if kind == "mse":
            return y.dtype == logits.dtype and y.shape == logits.shape
        return False


# ---- the op-level engine in C++ (the default engine's estimates) ----------------------------------

def ops_unsupported(est, program) -> str | None:
    """Why the C++ op-level engine cannot run ``program`` for ``est`` (naming the op), or None;
    the Python op-level engine runs it then."""
    if not _ext.has_extension():
        return f"the compiled extension is not loaded ({_ext.load_error})"
    if est.query_dtype is not None:
        return f"query_dtype={est.query_dtype} is not supported by the C++ executor"
    for s in program.steps:
        if isinstance(s.module, BlackBox):
            return f"op {s.index} ({s.label}) is a BlackBox (zeroth-order leaves run in Python)"
    return None


_DEFAULT = object()


def _record(program, s, inputs: list, held: list, env: dict, values: list, item):
    """make_fx of op s (its item ``item`` when not None) on ``values`` (its tensor inputs, then
    the tensors ``held`` names): the ATen ops it runs for these shapes, with its parameters and
    buffers as inputs (not baked in)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    n, k = s.node, len(inputs)

    def op(*tensors):
        if n.op == "call_module":
            args, kwargs = program._args(n, env, dict(zip(inputs, tensors[:k])))
            out = torch.func.functional_call(s.module, dict(zip(held, tensors[k:])), args, kwargs)
        else:
            out = program._call(n, *program._args(n, env, dict(zip(inputs + held, tensors))))
        return out if item is None else out[item]
    return make_fx(op)(*values)


def _unchecked(n: fx.Node) -> fx.Node:
    """The node a chain of ``registry.CHECKS`` returns (the checked value itself)."""
    while n.op == "call_function" and lookup(CHECKS, n.target) and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _of_literals(n: fx.Node) -> bool:
    """A value of the forward's literals alone (a mask of fixed size made in forward): a tensor
    torch.fx kept when tracing (``_tensor_constant<k>``), or one made from those and numbers
    only, so it never changes (a random one is refused as not deterministic)."""
    if n.op == "get_attr":
        return re.fullmatch(r"_tensor_constant\d+", n.target) is not None
    return n.op in ("call_function", "call_method") and all(map(_of_literals, n.all_input_nodes))


def _registered(model: nn.Module, target: str) -> bool:
    """``target`` (a get_attr path) is a parameter or buffer of its module."""
    owner, _, name = target.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    return name in mod._parameters or name in mod._buffers


def _recordable_module(mod: nn.Module) -> bool:
    """A torch.nn module without submodules running its own forward (not a container, not the
    user's: those are traced into ops or are opaque)."""
    from .graph import is_opaque
    return next(mod.children(), None) is None and type(mod).__module__.startswith("torch.nn.") and \
        not is_opaque(mod) and \
        _stock(mod, type(mod)) and not _hooked(mod) and not parametrize.is_parametrized(mod) and \
        not isinstance(mod, nn.modules.lazy.LazyModuleMixin)


def aten_program(program, s, inputs: list, env: dict, batch: int, on_copies: bool, item=None):
    """Op s (or item ``item`` of the tuple it gives) as a short program of ATen ops that the C++
    executor runs through the dispatcher (autograd records it as it records the Python op):
    ``(tensors, calls, output, clone_inputs)`` for ``_C.OpStep``. Value k of the program is
    input k, then ``tensors`` (its parameters and buffers), then each call's results (the
    tensors of a Tensor[] one by one; each call says how many values there are after it).

    None where a recording would not be faithful: the op reads a tensor computed from
    parameters or buffers (``w.t()``: it changes with them) or a tensor attribute that is not a
    parameter or buffer (it may be replaced without the model watch seeing it); it is a
    module with submodules, hooks or a forward of its own, or one marked opaque; an ATen op
    gives a non-tensor; or the op also runs on stacked copies (``on_copies``) and its
    recording depends on the batch size (a view to ``x.size(0)`` rows, a batched matmul).
    Other sizes are fixed per input shape, as for every lowered op."""
    n, mod = s.node, s.module
    if n.op == "call_module":
        if mod is None or not _recordable_module(mod):
            return None
        held = [name for name, _ in itertools.chain(mod.named_parameters(), mod.named_buffers())]
        tensors = [operator.attrgetter(name)(mod) for name in held]
    else:
        held = [a for a in n.all_input_nodes if a not in inputs and isinstance(env[a], torch.Tensor)]
        checked = [_unchecked(a) for a in held]  # a check's result is its argument itself
        if not all((a.op == "get_attr" and _registered(program.model, a.target)) or _of_literals(a) for a in checked):
            return None  # a plain tensor attribute may be replaced without the model watch seeing it
        tensors = [env[a] for a in held]
    # as C++ runs it in the clean forward: inputs of a folded op (but for an in-place op, which
    # C++ runs on copies of them) and parameters on autograd
    leaves = not on_copies and not s.inplace
    clean = [env[a].detach().requires_grad_(leaves and env[a].is_floating_point()) for a in inputs] + \
        [t.detach().requires_grad_(t.requires_grad) for t in tensors]
    try:
        gm = _record(program, s, inputs, held, env, clean, item)
        if on_copies:  # the op also runs on stacked copies of its inputs: the same ATen ops?
            stacked = [torch.cat([v, v]).detach() if k < len(inputs) and v.dim() and v.shape[0] == batch else v
                       for k, v in enumerate(clean)]
            if _record(program, s, inputs, held, env, stacked, item).code != gm.code:
                return None
    except Exception:  # noqa: BLE001 (what make_fx cannot record stays a Python call)
        return None
    program = _program_calls(gm, len(clean), len(inputs))
    return None if program is None else (tensors, *program)


def fused_program(probe, v: torch.Tensor, tensors: list):
    """A registry entry's fused probe (``probe(a, target, eps, *tensors)``, e.g. a layer norm's
    ``ops.probe_layer_norm``) for inputs like v as a program for ``_C.OpStep(fused=...)``: values
    (a, target, eps as a 0-dim tensor), then ``tensors``; ``(tensors, calls, output,
    clone_inputs)`` as ``aten_program`` gives, or None."""
    from torch.fx.experimental.proxy_tensor import make_fx
    values = [v.detach(), torch.zeros_like(v), torch.tensor(1e-3, dtype=v.dtype, device=v.device)] + \
        [t.detach() for t in tensors]
    try:
        program = _program_calls(make_fx(probe)(*values), len(values), 3)
    except Exception:  # noqa: BLE001 (not recorded: probed as other ops are)
        return None
    return None if program is None else (list(tensors), *program)


def _program_calls(gm, num_values: int, num_inputs: int):
    """The ATen calls of a make_fx recording whose first ``num_values`` placeholders are the
    program's values (``num_inputs`` inputs, then the op's own tensors): ``(calls, output,
    mutates)``, or None where a call gives a non-tensor, reads a constant tensor made inside or
    writes one of the op's own tensors (Embedding's max_norm renormalises its weight)."""
    ref, calls, values, mutates, output = {}, [], num_values, False, None
    own = set()  # the op's own tensors and views of them

    def arg_of(v):
        if isinstance(v, fx.Node):
            return ("const", getattr(gm, v.target)) if v.op == "get_attr" else ("ref", ref[v])
        if isinstance(v, (list, tuple)) and any(isinstance(a, fx.Node) for a in v):
            if any(isinstance(a, fx.Node) and a.op == "get_attr" for a in v):
                raise LookupError
            return ("refs", [-1 if a is None else ref[a] for a in v])
        return ("const", v)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            ref[node] = len(ref)
            if ref[node] >= num_inputs:
                own.add(node)
        elif node.op == "get_attr":
            continue  # a constant made inside the op (torch.tensor(2.0)): passed as a constant
        elif node.op == "call_function" and node.target is operator.getitem:
            ref[node] = ref[node.args[0]] + node.args[1]
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            schema, val = node.target._schema, node.meta.get("val")
            if not schema.returns or not all(isinstance(r.type, torch.TensorType) for r in schema.returns):
                if len(schema.returns) != 1 or not isinstance(val, list):  # unbind, split: one Tensor[]
                    return None
            pushed = len(val) if isinstance(val, list) else len(schema.returns)
            mutates |= schema.is_mutable
            for i, arg in enumerate(schema.arguments):
                v = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                if arg.alias_info is not None and arg.alias_info.is_write and v in own:
                    return None
            if schema.returns and schema.returns[0].alias_info is not None and node.args and node.args[0] in own:
                own.add(node)  # a view of one of them
            try:
                args = [("default", None) if v is _DEFAULT else arg_of(v) for v in (
                    node.args[i] if i < len(node.args) else node.kwargs.get(arg.name, _DEFAULT)
                    for i, arg in enumerate(schema.arguments))]
            except LookupError:
                return None
            ref[node], values = values, values + pushed
            calls.append((schema.name, schema.overload_name, args, values))
        elif node.op == "output" and isinstance(node.args[0], fx.Node) and node.args[0].op != "get_attr":
            output = ref[node.args[0]]
        else:
            return None
    return calls, output, mutates


class CppOps:
    """The op-level engine's estimates in C++ (``_C.OpExecutor``, csrc/executor/op_executor.*) for
    one input shape. Every op of ``program`` is lowered here: the ATen op of a standard module
    or of a call the registry maps to one (``_node``), arithmetic between two values
    (``registry.binary_kind``), else a Python callback on copies of the op's tensor inputs; it is
    probed as the registry says (``opengine.OpRun`` is the same algorithm in Python). ``build``
    returns None, with the reason, where the C++ engine cannot run the program."""

    def __init__(self, core, program, slots: dict, consts: dict, fixed: dict, labels: list, tuple_ops: set):
        self.core, self.program, self.slots, self.consts, self.fixed = core, program, slots, consts, fixed
        self.labels = labels  # of the C++ steps, in order
        self.tuple_ops = tuple_ops  # indices of the affine tuple ops run as their items' steps

    @staticmethod
    def build(est, program, x: torch.Tensor, chunks: dict):
        """(CppOps or None, why not)."""
        from . import _C, opengine
        from .numerics import probe_dtype
        from .spp import SpatialColoring
        why = ops_unsupported(est, program)
        if why is None and probe_dtype(est._dtype, est.query_dtype) is not None:
            why = f"a {est._dtype} model is probed in float32 copies (Python)"
        if why is not None:
            return None, why
        with torch.no_grad():  # what each op takes and gives, and the sizes (x.size(0)) for this shape
            env, _ = program.forward(x.clone(), keep_vjp=False)
        t = program.traced
        # Sizes (x.size(0), x.shape): fixed for the input shape; values made from them are ops
        # (torch.zeros(x.size(0), 5) is a callback with no tensor input, run on every estimate).
        fixed = {s.node: env[s.node] for s in program.steps
                 if s.node in t.meta and not isinstance(env[s.node], torch.Tensor)}
        B = x.shape[0]
        # An affine op giving a tuple, read only by indexing (q, k, v = qkv.unbind(0)), has no
        # value of its own here: each item is recorded as one op, the tuple op then indexing.
        tuples = {s.node: s for s in program.steps if s.node not in fixed and isinstance(env[s.node], (tuple, list))
                  and s.entry.kind == "affine" and not s.params and all(
                      u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                      for u in s.node.users)}
        slots = {t.x: 0}
        for s in program.steps:
            if s.node not in fixed and s.node not in tuples:
                slots[s.node] = len(slots)
        consts: dict = {}  # refreshed per estimate (parameters change between calls), plus `fixed`
        steps, labels = [], []
        for s in program.steps:
            n, out = s.node, env[s.node]
            if n in fixed or n in tuples:
                continue
            if not isinstance(out, torch.Tensor):
                what = type(out).__name__ if type(out) in (tuple, list) else f"{type(out).__module__}.{type(out).__name__}"
                return None, f"op {s.index} ({s.label}) gives a {what}, not one tensor"
            inputs = [a for a in s.inputs if a not in fixed]
            item, folding = None, s.folds
            if len(inputs) == 1 and inputs[0] in tuples:  # an item of an affine tuple op: that op's inputs
                item, src = n.args[1], tuples[inputs[0]]
                inputs, folding = [a for a in src.inputs if a not in fixed], src.folds
            ins = [env[a] for a in inputs]
            if not all(isinstance(v, torch.Tensor) for v in ins):
                return None, f"op {s.index} ({s.label}) takes a tuple of tensors"
            wants = [program.wants_target(a, v) for a, v in zip(inputs, ins)]
            mode, act, alpha, beta = "probed", 0, 0.0, 0.0
            if s.entry.kind == "affine":
                mode = "affine"
            elif opengine.fused_elementwise(s, est.spp) and inputs:
                mode = "elementwise_call"
                if s.entry.kernel is not None:
                    mode = "elementwise"
                    act, alpha, beta = s.entry.kernel(s.module)
            node, recorded, call, arith = None, None, None, ""
            if item is not None:
                recorded = aten_program(program, src, inputs, env, B, False, item) if mode == "affine" else None
                if recorded is None:
                    return None, f"op {src.index} ({src.label}) gives a tuple, and make_fx cannot record it"
            elif len(inputs) == 2 and list(n.args) == inputs and not n.kwargs:
                arith = binary_kind(n.target)
            if item is None and not arith:
                node, recorded, call = CppOps._lowered(program, s, inputs, consts, env, B, mode != "affine")
            if mode == "probed" and any(w and a not in folding and not opengine.batched(v, B)
                                        for a, v, w in zip(inputs, ins, wants)):
                return None, f"op {s.index} ({s.label}) is probed on a tensor shared by the samples (Python)"
            probes, folds = [], [a in folding for a in inputs]  # affine ops: every input
            fused, fused_input = None, -1
            for k, (a, v, w, f) in enumerate(zip(inputs, ins, wants, folds)):
                spec = opengine.fused_probe(s, a) if mode == "probed" and w and not f and fused is None else None
                if spec is not None:  # one fused probe (a layer norm's closed form), recorded
                    probe, tensors = spec
                    # a call's tensors: parameters or buffers only (a derived one changes with them)
                    if all(not isinstance(c, fx.Node) or (c.op == "get_attr" and _registered(program.model, c.target))
                           for c in tensors):
                        fused = fused_program(probe, v, [env[c] if isinstance(c, fx.Node) else c for c in tensors])
                    if fused is None:  # the plan sized this op for its fused probe: Python runs that
                        return None, f"op {s.index} ({s.label}): its fused probe cannot be recorded"
                    fused_input = k
                if mode != "probed" or not w or f or k == fused_input:
                    probes.append((torch.zeros(0, dtype=torch.long, device=x.device), 0, 0, None))
                    continue
                coloring = est._op_coloring(s, a, tuple(v.shape[1:]), tuple(out.shape[1:]))
                spp = None if not isinstance(coloring, SpatialColoring) else (
                    coloring.colors(x.device), coloring.boxes(x.device), coloring.in_shape, coloring.geometry_out,
                    coloring.channelwise)
                probes.append((coloring.colors(x.device), coloring.num_colors, math.prod(v.shape[1:]), spp))
            labels.append(f"op {s.index} ({s.label})")
            steps.append(_C.OpStep(mode, [slots[a] for a in inputs], wants, folds, [a in t.shared for a in inputs],
                                   slots[n], node, arith, recorded, call, act,
                                   alpha, beta, list(s.params), probes, chunks.get(n, est.chunk_size),
                                   math.prod(out.shape[1:]), labels[-1], fused, fused_input))
        core = _C.OpExecutor(steps, len(slots), slots[t.out], est.eps, est.eps_mode == "relative")
        return CppOps(core, program, slots, consts, fixed, labels, {s.index for s in tuples.values()}), None

    @staticmethod
    def _lowered(program, s, inputs: list, consts: dict, env: dict, batch: int, on_copies: bool):
        """How C++ runs op s on its tensor inputs, one of: (ExecNode, None, None) for a standard
        module or a call ``registry.module_for_call`` knows on one input; (None, ATen program,
        None) for an op ``aten_program`` records; else a Python call: a callback ExecNode for a
        module on one input (it keeps the module's hooks), or (None, None, a Python callable
        running the op on copies of its tensor inputs)."""
        n, callback_node = s.node, None
        if list(s.inputs) == inputs and len(inputs) == 1:
            if n.op == "call_module" and n.args == (inputs[0],) and not n.kwargs:
                python = []
                callback_node = _node(s.module, lambda mod: mod, [], python)
                if not python:
                    return callback_node, None, None  # native
            elif (as_module := _function_module(n)) is not None and n.args[0] is inputs[0]:
                return _native(as_module, None, [], []), None, None
        recorded = aten_program(program, s, inputs, env, batch, on_copies)
        if recorded is not None or callback_node is not None:
            return callback_node if recorded is None else None, recorded, None

        def call(*tensors):
            args, kwargs = program._args(n, consts, {a: v.clone() for a, v in zip(inputs, tensors)})
            return program._call(n, args, kwargs)
        return None, None, call

    def forward(self, x: torch.Tensor) -> dict:
        """The clean forward in C++: every op's value, by node."""
        self.consts.clear()
        self.consts.update(self.program.constants())
        self.consts.update(self.fixed)
        try:
            values = self.core.forward(x)
        except Exception:
            self.program.forward(x)  # raises the Python engine's error, naming the op
            raise
        return {**self.fixed, **{n: values[k] for n, k in self.slots.items()}}

    def targets(self, est, delta_out: torch.Tensor) -> dict:
        """Every target and the leaves in C++; accumulates p.grad when all is finite. Returns the
        C++ side's counts and ``failure``: the index of the C++ step (``labels``) whose query gave
        inf/nan, nearest the output, or -1."""
        out = self.core.targets(delta_out)
        self.core.release()
        if out["failure"] < 0:
            for p, g in out["grads"]:
                est._accumulate([p], [g])
        return out
