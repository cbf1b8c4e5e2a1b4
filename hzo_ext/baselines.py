"""Baselines with the HZO interface (constructor, then ``backward(x, y) -> loss``, ``last_stats``).

- ``CGE``: DeepZero-style neuron-wise zeroth order: perturb each a_l coordinate-wise and run
  to the loss (costs M*L*(L-1) queries for uniform width M), then the same leaf VJPs as HZO.
- ``SPSA``: MeZO-style seeded Gaussian directions, in place, on all parameters or one block of
  them per call (MeZO-BCD); unbiased, high variance.
- ``Backprop``: ordinary autograd.
"""
from __future__ import annotations

import random
import time
from typing import NamedTuple

import torch
from torch import nn

from . import distributed, graph
from .estimator import EstimateStats, StageEstimator, outside_inference_mode, probe_targets
from .stages import LossHead, as_stages, check_batch, check_eps, check_stages_static, run_stage

__all__ = ["CGE", "SPSA", "SPSABlock", "Backprop"]


def _forward(stages, x: torch.Tensor) -> torch.Tensor:
    for l in range(1, len(stages) + 1):
        x = run_stage(stages, l, x)
    return x


class CGE(StageEstimator):
    """Coordinate-wise gradient estimation on activations (DeepZero-style): for every stage
    l < L, probe each coordinate of a_l through f_L o ... o f_{l+1} and the loss. Options as HZO."""

    @outside_inference_mode
    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        self._refresh_stages()
        self._prepare(x, y)
        acts, local = self._clean_forward(x)
        L, B = len(self.stages), x.shape[0]
        self._check_steps(acts, range(1, L + 1))
        loss = self.loss.check_reproduces(acts[-1], y)
        qstages = self._query_stages()
        with torch.no_grad():
            deltas = {L: self._loss_head(acts[L], y)}
            to_loss = self._per_sample_loss(y, B)
            for l in range(1, L):
                a, eps = self._qcast(acts[l]), self._step(acts[l])
                run = lambda z, n, l=l: to_loss(self._run_range(qstages, z, l, L), n)  # noqa: E731
                ones = torch.ones(B, 1, dtype=a.dtype, device=a.device)
                deltas[l] = probe_targets(run, a, ones, eps, self.chunk_size, shard=self._shard, what=f"a_{l}")
                self._check_probe(deltas[l], qstages, a, l, L, eps, f"while probing a_{l} to the loss (CGE)")
                K = a[0].numel() if self._shard is None else self._shard.count(a[0].numel())  # this rank's
                self.last_stats.fd_layer_evals += 2 * K * (L - l)
                self.last_stats.probes += K
        self._leaves(acts, local, deltas)
        self.last_stats.seconds = time.perf_counter() - t0
        return loss.detach()


class SPSABlock(NamedTuple):
    """The parameters one SPSA estimate perturbed: the block's index and the parameters' names
    (as in ``model.named_parameters()``)."""
    index: int
    names: tuple[str, ...]


