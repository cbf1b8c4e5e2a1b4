"""The op-level engine (``HZO(split="auto")``, the default): every op of the traced graph is a stage.

The model is traced (``hzo_ext.graph.trace``; an ``nn.Sequential`` too) and cut between every
two ops, so a cut's state is every tensor live across it: inside a residual block, the
block's input and the branch's activation both. The estimate is HZO's chain over these cuts
(each split's right piece is one op; a tensor that the op does not read keeps its target,
copied, never probed), top down from the loss head, each op probed as its registry entry
says (``hzo_ext.registry``):

- elementwise: one colored probe of every coordinate at once, fused with the contraction
  (``ops.probe_elementwise``: no perturbed copy in memory);
- affine: the +-eps perturbation folds exactly, so the probe is ``A^T target``, computed by
  the op's own VJP; the same call gives the op's weight gradient (its leaf);
- probed (anything else, opaque nodes always): +-eps copies of each tensor input through the
  op (``probe_targets``: SPP-colored where the footprint is known, else dense).
Leaves of probed ops with parameters: the local VJP through that op (the paper's leaf), or
finite differences on a ``BlackBox``'s own parameters.

``fd_layer_evals`` counts what a dense probe of each op would query (2 per input coordinate;
1 probe of an elementwise op: 2), so counts compare with the stage-wise engines and the
baselines; the plan says how each op was probed, and counts what the folds stand for
(``Split.folded``, added to the probes an engine ran).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import operator
import os
from dataclasses import dataclass

import torch
from torch import fx, nn

from . import graph, ops
from .registry import OpEntry, entry_for, is_view
from .stages import BlackBox, changed_rows, stacked_variants

__all__ = ["OpProgram", "Unsupported"]

def default_memory_budget(device) -> int:
    """Half of the device's memory (the host's RAM for CPU tensors)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class Unsupported(Exception):
    """The model has something the op-level engine does not run; the stage-wise engine does."""


@dataclass
class OpStep:
    """One op of the graph as the engine runs it; its output is a_index."""
    node: fx.Node
    index: int
    entry: OpEntry
    module: nn.Module | None
    inputs: tuple  # the x-dependent tensor (or tuple) nodes among its arguments
    params: tuple  # trainable parameters it reads (its own, or through constants)
    label: str
    inplace: bool
    folds: tuple = ()  # inputs whose targets are the op's VJP: all of an affine op's; of a probed
                       # op, those passed only at its entry's affine_args (``_only_at``)


def _only_at(n: fx.Node, positions: tuple, inputs: tuple) -> tuple:
    """The inputs passed to n only as positional arguments at ``positions`` (not also elsewhere,
    in a list or as a keyword): those the op is affine in when its entry's affine_args are
    ``positions``."""
    seen = []  # every node argument, nested ones and kwargs too
    fx.node.map_arg((n.args, n.kwargs), seen.append)
    top = [k for k, v in enumerate(n.args) if isinstance(v, fx.Node)]
    return tuple(a for a in inputs if all(k in positions for k in top if n.args[k] is a)
                 and 0 < sum(v is a for v in seen) == sum(n.args[k] is a for k in top))


