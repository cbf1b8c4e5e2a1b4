"""HZO written plainly: the oracle the engines are tested against (no production options).

The algorithm of DESIGN.md on a chain of stages ``a_l = f_l(a_{l-1})`` whose states are tuples
(a state holds every tensor live across its cut): the clean forward keeps every state; the
loss head takes central differences of the per-sample loss; each split (bisect or chain)
moves one coordinate of one tensor of ``a_m`` at a time by +-eps, runs the right piece and
contracts with ``delta_j`` (no coloring, no folding, no fused kernel, no chunking, no checks);
the leaves are each stage's local VJP, or central differences on a ``BlackBox``'s own
parameters. Two ways to cut a model into stages:

- ``op_stages(model)``: one stage per op of the traced graph (the cuts of the default engine);
- ``module_stages(model)``: the stage-wise engines' stages (an ``nn.Sequential``'s elements,
  or a traced model cut where one tensor is live).

``grads(stages, loss_fn, x, y)`` returns ``{parameter: gradient}``; nothing is written to p.grad.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

from . import graph
from .stages import BlackBox, LossHead, as_stages

__all__ = ["Stage", "op_stages", "module_stages", "grads"]


@dataclass
class Stage:
    run: Callable[[tuple], tuple]  # state a_{l-1} -> state a_l
    params: list                   # trainable parameters it reads
    blackbox: BlackBox | None = None  # its leaf is then zeroth order


def module_stages(model) -> list[Stage]:
    """The stage-wise engines' stages, each on a one-tensor state."""
    return [Stage(lambda a, f=f: (f(a[0]),), [p for p in f.parameters() if p.requires_grad],
                  f if isinstance(f, BlackBox) else None) for f in as_stages(model)]


def op_stages(model: nn.Module) -> list[Stage]:
    """One stage per x-dependent op of the traced graph; a state is every value live across the cut."""
    t = graph.trace(model)
    order, pos = t.order, {n: i for i, n in enumerate(t.order)}
    last_use = {n: max([pos[u] for u in n.users if u in pos] + [len(order) if n is t.out else 0]) for n in order}
    consts = {}  # values that do not depend on x (parameters, w.t()), kept on autograd for the leaves
    for n in t.graph.nodes:
        if n.op == "get_attr":
            consts[n] = operator.attrgetter(n.target)(model)
        elif n.op.startswith("call") and n not in pos:
            consts[n] = _call(model, n, consts)
    named = dict(model.named_parameters())

    def params_of(n: fx.Node) -> list:
        found, todo = [], list(n.all_input_nodes)
        while todo:
            c = todo.pop()
            if c in pos:
                continue
            if c.op == "get_attr" and c.target in named:
                found.append(named[c.target])
            todo += c.all_input_nodes
        if n.op == "call_module":
            found += list(model.get_submodule(n.target).parameters())
        return [p for p in dict.fromkeys(found) if p.requires_grad]

    stages = []
    for i, n in enumerate(order[1:], start=1):
        before = [v for v in order[:i] if last_use[v] >= i]
        after = [v for v in order[:i + 1] if last_use[v] > i]

        def run(state, n=n, before=before, after=after):
            env = dict(consts)
            env.update(zip(before, state))
            env[n] = _call(model, n, env)
            return tuple(env[v] for v in after)

        module = model.get_submodule(n.target) if n.op == "call_module" else None
        stages.append(Stage(run, params_of(n), module if isinstance(module, BlackBox) else None))
    return stages


def _call(model: nn.Module, n: fx.Node, env: dict):
    args, kwargs = fx.node.map_arg(n.args, env.__getitem__), fx.node.map_arg(n.kwargs, env.__getitem__)
    if n.op == "call_module":
        return model.get_submodule(n.target)(*args, **kwargs)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    return getattr(args[0], n.target)(*args[1:], **kwargs)


# ---- states: tuples whose entries are tensors or tuples of tensors ------------------------------

def _slots(state: tuple) -> dict:
    """{slot: tensor} for the floating tensors of a state; slot = (entry, element of a tuple entry)."""
    found = {}
    for i, v in enumerate(state):
        for k, u in ([(None, v)] if isinstance(v, torch.Tensor) else enumerate(v) if isinstance(v, (tuple, list))
                     else []):
            if isinstance(u, torch.Tensor) and u.is_floating_point():
                found[(i, k)] = u
    return found


def _map(state: tuple, fn) -> tuple:
    """The state with fn(slot, tensor) applied to every tensor."""
    def one(slot, u):
        return fn(slot, u) if isinstance(u, torch.Tensor) else u
    return tuple(one((i, None), v) if not isinstance(v, (tuple, list)) else
                 type(v)(*[one((i, k), u) for k, u in enumerate(v)]) if hasattr(type(v), "_fields") else
                 type(v)(one((i, k), u) for k, u in enumerate(v)) for i, v in enumerate(state))