class SPSA:
    """MeZO-style SPSA: g = mean_s (L(w + eps z_s) - L(w - eps z_s)) / (2 eps) * z_s, z_s ~ N(0, I)
    over the trainable parameters of one block. Directions come from ``seed`` and the call count
    (``calls``), so two estimators built with the same seed give the same sequence of estimates.

    In place, as MeZO: every parameter of the block is perturbed in its own storage and each
    direction is regenerated from the generator's state instead of being stored. The weights are
    restored bitwise: the buffer that becomes ``p.grad`` holds the weights during the queries (so
    the extra memory is the gradient being returned, plus, for ``num_samples > 1``, one direction
    of the largest tensor while the samples are summed), and ``backward`` leaves every weight
    bitwise as it found it, also when a query raises.

    ``blocks`` (block coordinate descent, MeZO-BCD): ``None`` perturbs all trainable parameters;
    ``"layer"``: the trainable parameters of one module that owns parameters directly, in model
    order, one per call, cyclic; ``"random"``: one of those layer blocks, drawn from ``seed`` and the
    call count; a list of parameter groups: one group per call, cyclic. Only the block's
    parameters get a gradient; the queries restart from the clean activation before the first
    stage that holds one of the block's parameters (the stages before it are unperturbed).
    ``last_block`` (an ``SPSABlock``) says which block the last call estimated.
    """

    def __init__(self, model, loss_fn, eps: float = 1e-3, num_samples: int = 1, seed: int = 0, blocks=None,
                 process_group=None):
        self.model = model
        self.loss = LossHead(loss_fn)
        self.eps = check_eps(eps)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.num_samples, self.seed, self.calls = num_samples, seed, 0
        self._blocks_arg = blocks
        self._index_model()
        self.last_block: SPSABlock | None = None
        self.last_stats = EstimateStats()
        distributed.attach(self, process_group)  # data-parallel: same directions, shard losses combined

    def _index_model(self) -> None:
        """Stages, parameters and blocks, made again when the model changed (``graph.ModelWatch``)."""
        self._watch = graph.ModelWatch(self.model)
        self.stages = as_stages(self.model)
        self.params = list({id(p): p for s in self.stages for p in s.parameters() if p.requires_grad}.values())
        self._names, self._first_stage, layers = self._index_parameters()
        self.mode, self.blocks = self._make_blocks(self._blocks_arg, layers)

    def _index_parameters(self):
        """Each parameter's name and first stage (1-based), and the layer blocks: the trainable
        parameters each module owns directly, in model order."""
        names, first, layers, seen_modules = {}, {}, [], set()
        if isinstance(self.model, nn.Module):  # the model's own names (a traced model's stages are pieces)
            names = {id(p): n for n, p in self.model.named_parameters()}
        for l, stage in enumerate(self.stages, start=1):
            for mod_name, mod in stage.named_modules():
                if id(mod) in seen_modules:
                    continue
                seen_modules.add(id(mod))
                layer = []
                for p_name, p in mod.named_parameters(recurse=False):
                    if id(p) not in first:
                        names.setdefault(id(p), ".".join(n for n in (str(l - 1), mod_name, p_name) if n))
                        first[id(p)] = l
                        layer += [p] if p.requires_grad else []
                if layer:
                    layers.append(layer)
        return names, first, layers

    def _make_blocks(self, blocks, layers) -> tuple[str, list[list[torch.nn.Parameter]]]:
        if blocks is None:
            return "all", [self.params]
        if isinstance(blocks, str):
            if blocks not in ("layer", "random"):
                raise ValueError(f"blocks must be None, 'layer', 'random' or a list of parameter groups, "
                                 f"got {blocks!r}")
            if not layers:
                raise ValueError(f"blocks={blocks!r}: the model has no trainable parameters to make blocks of")
            return blocks, layers
        if not isinstance(blocks, (list, tuple)):
            raise TypeError(f"blocks must be None, 'layer', 'random' or a list of parameter groups, got a "
                            f"{type(blocks).__name__}")
        if not blocks:
            raise ValueError("blocks is an empty list; give at least one group of parameters")
        order = {id(p): k for k, p in enumerate(self.params)}
        owner: dict[int, int] = {}
        groups = []
        for g, group in enumerate(blocks):
            if isinstance(group, torch.Tensor) or not hasattr(group, "__iter__"):
                raise TypeError(f"blocks[{g}] must be an iterable of parameters (e.g. [p1, p2] or "
                                f"module.parameters()), got a {type(group).__name__}")
            members = list(group)
            if not members:
                raise ValueError(f"blocks[{g}] is empty")
            for i, p in enumerate(members):
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"blocks[{g}][{i}] is a {type(p).__name__}, not a parameter")
                if id(p) not in self._first_stage:
                    raise ValueError(f"blocks[{g}][{i}] (shape {tuple(p.shape)}) is not a parameter of the model")
                name = self._names[id(p)]
                if not p.requires_grad:
                    raise ValueError(f"blocks[{g}]: parameter {name!r} has requires_grad=False (frozen); "
                                     f"only trainable parameters can form a block")
                if id(p) in owner:
                    first = owner[id(p)]
                    where = f"twice in blocks[{g}]" if first == g else f"in blocks[{first}] and blocks[{g}]"
                    raise ValueError(f"parameter {name!r} is {where}; each parameter may be in one group only")
                owner[id(p)] = g
            groups.append(sorted(members, key=lambda p: order[id(p)]))  # model order: the draws of blocks=None
        return "groups", groups

    def _choose_block(self) -> int:
        if self.mode == "random":  # its own stream: the directions use the seed's torch generator
            return random.Random(f"hzo_ext.SPSA:{self.seed}:{self.calls}").randrange(len(self.blocks))
        return self.calls % len(self.blocks)

    def _run(self, a: torch.Tensor, start: int) -> torch.Tensor:
        for l in range(start, len(self.stages) + 1):
            a = run_stage(self.stages, l, a)
        return a

    @torch.no_grad()
    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        if self._watch.changed():
            self._index_model()
        check_batch(x, y, self.stages)
        check_stages_static(self.stages)
        L, n = len(self.stages), self.num_samples
        stats = self.last_stats = EstimateStats()
        index = self._choose_block()
        params = self.blocks[index]
        start = min((self._first_stage[id(p)] for p in params), default=1)
        a = x
        for l in range(1, start):  # the stages before the block: the same in every query
            a = run_stage(self.stages, l, a)
        loss = self.loss.total(self._run(a, start), y)
        gen = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        self.last_block = SPSABlock(index, tuple(self._names[id(p)] for p in params))
        saved = [p.detach().clone() for p in params]  # becomes p.grad; holds the weights until then
        states, alphas = [], []
        try:
            for _ in range(n):
                states.append(gen.get_state())
                side = []
                for sign in (1.0, -1.0):
                    gen.set_state(states[-1])
                    for p, w in zip(params, saved):  # p = w + sign * eps * z, as (w + sign * eps * z) rounds
                        _draw(p, gen)
                        p.mul_(sign * self.eps)
                        p.add_(w)
                    side.append(self.loss.total(self._run(a, start), y))
                proj = (side[0] - side[1]) / (2 * self.eps)
                if not torch.isfinite(proj):
                    raise ValueError("non-finite value in an SPSA query (perturbed loss is inf/nan); lower eps")
                alphas.append(proj.item() / n)
        finally:
            for p, w in zip(params, saved):
                p.copy_(w)
        for s, (state, alpha) in enumerate(zip(states, alphas)):
            gen.set_state(state)
            for g in saved:  # g = sum_s alpha_s z_s, summed in sample order from 0
                z = g if s == 0 else torch.empty_like(g)
                _draw(z, gen)
                if s == 0:
                    torch.add(torch.zeros((), dtype=g.dtype, device=g.device), g, alpha=alpha, out=g)
                else:
                    g.add_(z, alpha=alpha)
                del z
        for p, g in zip(params, saved):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        queries = 2 * n * (L - start + 1)
        stats.fd_layer_evals = queries
        stats.probes = n
        stats.forward_calls = L + queries
        stats.loss_evals = 2 * n
        stats.seconds = time.perf_counter() - t0
        return loss.detach()


def _draw(t: torch.Tensor, gen: torch.Generator) -> None:
    """Fill t with the N(0, 1) draw ``torch.randn(t.shape, generator=gen)`` would give (randn is
    ``empty(...).normal_()``; a non-contiguous t takes the values through a contiguous copy)."""
    if t.is_contiguous():
        t.normal_(generator=gen)
    else:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device))


class Backprop:
    """Ordinary autograd through the whole chain, with the estimators' interface."""

    def __init__(self, model, loss_fn, process_group=None):
        self.model = model
        self.stages = as_stages(model)
        self.loss = LossHead(loss_fn)
        self.last_stats = EstimateStats()
        distributed.attach(self, process_group)  # data-parallel, like DDP

    @outside_inference_mode
    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        check_batch(x, y, self.stages)
        own = isinstance(self.model, nn.Module) and not isinstance(self.model, nn.ModuleList)
        out = self.model(x) if own else _forward(self.stages, x)  # the model's own forward
        loss = self.loss.total(out, y)
        loss.backward()
        self.last_stats = EstimateStats(forward_calls=len(self.stages), seconds=time.perf_counter() - t0)
        return loss.detach()