def _is_inplace(n: fx.Node, module) -> bool:
    if n.kwargs.get("inplace") is True or getattr(module, "inplace", False) is True:
        return True
    t = n.target
    name = t if n.op == "call_method" else getattr(t, "__name__", "")
    return (isinstance(name, str) and name.endswith("_") and not name.endswith("__")) or \
        t in (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def tensors_of(v):
    """The tensors of a value (a tensor, or a tuple/list of them) in order."""
    return [v] if isinstance(v, torch.Tensor) else [t for t in v if isinstance(t, torch.Tensor)]


def fused_probe(s: OpStep, a: fx.Node) -> tuple | None:
    """(probe, tensors) when op s's input a takes one fused probe (its registry entry's ``fused``:
    a layer norm's ``ops.probe_layer_norm``), ``probe(a, target, eps, *tensors)``; else None."""
    fused = s.entry.fused
    return None if fused is None else fused(s.module if s.module is not None else s.node, a)


class OpProgram:
    """The traced graph of ``model`` with one ``OpStep`` per x-dependent op."""

    def __init__(self, model):
        self.model = model if isinstance(model, nn.Module) else nn.Sequential(*model)
        hooked = [name for name, m in self.model.named_modules()
                  if (m._forward_hooks or m._forward_pre_hooks) and next(m.children(), None) is not None]
        if hooked:  # torch.fx traces through a container's forward without its hooks
            raise Unsupported(f"module {hooked[0]!r} has forward hooks and submodules")
        try:
            t = graph.trace(self.model)
        except Exception as exc:  # noqa: BLE001 (whatever the user's forward raises on proxies)
            raise Unsupported(f"torch.fx: {exc}") from None
        self.traced = t
        self.state = set(t.order)
        params = {name: p for name, p in self.model.named_parameters()}
        self.steps: list[OpStep] = []
        for n in t.order[1:]:  # sizes and bools too: they get no target (decided by their values)
            module = self.model.get_submodule(n.target) if n.op == "call_module" else None
            entry = entry_for(n.op, n.target, module)
            inputs = tuple(dict.fromkeys(a for a in n.all_input_nodes if a in self.state))
            affine_in = inputs if entry.affine_args is None else _only_at(n, entry.affine_args, inputs)
            if entry.kind == "affine" and len(affine_in) < len(inputs):  # a / b, b depending on x: a folds
                entry = dataclasses.replace(entry, kind="probed")
            own = list(module.parameters()) if module is not None else []
            for c in self._constants_of(n):
                own += list(self.model.get_submodule(c.target).parameters()) if c.op == "call_module" else \
                    [params[c.target]] if c.target in params else []
            own = tuple(p for p in dict.fromkeys(own) if p.requires_grad)
            if entry.kind == "elementwise" and own:
                entry = OpEntry("probed")  # e.g. clamp(h, min=parameter): the parameter needs its leaf
            folds = affine_in if entry.kind == "affine" or entry.affine_args is not None else ()
            self.steps.append(OpStep(n, len(self.steps) + 1, entry, module, inputs, own,
                                     f"{n.target}: {type(module).__name__}" if module is not None else n.name,
                                     _is_inplace(n, module), folds))
        if not self.steps:
            raise Unsupported("the model returns its input unchanged")
        self._step_of = {s.node: s for s in self.steps}
        # An in-place op whose input another op reads afterwards: that op would see the written
        # value in the model, the clean one here (the engine copies inputs of in-place ops).
        pos = {n: i for i, n in enumerate(t.order)}
        for s in self.steps:
            if s.inplace and s.inputs:
                first = s.node.args[0] if s.node.args else None
                later = [u for u in getattr(first, "users", ()) if u is not s.node and pos.get(u, -1) > pos[s.node]]
                if later:
                    raise Unsupported(f"{s.label} writes {first.name} in place and {later[0].name} reads it after")

    def _constants_of(self, n: fx.Node):
        """get_attr and module-call nodes among n's constant (x-independent) ancestors (a
        position embedding of arange(T) is trained through the op that reads it)."""
        seen, todo = set(), [a for a in n.all_input_nodes if a not in self.state]
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            if c.op in ("get_attr", "call_module"):
                yield c
            todo += [a for a in c.all_input_nodes if a not in self.state]

    def wants_target(self, a: fx.Node, v) -> bool:
        """An op's input a (value v) gets a target: not x, not shared by the samples (a mask made
        from sizes), floating."""
        return a is not self.traced.x and a not in self.traced.shared and has_target(v)

    # ---- running ops

    def _call(self, n: fx.Node, args, kwargs, module=None):
        try:
            if n.op == "call_module":
                return (module or self.model.get_submodule(n.target))(*args, **kwargs)
            if n.op == "call_function":
                return n.target(*args, **kwargs)
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            if n not in self._step_of:
                raise
            s = self._step_of[n]
            tensors = [v for v in _flat(args) if isinstance(v, torch.Tensor)]
            shapes = " and ".join(str(tuple(v.shape)) for v in tensors) or "none"
            dtype = tensors[0].dtype if tensors else None
            raise ValueError(f"op {s.index} ({s.label}) failed on an input of shape {shapes} and dtype {dtype}: "
                             f"{exc}") from exc

    def _args(self, n: fx.Node, env, swap=None):
        swap = swap or {}
        get = lambda a: swap[a] if a in swap else env[a]  # noqa: E731
        return fx.node.map_arg(n.args, get), fx.node.map_arg(n.kwargs, get)

    def _masks(self, s: OpStep, env) -> bool:
        """The op's -inf outputs are masked entries, not an overflow: its entry says so
        (masked_fill), or it is affine and a tensor without a target brings the -inf in (scores
        plus a float causal mask)."""
        if s.entry.masks:
            return True
        if s.entry.kind != "affine":
            return False
        probed = {id(env[a]) for a in s.inputs if self.wants_target(a, env[a])}
        args, kwargs = self._args(s.node, env)
        return any(isinstance(v, torch.Tensor) and id(v) not in probed and v.is_floating_point() and
                   bool((v == -math.inf).any()) for v in _flat(list(args) + list(kwargs.values())))

    def forward(self, x: torch.Tensor, keep_vjp: bool = True):
        """The clean forward: every node's value (``env``) and, per affine op or op with trainable
        parameters, its output with a local autograd graph and the leaves standing for its
        x-dependent inputs (``local``)."""
        env, local = self.constants(keep_vjp), {}
        env[self.traced.x] = x
        for s in self.steps:
            n = s.node
            if s.entry.kind != "affine" and any(isinstance(env[a], (tuple, list)) for a in s.inputs):
                raise Unsupported(f"{s.label} takes a tuple of tensors")
            vjp = keep_vjp and (bool(s.folds) or (bool(s.params) and not isinstance(s.module, BlackBox)))
            leaves = {a: _leaf(env[a]) for a in s.folds if a is not self.traced.x} if vjp else {}
            swap = {a: _copy(v) for a, v in leaves.items()} if s.inplace else dict(leaves)
            if s.inplace or s.entry.kind == "probed":  # a module we do not know may write its input
                swap.update({a: _copy(env[a]) for a in s.inputs if a not in swap})
            args, kwargs = self._args(n, env, swap)
            with torch.set_grad_enabled(vjp):
                out = self._call(n, args, kwargs)
            if not isinstance(out, (torch.Tensor, tuple, list)) or not tensors_of(out):
                env[n] = out  # a bool or size from an assert or a shape check: no target
                continue
            if isinstance(out, (tuple, list)) and any(isinstance(o, (tuple, list)) for o in out):
                raise Unsupported(f"{s.label} gives a nested tuple (an LSTM's (output, (h_n, c_n)))")
            if vjp:
                local[n] = (out, leaves)
            env[n] = out.detach() if isinstance(out, torch.Tensor) else \
                _rebuild(out, [t.detach() if isinstance(t, torch.Tensor) else t for t in out])
        return env, local

    def constants(self, keep_vjp: bool = True) -> dict:
        """The values that do not depend on x (parameters, buffers, w.t()), on autograd (for the
        leaves through them) when keep_vjp."""
        env = {}
        with torch.set_grad_enabled(keep_vjp):
            for n in self.traced.graph.nodes:
                if n.op == "get_attr":
                    env[n] = operator.attrgetter(n.target)(self.model)
                elif n.op.startswith("call") and n not in self.state:
                    args, kwargs = self._args(n, env)
                    env[n] = self._call(n, args, kwargs)
        return env

    @torch.no_grad()
    def check_samples(self, x: torch.Tensor, env) -> None:
        """Once per input shape: every op is deterministic, and its outputs for the batch stay the
        same when far-away copies are stacked before or after the batch at the input (no in-batch
        statistics, no dependence on the row index; ``stages.stacked_variants``). Names the first
        op whose batch rows change."""
        B = x.shape[0]

        def rows_of(v):
            return v if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() and v.shape[0] == B \
                else None

        again, _ = self.forward(x.clone(), keep_vjp=False)
        for s in self.steps:
            a, b = rows_of(env[s.node]), again[s.node]
            if a is not None and not bool(torch.isfinite(a).all()) and \
                    not (self._masks(s, env) and bool((torch.isfinite(a) | (a == -math.inf)).all())):
                raise ValueError(f"op {s.index} ({s.label}) gives non-finite values (inf/nan) in the clean forward "
                                 f"of the input (an overflow, or a softmax over a row masked whole: check the "
                                 f"model, its masks and the input's scale)")
            if a is not None and not (torch.equal(a, b) or torch.allclose(a, b, rtol=1e-6, atol=0)):
                raise ValueError(f"op {s.index} ({s.label}) is not deterministic: two evaluations of the same input "
                                 f"differ, so finite differences through it are noise (fix its seed, call .eval(), "
                                 f"or pass training=self.training to functional dropout)")
        for stacked, rows in stacked_variants(x):
            try:
                other, _ = self.forward(stacked, keep_vjp=False)
            except ValueError as exc:
                ids = "; if x holds ids the model makes integers, pass them as integer ids (the check " \
                      "stacks far-away values, beyond any embedding)" \
                    if x.is_floating_point() and "index" in str(exc) else ""
                raise ValueError(f"the model depends on the batch size: stacking other samples with the batch "
                                 f"failed ({exc}){ids}") from exc
            for s in self.steps:
                a, b = rows_of(env[s.node]), other[s.node]
                if a is None or not isinstance(b, torch.Tensor) or b.shape[0] != stacked.shape[0]:
                    continue
                if changed_rows(b[rows], a):
                    raise ValueError(f"op {s.index} ({s.label}) mixes samples: stacking other samples with the batch "
                                     f"changed the batch's outputs (batch statistics, a mean or median over the "
                                     f"batch, a dependence on the row index); ops must treat samples independently")

    def shapes(self, env) -> list:
        """Per-sample shapes of a_0 (x) and every op's output (tuples: the first tensor's; a bool
        or size: None)."""
        def shape(v):
            t = tensors_of(v) if isinstance(v, (torch.Tensor, tuple, list)) else []
            return tuple(t[0].shape[1:]) if t else None
        return [shape(env[self.traced.x])] + [shape(env[s.node]) for s in self.steps]



def _pairs(out, t) -> list:
    """(output tensor, its target) for the outputs autograd can differentiate."""
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    ts = [t] if isinstance(t, torch.Tensor) else list(t)
    return [(o, ti) for o, ti in zip(outs, ts)
            if isinstance(o, torch.Tensor) and o.requires_grad and isinstance(ti, torch.Tensor)]


def has_target(v) -> bool:
    """A floating tensor, or a tuple of them (masks, indices, sizes and bools have no target)."""
    if isinstance(v, torch.Tensor):
        return v.is_floating_point()
    return isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in v)