def _run(stages, state: tuple, m: int, j: int) -> tuple:
    """f_j o ... o f_{m+1}; every stage gets its own copy of its state (ops may write in place)."""
    for f in stages[m:j]:
        state = f.run(_map(state, lambda _, u: u.clone()))
    return state


def _differences(fn, tensors: dict, slot, eps: float):
    """fn(moved) - fn(moved') for every coordinate k of tensors[slot] moved by +eps and by -eps
    (all samples' coordinates: the oracle needs no batch layout). The 2N copies run under vmap,
    so fn sees the tensors' own shapes; every tensor is a (broadcast) copy per query, so in-place
    ops inside fn write into their own query's values."""
    a = tensors[slot]
    N = a.numel()
    e = eps * torch.eye(N, dtype=a.dtype, device=a.device).view(N, *a.shape)
    copies = {s: torch.cat([a + e, a - e]) if s == slot else u.expand(2 * N, *u.shape) for s, u in tensors.items()}
    ys = torch.func.vmap(fn)(copies)
    # [N, *shape of the output]; an output the move leaves as it was differs by 0 (a masked -inf
    # attention score: inf - inf would be nan)
    return {s: torch.where(y[:N] == y[N:], 0, y[:N] - y[N:]) for s, y in ys.items()}


def _probe(stages, a_m: tuple, delta_j: dict, m: int, j: int, eps: float) -> dict:
    """delta_m = J^T delta_j, J = d a_j / d a_m, one coordinate of one tensor of a_m at a time."""
    delta_m = {}
    tensors = _slots(a_m)

    def right(copy: dict) -> dict:
        out = _slots(_run(stages, _map(a_m, lambda s, u: copy[s] if s in copy else u), m, j))
        return {s: out[s] for s in delta_j}

    for slot, a in tensors.items():
        diff = _differences(right, tensors, slot, eps)
        g = sum(diff[s].reshape(a.numel(), -1) @ d.reshape(-1) for s, d in delta_j.items())
        delta_m[slot] = (g / (2 * eps)).reshape(a.shape)
    return delta_m


def _leaf(stage: Stage, a_in: tuple, delta: dict, eps: float) -> list:
    """The stage's weight gradient: its local VJP with grad_output delta (a BlackBox: central
    differences on each of its parameters)."""
    if stage.blackbox is not None:
        step = stage.blackbox.eps or eps
        out = []
        for p in stage.params:
            g = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            for k in range(p.numel()):
                ys = []
                for sign in (1, -1):
                    with torch.no_grad():
                        p.view(-1)[k] += sign * step
                        ys.append(_slots(_run([stage], a_in, 0, 1)))
                        p.view(-1)[k] -= sign * step
                g[k] = sum(((ys[0][s] - ys[1][s]) * d).sum() for s, d in delta.items()) / (2 * step)
            out.append(g.view_as(p))
        return out
    with torch.enable_grad():
        y = _slots(_run([stage], a_in, 0, 1))
    pairs = [(y[s], d) for s, d in delta.items() if y[s].requires_grad]
    if not pairs:
        return [None] * len(stage.params)
    return list(torch.autograd.grad([o for o, _ in pairs], stage.params, [d for _, d in pairs],
                                    allow_unused=True, retain_graph=True))


def grads(stages: list[Stage], loss_fn, x: torch.Tensor, y: torch.Tensor, eps: float = 1e-3,
          split="bisect") -> dict:
    """HZO's gradient of every parameter the stages read: ``{parameter: gradient}``. ``split``:
    "bisect", "chain" or a callable ``(i, j) -> m``."""
    L = len(stages)
    head = LossHead(loss_fn)  # the user's loss (a callable's per-sample losses: their mean)
    with torch.no_grad():
        acts = [(x,)]
        for l in range(L):
            acts.append(_run(stages, acts[-1], l, l + 1))
        z = acts[L][0]
        diff = _differences(lambda zs: {0: head.total(zs[0], y)}, {0: z}, 0, eps)[0]
        deltas = {L: {(0, None): (diff / (2 * eps)).reshape(z.shape)}}

        def split_range(i: int, j: int) -> None:
            if j - i < 2:
                return
            m = j - (j - i) // 2 if split == "bisect" else j - 1 if split == "chain" else split(i, j)
            deltas[m] = _probe(stages, acts[m], deltas[j], m, j, eps)
            split_range(i, m)
            split_range(m, j)
        split_range(0, L)
    found = {}
    for l, f in enumerate(stages, start=1):
        if f.params:
            for p, g in zip(f.params, _leaf(f, acts[l - 1], deltas[l], eps)):
                if g is not None:
                    found[p] = g if p not in found else found[p] + g
    return found