def batched(v, batch: int) -> bool:
    """A tensor with the batch dimension first (not one made from sizes, shared by the samples:
    torch.arange(x.size(1)), a position table sliced to the sequence length)."""
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch


def _flat(v):
    if isinstance(v, (tuple, list)):
        return [t for u in v for t in _flat(u)]
    return [v]


def _rebuild(v, items: list):
    """A tuple/list like v (a namedtuple, a torch.return_types structseq) holding items."""
    return type(v)(*items) if hasattr(type(v), "_fields") else type(v)(items)


def _leaf(v):
    if isinstance(v, torch.Tensor):
        return v.detach().requires_grad_(v.is_floating_point())
    return _rebuild(v, [_leaf(t) for t in v]) if isinstance(v, (tuple, list)) else v


def _copy(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    return _rebuild(v, [_copy(t) for t in v]) if isinstance(v, (tuple, list)) else v


def fused_elementwise(step: OpStep, spp) -> bool:
    """Probed by one fused colored probe: an elementwise op of one tensor (spp=False: dense)."""
    return step.entry.kind == "elementwise" and len(step.inputs) == 1 and spp is not False


def view_like(step: OpStep) -> bool:
    return is_view(step.node.op, step.node.target, step.module)


class OpRun:
    """One estimate of the op-level engine for the estimator ``est`` (an HZO)."""

    def __init__(self, est, program: OpProgram, chunks: dict):
        self.est, self.p, self.chunks = est, program, chunks  # chunks: probed op's node -> chunk size
        self.stats = est.last_stats
        self._qmodules: dict = {}
        self._leaves: list = []  # (parameters, their gradients), written to p.grad once all is finite

    def targets(self, env, local, delta_out: torch.Tensor) -> None:
        """Walk the ops from the output back, probing each; then accumulate p.grad (only when
        every target is finite)."""
        p, est = self.p, self.est
        B = env[p.traced.x].shape[0]
        targets = {p.traced.out: delta_out}
        # (op, input, all finite?) flags, read once at the end: no device sync per op; sum(0 * g) is
        # nan exactly when g holds an inf or a nan, a tenth of the time of isfinite(g).all() on a CPU
        finite = []
        for s in reversed(p.steps):
            t = targets.pop(s.node, None)
            if t is None:
                local.pop(s.node, None)
                continue  # its output does not reach the loss
            read = None
            if isinstance(env[s.node], (tuple, list)):  # elements nobody read: zero targets (not probed)
                read = [i for i, ti in enumerate(t) if ti is not None]
                t = [torch.zeros_like(o) if ti is None and isinstance(o, torch.Tensor) else ti
                     for o, ti in zip(env[s.node], t)]
            wanted = [a for a in s.inputs if p.wants_target(a, env[a])]
            if s.entry.kind == "affine":
                got = self._fold(s, local.pop(s.node), t, wanted)
            elif fused_elementwise(s, est.spp) and wanted:
                got = [(wanted[0], None, self._probe_elementwise(s, env, t))]
            else:
                got = [(a, None, self._probe(s, env, a, t, read) if batched(env[a], B)
                        else self._probe_shared(s, env, a, t)) for a in wanted if a not in s.folds]
                if s.folds:  # the inputs it is affine in, and its leaf, by one VJP
                    got += self._fold(s, local.pop(s.node), t, [a for a in wanted if a in s.folds])
                else:
                    self._probed_leaf(s, env, local.pop(s.node, None), t)
            for a, i, g in got:  # a's target gains g (element i of a tuple-valued a)
                finite.append((s, a, torch.isfinite((g * 0).sum())))
                if i is None:
                    targets[a] = g if a not in targets else targets[a] + g
                else:
                    cur = targets.setdefault(a, [None] * len(env[a]))
                    cur[i] = g if cur[i] is None else cur[i] + g
            self.stats.splits += 1
        if finite and not bool(torch.stack([f for _, _, f in finite]).all()):
            s, a, _ = next(x for x in finite if not bool(x[2]))  # the op nearest the output
            raise ValueError(f"non-finite value (inf/nan) in a query: op {s.index} ({s.label}) probed with "
                             f"+-eps on its input {a.name}; lower eps or check the model (overflow)")
        for params, grads in self._leaves:  # p.grad untouched when anything above raised
            self.est._accumulate(params, grads)

    def _count(self, probes: int, queries: int) -> None:
        self.stats.probes += probes
        self.stats.fd_layer_evals += queries

    def _fold(self, s: OpStep, saved, t, wanted) -> list:
        """Affine op: input targets A^T t and the op's weight gradient, by its VJP."""
        out, leaves = saved
        flat = [(a, i, leaf) for a in wanted if a in leaves
                for i, leaf in (((None, leaves[a]),) if isinstance(leaves[a], torch.Tensor) else enumerate(leaves[a]))
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad]  # indices of max/topk: no target
        inputs = [leaf for _, _, leaf in flat] + list(s.params)
        pairs = _pairs(out, t)
        if not pairs or not inputs:
            return []
        # retain_graph: a constant computed from a parameter (w.t()) may feed several ops; each
        # op's own saved tensors go with its output, dropped after this call
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, [ti.to(o.dtype) for o, ti in pairs],
                                    allow_unused=True, retain_graph=True)
        self._leaves.append((s.params, grads[len(flat):]))  # (counted by the plan: Split.folded)
        return [(a, i, g) for (a, i, _), g in zip(flat, grads[:len(flat)]) if g is not None]

    def _probe_elementwise(self, s: OpStep, env, t) -> torch.Tensor:
        a = env[s.inputs[0]]
        q = self.est._qcast
        a_q, t_q, eps = q(a), q(t), self.est._step(a)
        kernel = s.entry.kernel
        if kernel is not None:
            code, alpha, beta = kernel(s.module)
            delta = ops.probe_elementwise(a_q, t_q, eps, code, alpha, beta)
        else:  # no kernel: the op itself on the stacked +-eps copies
            z = torch.cat([a_q + eps, a_q - eps])
            args, kwargs = self._query_args(s, env, {s.inputs[0]: z})
            y = self.p._call(s.node, args, kwargs, self._qmodule(s))
            yp, ym = y.chunk(2)
            delta = t_q * (yp - ym) / (2 * eps)
        self._count(1, 2)
        return delta

    def _query_args(self, s: OpStep, env, swap):
        """The op's arguments for a query, its floating constants (a call's weight) in the probe
        dtype as its module's copy has them (``_qmodule``)."""
        args, kwargs = self.p._args(s.node, env, swap)
        dtype = self.est._probe_dtype
        if dtype is None:
            return args, kwargs
        cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
        return fx.node.map_aggregate(args, cast), fx.node.map_aggregate(kwargs, cast)

    def _qmodule(self, s: OpStep):
        """The op's module in the probe dtype (a float32 copy for low-precision models)."""
        if s.module is None or self.est._probe_dtype is None:
            return s.module
        if s.node not in self._qmodules:
            self._qmodules[s.node] = copy.deepcopy(s.module).to(self.est._probe_dtype)
        return self._qmodules[s.node]

    def _probe(self, s: OpStep, env, a_node, t, read=None):
        """Target of input a_node of a probed op: +-eps copies of it through the op, the other
        inputs clean (repeated per copy). ``read``: the items of a tuple-valued op that have a
        target (only those are contracted: a GRU's unused hidden state is not batch first)."""
        from .estimator import probe_targets  # the one probe loop (perturb, query, contract)
        est, q = self.est, self.est._qcast
        a = env[a_node]
        a_q, eps = q(a), est._step(a)
        others = [b for b in s.inputs if b is not a_node]

        def items(v):
            return [v[i] for i in read] if read is not None else tensors_of(v)
        tq = q(torch.cat([ti.reshape(ti.shape[0], -1) for ti in items(t)], 1)) if not isinstance(t, torch.Tensor) \
            else q(t)

        def run_right(z: torch.Tensor, copies: int) -> torch.Tensor:
            swap = {a_node: z}
            for b in others:  # repeated along the batch (a tensor made from sizes only as it is)
                v = env[b]
                swap[b] = q(v).repeat(copies, *([1] * (v.dim() - 1))) if b not in self.p.traced.shared and \
                    isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == a.shape[0] else v
            args, kwargs = self._query_args(s, env, swap)
            y = self.p._call(s.node, args, kwargs, self._qmodule(s))
            self.stats.forward_calls += 1
            if isinstance(y, torch.Tensor):
                return y
            if any(o.shape[0] != z.shape[0] for o in items(y)):
                raise ValueError(f"op {s.index} ({s.label}) gives an output read later whose first dimension is not "
                                 f"the batch ({[tuple(o.shape) for o in items(y)]} for {z.shape[0]} stacked rows); "
                                 f"the probes stack copies along the first dimension")
            return torch.cat([o.reshape(o.shape[0], -1) for o in items(y)], 1)

        fused = fused_probe(s, a_node)
        if fused is not None:  # every coordinate's +-eps pair at once (a layer norm's closed form)
            probe, tensors = fused
            self._count(1, 2)
            return probe(a_q, tq, eps, *(q(env[w] if isinstance(w, fx.Node) else w) for w in tensors))
        coloring = est._op_coloring(s, a_node, tuple(a.shape[1:]), tuple(tensors_of(env[s.node])[0].shape[1:]))
        chunk = self.chunks.get(s.node, est.chunk_size)  # from the memory budget (the plan)
        delta = probe_targets(run_right, a_q, tq, eps, chunk, coloring, what=s.label, nvtx=f"hzo/op{s.index}")
        self._count(coloring.num_colors, 2 * coloring.num_colors)
        return delta

    def _probe_shared(self, s: OpStep, env, a_node, t):
        """Target of an input shared by the samples (no batch dimension): one coordinate at a
        time, +-eps through the op on the whole batch, contracted over every sample."""
        est, q = self.est, self.est._qcast
        a = q(env[a_node])
        eps, flat_t = est._step(a), torch.cat([q(ti).reshape(-1) for ti in tensors_of(t)])
        g = torch.zeros(a.numel(), dtype=a.dtype, device=a.device)
        for k in range(a.numel()):
            ys = []
            for sign in (1, -1):
                moved = a.clone(memory_format=torch.contiguous_format)  # a transposed a keeps its strides else
                moved.view(-1)[k] += sign * eps
                args, kwargs = self._query_args(s, env, {a_node: moved})
                ys.append(torch.cat([o.reshape(-1) for o in tensors_of(self.p._call(s.node, args, kwargs,
                                                                                   self._qmodule(s)))]))
            g[k] = ((ys[0] - ys[1]) * flat_t).sum() / (2 * eps)
        self.stats.forward_calls += 2 * a.numel()
        self._count(a.numel(), 2 * a.numel())
        return g.view_as(a)

    def _probed_leaf(self, s: OpStep, env, saved, t) -> None:
        if not s.params:
            return
        if isinstance(s.module, BlackBox):
            grads = self.est._blackbox_grads(s.module, f"op {s.index} ({s.label})", env[s.inputs[0]], t)
        elif saved is None:
            return
        else:
            pairs = _pairs(saved[0], t)
            grads = torch.autograd.grad([o for o, _ in pairs], list(s.params), [ti.to(o.dtype) for o, ti in pairs],
                                        allow_unused=True, retain_graph=True) if pairs else [None] * len(s.params)
        self._leaves.append((s.params, grads))
