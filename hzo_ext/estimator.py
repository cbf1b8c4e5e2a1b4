"""HZO: hierarchical zeroth-order gradient estimation (plan + pure-PyTorch execution).

The plan (the tree of splits, level by level, with probes, queries and predicted memory) is
built from shapes alone and is inspectable before running (``HZO.plan(x)``); execution walks
it level by level. All splits of one level are independent: their probes depend only on clean
activations, only the contraction needs the parent's target. A C++ executor can replace
``HZO._run_plan`` while sharing ``build_plan``.

Every +-eps perturbation and every Jacobian-target contraction goes through
``hzo_ext.ops.perturb`` / ``hzo_ext.ops.contract`` (``probe_targets`` below).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import operator
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from . import _ext, distributed, executor as cpp_executor, graph, numerics, opengine, ops, spp as spp_geometry
from .nvtx import nvtx_range
from .stages import (BlackBox, LossHead, as_stages, check_batch, check_eps, check_stages_dynamic, compute_dtype,
                     check_stages_static, run_stage, stage_name)

__all__ = ["HZO", "Plan", "Split", "EstimateStats", "build_plan", "choose_split", "probe_targets",
           "outside_inference_mode"]


def outside_inference_mode(backward):
    """Run ``backward(x, y)`` with autograd available even when called under
    torch.inference_mode() (the leaves are local VJPs): inputs are copied out of it."""
    @functools.wraps(backward)
    def run(self, x, y):
        if not torch.is_inference_mode_enabled():
            return backward(self, x, y)
        with torch.inference_mode(False):
            copy_out = lambda t: t.clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
            return backward(self, copy_out(x), copy_out(y))
    return run


@dataclass
class EstimateStats:
    """Counts of one ``backward`` call.

    fd_layer_evals: queries, one stage applied to one perturbed copy of the batch.
    probes: +-eps pairs on activations (splits, CGE layers, SPSA directions); loss head excluded.
    forward_calls: stage invocations from Python (clean forward, batched queries, black-box leaves;
        with the C++ executors: their calls into Python, for what they do not run themselves).
    loss_evals: per-sample-loss evaluations of one (perturbed) copy of the batch.
    blackbox_evals: black-box stage runs on perturbed parameter copies (zeroth-order leaves).
    With a process_group the counts are this rank's; comm_seconds: waiting in collectives
    (gradient or partial-target sums), check_seconds: the cross-rank check (hzo_ext.distributed).
    """
    fd_layer_evals: int = 0
    probes: int = 0
    forward_calls: int = 0
    loss_evals: int = 0
    seconds: float = 0.0
    blackbox_evals: int = 0
    splits: int = 0
    comm_seconds: float = 0.0
    check_seconds: float = 0.0


# ---- the plan ------------------------------------------------------------------------------

def check_split_policy(policy, auto: bool = False) -> None:
    names = ("auto", "bisect", "chain") if auto else ("bisect", "chain")
    if policy not in names and not callable(policy):
        raise ValueError(f"split must be {', '.join(map(repr, names))} or a callable (i, j) -> m, got {policy!r}")


def choose_split(policy, i: int, j: int) -> int:
    """Split point m of the range (i, j], j - i >= 2, validated i < m < j."""
    if policy == "bisect":
        m = j - (j - i) // 2  # the shorter half on the right
    elif policy == "chain":
        m = j - 1
    elif callable(policy):
        m = policy(i, j)
        if isinstance(m, bool) or not isinstance(m, int) or not i < m < j:
            raise ValueError(f"split policy returned m={m!r} for the range ({i}, {j}]; it must be an "
                             f"int with {i} < m < {j}")
    else:
        check_split_policy(policy)
    return m


@dataclass(frozen=True)
class Split:
    """Range (i, j] split at m: the right sub-network f_j o ... o f_{m+1} is probed with
    ``probes`` +-eps pairs on a_m, costing ``queries`` = 2 * probes * (j - m)."""
    i: int
    m: int
    j: int
    level: int
    probes: int
    queries: int
    chunks: int
    peak_bytes: int
    dense: bool = True  # False: SPP, each probe moves every coordinate of one color
    how: str = ""  # op-level engine: folded, elementwise, fused (layer norm, softmax), SPP, dense (+ folded),
    # or no target
    folded: int = 0  # of ``probes``, those that fold (the op's VJP): counted as a dense probe would be


@dataclass(frozen=True)
class Plan:
    """The tree of splits for one input shape. ``levels[k]`` are the independent splits of level k."""
    policy: str
    batch: int
    shapes: tuple  # per-sample shape of a_0 .. a_L
    itemsize: int
    chunk_size: int | None
    levels: tuple  # tuple[tuple[Split, ...], ...]
    stage_names: tuple = ()  # "stage l (name: Type)" per stage, when the estimator knows them
    stored_bytes: int = 0  # op-level engine: the clean forward's values kept for the probes and leaves

    @property
    def predicted_peak_bytes(self) -> int:
        """Predicted peak memory of the estimate beyond the model: stored values + the largest split."""
        return self.stored_bytes + self.peak_query_bytes

    @property
    def num_stages(self) -> int:
        return len(self.shapes) - 1

    @property
    def splits(self) -> list[Split]:
        return [s for level in self.levels for s in level]

    @property
    def fd_layer_evals(self) -> int:
        return sum(s.queries for s in self.splits)

    @property
    def probes(self) -> int:
        return sum(s.probes for s in self.splits)

    @property
    def loss_evals(self) -> int:
        return 2 * math.prod(self.shapes[-1])  # the loss head: 2C per-sample loss evaluations

    @property
    def peak_query_bytes(self) -> int:
        return max([s.peak_bytes for s in self.splits] + [0])

    def __str__(self) -> str:
        mib = 1 / 2**20
        lines = [f"HZO plan: {self.num_stages} stages, split={self.policy}, batch {self.batch}, "
                 f"chunk_size={self.chunk_size}"]
        if self.stage_names:  # the cuts: a_l is the state after stage l
            lines.append(f"  cuts: a_0 {list(self.shapes[0])} (input)")
            lines += [f"        a_{l} {list(self.shapes[l])} after {name}"
                      for l, name in enumerate(self.stage_names, start=1)]
        lines.append(f"  loss head: {self.loss_evals // 2} probes, {self.loss_evals} loss evaluations")
        for k, level in enumerate(self.levels):
            lines.append(f"  level {k}: {len(level)} splits, {sum(s.queries for s in level)} queries")
            for s in level:
                lines.append(f"    ({s.i}, {s.m}, {s.j}]  {s.how or ('dense' if s.dense else 'SPP')} probes={s.probes}  "
                             f"queries={s.queries}  "
                             f"chunks={s.chunks}  peak={s.peak_bytes * mib:.2f} MiB")
        lines.append(f"  total: {len(self.splits)} splits in {len(self.levels)} levels, {self.probes} probes, "
                     f"{self.fd_layer_evals} fd_layer_evals, predicted peak query memory "
                     f"{self.peak_query_bytes * mib:.2f} MiB")
        if self.stored_bytes:
            lines.append(f"  predicted peak memory {self.predicted_peak_bytes * mib:.2f} MiB (stored values "
                         f"{self.stored_bytes * mib:.2f} MiB + the largest split)")
        return "\n".join(lines)


def build_plan(shapes: Sequence[Sequence[int]], batch: int, policy="bisect", chunk_size: int | None = None,
               itemsize: int = 4, probes: Callable[[int, int], int] | None = None) -> Plan:
    """Plan the splits of a chain with per-sample activation shapes ``shapes`` = [S_0, ..., S_L].

    ``probes(m, j)``: the number of probes of split (m, j] (an SPP coloring's colors);
    default dense, prod(S_m).

    Predicted peak memory of a split = the query tensors of one chunk: the 2*c*B perturbed
    copies of a_m plus the largest input+output pair of a stage in the right sub-network
    (an upper bound; stage-internal temporaries are not counted).

    Planned by the C++ planner (csrc/core/plan.h) when the extension is loaded, else by the
    Python loop below; both give the same Plan (docs/planner.md). Exceptions raised by the
    ``policy`` or ``probes`` callables propagate unchanged.
    """
    shapes = tuple(tuple(operator.index(d) for d in s) for s in shapes)  # ints (numpy ints too), not floats
    sizes = [math.prod(s) for s in shapes]
    # The argument checks of csrc/core/plan.cpp, with the same messages.
    if not sizes:
        raise ValueError("sizes must hold the per-sample sizes of a_0 .. a_L (at least a_0), got none")
    for l, n in enumerate(sizes):
        if n < 1:
            raise ValueError(f"the per-sample size of a_{l} must be >= 1, got {n!r} (shape {shapes[l]})")
    for what, v in (("batch", batch), ("itemsize", itemsize)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be >= 1, got {v!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
    check_split_policy(policy)
    if probes is not None and not callable(probes):
        raise TypeError(f"probes must be a callable (m, j) -> K or None, got {probes!r}")

    cpp = getattr(_ext._C, "build_plan", None)  # looked up per call: tests switch the C++ planner off
    if cpp is not None:
        levels = tuple(tuple(Split(*s) for s in level)
                       for level in cpp(sizes, batch, policy, chunk_size, itemsize, probes))
    else:
        L = len(shapes) - 1
        levels, ranges, level = [], [(0, L)], 0
        while ranges:
            here, nxt = [], []
            for i, j in ranges:
                if j - i < 2:
                    continue
                m = choose_split(policy, i, j)
                K = sizes[m] if probes is None else probes(m, j)
                if isinstance(K, bool) or not isinstance(K, int) or K < 1:
                    raise ValueError(f"probes(m, j) returned {K!r} for m={m}, j={j}; it must be an int >= 1")
                c = K if chunk_size is None else min(K, chunk_size)
                rows = 2 * c * batch
                peak = itemsize * rows * (sizes[m] + max(sizes[l - 1] + sizes[l] for l in range(m + 1, j + 1)))
                here.append(Split(i, m, j, level, K, 2 * K * (j - m), -(-K // c), peak, K == sizes[m]))
                nxt += [(i, m), (m, j)]
            if here:
                levels.append(tuple(here))
            ranges, level = nxt, level + 1
        levels = tuple(levels)
    name = policy if isinstance(policy, str) else getattr(policy, "__name__", "callable")
    return Plan(name, batch, shapes, itemsize, chunk_size, levels)


# ---- the probe: perturb, run, contract -------------------------------------------------------

def probe_targets(run_right: Callable[[torch.Tensor, int], torch.Tensor], a: torch.Tensor, target: torch.Tensor,
                  eps: float, chunk_size: int | None, coloring=None, shard=None, what: str = "a split",
                  nvtx: str = "hzo/probe") -> torch.Tensor:
    """``delta = J^T target`` per sample, J = d run_right(a) / d a, by central differences.

    One probe per color of ``coloring`` (default dense: one per coordinate of a [B, *S]; or an
    ``spp.SpatialColoring``), ``chunk_size`` at a time: the 2c perturbed copies go through
    ``run_right(z [2cB, *S], copies=2c) -> [2cB, *T]`` in one call and are contracted with
    target [B, *T] at once (``coloring.contract``: ops.contract with the dense owner map, or
    ops.contract_spp). Returns [B, *S].

    ``shard`` (query-parallel, ``hzo_ext.distributed.Shard``): this rank runs only its block
    of probe ids and the partial targets are summed across the ranks (``what`` names the
    collective in errors). ``nvtx``: prefix of the profiler ranges <nvtx>/{perturb,query,contract}.
    """
    n = math.prod(a.shape[1:])
    coloring = coloring or spp_geometry.DenseColoring(n)
    delta = None
    probes = None if shard is None else shard.probes(coloring.num_colors)
    for ids, copies in _perturbed_chunks(a, coloring, eps, chunk_size, probes, nvtx):
        with nvtx_range(f"{nvtx}/query"):
            out = run_right(copies, 2 * ids.numel())
        with nvtx_range(f"{nvtx}/contract"):
            part = coloring.contract(out.reshape(2, ids.numel(), a.shape[0], *out.shape[1:]), target, ids, eps)
        delta = part if delta is None else delta + part
    if shard is not None:
        delta = shard.sum(delta, target, n, what)
    return delta.reshape(a.shape)


def _perturbed_chunks(a: torch.Tensor, coloring, eps: float, chunk_size: int | None,
                      probes: tuple[int, int] | None = None, nvtx: str = "hzo/probe"):
    """Yields (probe ids, their +-eps copies of a as one batch [2cB, *S]), chunk_size probes at a
    time, over the probe ids [lo, hi) = ``probes`` (default all)."""
    colors = coloring.colors(a.device)
    lo, hi = (0, coloring.num_colors) if probes is None else probes
    chunk = max(1, hi - lo) if chunk_size is None else chunk_size
    for start in range(lo, hi, chunk):
        ids = torch.arange(start, min(hi, start + chunk), device=a.device)
        with nvtx_range(f"{nvtx}/perturb"):
            copies = ops.perturb(a, colors, ids, eps).reshape(-1, *a.shape[1:])  # [2, K, B, *S] flattened
        yield ids, copies


def _bytes(n: int) -> str:
    """n bytes in the largest unit that keeps it at 1 or more (``3.20 MiB``)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def _same_forward(model_out: torch.Tensor, ours: torch.Tensor) -> None:
    """The op-level engine's forward equals the model's own up to round-off (float32 or wider)."""
    if not torch.allclose(model_out, ours, rtol=1e-5, atol=1e-6 * (1 + ours.abs().max().item())):
        raise ValueError("the op-level engine's forward differs from the model's own (an op with side effects or "
                         "aliasing torch.fx does not record, e.g. += on an alias or an in-place op on a view); pass "
                         "split='bisect', executor='python'")


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"non-finite value (inf/nan) in a query: {what}; lower eps or check the model "
                         f"(overflow in deep or unnormalised stages)")


# ---- shared machinery of the stage-wise estimators (HZO, CGE) --------------------------------

class StageEstimator:
    """Clean forward, loss head and leaves, shared by HZO and CGE."""

    def __init__(self, model, loss_fn, eps: float = 1e-3, chunk_size: int | None = None,
                 eps_mode: str = "absolute", query_dtype: torch.dtype | None = None, check_samples: bool = True,
                 process_group=None, query_parallel: bool = False):
        self.model = model
        self.stages = as_stages(model)
        self._watch = graph.ModelWatch(model)
        self.loss = LossHead(loss_fn)
        self.eps = check_eps(eps)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        if eps_mode not in ("absolute", "relative"):
            raise ValueError(f"eps_mode must be 'absolute' or 'relative', got {eps_mode!r}")
        self.eps_mode = eps_mode
        numerics.check_query_dtype(query_dtype)
        self.query_dtype = query_dtype
        self._probe_dtype = query_dtype  # per call: float32 for low-precision models (numerics.probe_dtype)
        self._dtype = None  # per call: the dtype the model computes in (stages.compute_dtype)
        self.check_samples = check_samples
        self._dynamic_checked: set = set()
        self._no_vmap: set = set()  # black-box stages that cannot run under torch.vmap
        self._step_warnings: set = set()  # (what, zone) warned about by numerics.check_step
        self.last_stats = EstimateStats()
        distributed.attach(self, process_group, query_parallel, can_query_parallel=True)

    # -- pieces

    def _refresh_stages(self) -> None:
        """Rebuild the stages when what they were made from changed (``graph.ModelWatch``: the
        module tree, parameters and buffers, torch modules' settings): a stage appended after
        construction is used, never ignored."""
        if self._watch.changed():
            self.stages = as_stages(self.model)
            self._watch = graph.ModelWatch(self.model)
            self._restaged()

    def _restaged(self) -> None:
        """Forget what was derived from the old stages."""
        self._dynamic_checked.clear()
        self._no_vmap.clear()

    def _step(self, a: torch.Tensor) -> float:
        """eps for perturbing a: absolute, or eps * rms(a) with eps_mode='relative'."""
        if self.eps_mode == "absolute":
            return self.eps
        rms = a.double().pow(2).mean().sqrt().item()
        return self.eps * rms if rms > 0 and math.isfinite(rms) else self.eps

    def _prepare(self, x, y):
        """Checks of one call, after ``_refresh_stages`` (which decides the engine)."""
        check_batch(x, y, self.stages)
        check_stages_static(self.stages)
        self._dtype = compute_dtype(x, self.stages)
        self._probe_dtype = numerics.probe_dtype(self._dtype, self.query_dtype)
        self.last_stats = EstimateStats()

    def _check_steps(self, acts, cuts) -> None:
        """eps against the probe dtype's resolution at the scale of every perturbed a_m (m in cuts)."""
        L, cuts = len(acts) - 1, sorted(set(cuts))
        for m in cuts:
            if not acts[m].is_floating_point():
                raise ValueError(f"a_{m} (output of {stage_name(self.stages, m)}) is {acts[m].dtype}: this engine "
                                 f"perturbs the value at every cut; the default split='auto' perturbs only floating "
                                 f"values")
        dtype = self._probe_dtype or self._dtype
        for m, amax in zip(cuts, numerics.max_abs(acts[m] for m in cuts)):
            what = f"the logits a_{L} (loss head)" if m == L else f"a_{m} (output of {stage_name(self.stages, m)})"
            numerics.check_step_at(self._step(acts[m]), amax, dtype, what, warned=self._step_warnings)

    def _clean_forward(self, x: torch.Tensor):
        """a_0..a_L (detached), and each differentiable stage's output with its local graph
        (input detached, so the leaf VJP stays inside the stage)."""
        acts, local = [x.detach()], [None]
        for l, stage in enumerate(self.stages, start=1):
            needs_vjp = not isinstance(stage, BlackBox) and any(p.requires_grad for p in stage.parameters())
            with torch.set_grad_enabled(needs_vjp):  # a copy in: an in-place op must not overwrite a_{l-1}
                out = run_stage(self.stages, l, acts[-1].clone())
            _check_finite(out, f"{stage_name(self.stages, l)} in the clean forward")
            acts.append(out.detach())
            local.append(out if needs_vjp and out.requires_grad else None)
        self.last_stats.forward_calls += len(self.stages)
        key = (tuple(x.shape), x.dtype, x.device)
        if self.check_samples and key not in self._dynamic_checked:
            check_stages_dynamic(self.stages, acts)
            self._dynamic_checked.add(key)
        return acts, local

    def _query_stages(self):
        """The stages queries run through: the model's, or copies in the probe dtype."""
        if self._probe_dtype is None:
            return self.stages
        return [copy.deepcopy(s).to(self._probe_dtype) for s in self.stages]

    def _qcast(self, t: torch.Tensor) -> torch.Tensor:
        return t if self._probe_dtype is None else t.to(self._probe_dtype)

    def _run_range(self, qstages, z: torch.Tensor, m: int, j: int) -> torch.Tensor:
        """f_j o ... o f_{m+1} on a batch of (perturbed) copies."""
        for l in range(m + 1, j + 1):
            z = run_stage(self.stages, l, z, module=qstages[l - 1])
        self.last_stats.forward_calls += j - m
        return z

    def _check_probe(self, delta: torch.Tensor, qstages, a: torch.Tensor, m: int, j: int, eps: float,
                     where: str, coloring=None) -> None:
        """inf/nan in any query reaches the contracted delta (inf - inf, inf * 0 are nan), so only
        delta is checked; on failure the queries are re-run stage by stage to name the culprit."""
        if torch.isfinite(delta).all():
            return
        coloring = coloring or spp_geometry.DenseColoring(a[0].numel())
        for _, z in _perturbed_chunks(a, coloring, eps, self.chunk_size):
            for l in range(m + 1, j + 1):
                z = run_stage(self.stages, l, z, module=qstages[l - 1])
                _check_finite(z, f"{stage_name(self.stages, l)} {where}")
        _check_finite(delta, f"the contraction {where}")

    def _per_sample_loss(self, y: torch.Tensor, B: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """run_right for probes that end at the loss: logits copies [nB, *T] -> per-sample loss [nB, 1]."""
        def run(copies: torch.Tensor, n: int) -> torch.Tensor:
            ys = y.repeat(n, *([1] * (y.dim() - 1)))
            out = self.loss.per_sample(copies, ys, batch=B)
            _check_finite(out, "the per-sample loss on perturbed logits (loss head)")
            self.last_stats.loss_evals += n
            return out.unsqueeze(1).to(copies.dtype)  # a float64 target must not promote float32 queries
        return run

    def _loss_head(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """delta_L = d loss / d a_L per sample, by central differences of the per-sample loss
        (the reduction's scale is inside the per-sample loss, so the target is 1)."""
        z = self._qcast(logits)
        ones = torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
        return probe_targets(self._per_sample_loss(y, z.shape[0]), z, ones, self._step(z), self.chunk_size,
                             shard=self._shard, what="the loss head")

    def _leaves(self, acts, local, deltas) -> None:
        """Weight gradients: local VJP of each stage with grad_output delta_l, or finite
        differences on a black-box stage's own parameters; accumulated into p.grad."""
        for l, stage in enumerate(self.stages, start=1):
            params = [p for p in stage.parameters() if p.requires_grad]
            if not params:
                continue
            if isinstance(stage, BlackBox):
                grads = self._blackbox_grads(stage, stage_name(self.stages, l), acts[l - 1], deltas[l])
            elif local[l] is None:
                continue  # the stage's output does not depend on its parameters
            else:
                grads = torch.autograd.grad(local[l], params, grad_outputs=deltas[l].to(local[l].dtype),
                                            allow_unused=True)
            self._accumulate(params, grads)

    @staticmethod
    def _accumulate(params, grads) -> None:
        """p.grad += g, like autograd (a new tensor the first time)."""
        for p, g in zip(params, grads):
            if g is None:
                continue
            g = g.to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad + g

    def _run_on_param_copies(self, stage, named, copies: torch.Tensor, a_in: torch.Tensor) -> torch.Tensor:
        """The stage on a_in once per parameter vector in copies [N, P] -> [N, B, *T]. Vectorised
        with torch.func.vmap when the stage allows it (no autograd involved), else one call each."""
        sizes = [p.numel() for _, p in named]

        def call(w: torch.Tensor) -> torch.Tensor:
            params = {n: t.view_as(p) for (n, p), t in zip(named, torch.split(w, sizes))}
            return torch.func.functional_call(stage, params, (a_in,))

        if id(stage) not in self._no_vmap:
            try:
                out = torch.vmap(call)(copies)
                self.last_stats.forward_calls += 1
                return out
            except Exception:  # data-dependent or non-torch code (numpy, hardware): plain loop
                self._no_vmap.add(id(stage))
        out = torch.stack([call(w) for w in copies])
        self.last_stats.forward_calls += copies.shape[0]
        return out

    @torch.no_grad()
    def _blackbox_grads(self, stage: BlackBox, name: str, a_in: torch.Tensor,
                        delta: torch.Tensor) -> list[torch.Tensor]:
        """Central differences on the black box's own parameters, contracted with its target delta:
        g_k = sum_b <delta[b], f(a; w + eps e_k)[b] - f(a; w - eps e_k)[b]> / (2 eps)."""
        named = [(n, p) for n, p in stage.named_parameters() if p.requires_grad]
        flat = torch.cat([p.detach().reshape(-1) for _, p in named]).unsqueeze(0)  # [1, P]
        P = flat.shape[1]
        eps = stage.eps if stage.eps is not None else self._step(flat)
        numerics.check_step(eps, flat, f"the parameters of {name}",
                            "BlackBox eps" if stage.eps is not None else "eps", warned=self._step_warnings)
        colors = ops.dense_colors(P, device=flat.device)
        chunk = P if self.chunk_size is None else self.chunk_size
        total = torch.zeros(P, dtype=flat.dtype, device=flat.device)
        for start in range(0, P, chunk):
            ids = torch.arange(start, min(P, start + chunk), device=flat.device)
            K = ids.numel()
            copies = ops.perturb(flat, colors, ids, eps).reshape(2 * K, P)
            out = self._run_on_param_copies(stage, named, copies, a_in)  # [2K, B, *T]
            _check_finite(out, f"{name} on perturbed parameters (black-box leaf)")
            y = out.reshape(2, K, *out.shape[1:])
            owner = ops.dense_owner(ids, math.prod(y.shape[3:]))
            total += ops.contract(y, delta.to(y.dtype), owner, eps, num_inputs=P).sum(0)
            self.last_stats.blackbox_evals += 2 * K
        return [g.view_as(p) for g, (_, p) in zip(torch.split(total, [p.numel() for _, p in named]), named)]


# ---- HZO -----------------------------------------------------------------------------------

class HZO(StageEstimator):
    """Hierarchical zeroth-order gradient estimator; ``backward(x, y)`` fills ``p.grad`` like autograd.

    Args:
        model: ``nn.Sequential`` (children are stages) or a list of modules.
        loss_fn: a torch loss module (any reduction) or a callable returning per-sample losses.
        eps: finite-difference step (absolute, or relative to rms(a_m) with eps_mode='relative').
        split: 'auto' (the default, the fastest accurate path): the op-level engine
            (``hzo_ext.opengine``: a cut between every two ops of the traced graph, affine ops
            folded, elementwise ops probed by the fused kernel); where it cannot run (see
            ``self.engine_reason``), 'bisect' over the stages. Or the stage-wise engines:
            'bisect' (the paper, m = j - (j-i)//2), 'chain' (m = j - 1), a callable (i, j) -> m.
        memory_budget: bytes the op-level estimate may use beyond the model (default: half of
            the device's memory); a plan predicted above it fails before running, saying why.
        chunk_size: at most this many probes per batched query (bounds peak memory; see plan()).
        spp: 'auto': a split whose a_m is spatial ([C, *spatial]) and whose right sub-network has
            a known footprint (``hzo_ext.spp``) is probed with the SPP coloring when that needs
            fewer probes; else densely, with one warning per module that blocks it. True: every
            split colored, or a ValueError saying why not. False: dense.
        eps_mode: 'absolute' or 'relative' (eps * rms of the perturbed activation, per split).
        query_dtype: run the probed sub-networks on copies of the stages in this dtype (e.g.
            torch.float64 for a float32 model); float32 at least. Default: the model's dtype,
            float32 for float16/bfloat16 models. eps is checked against this dtype's resolution
            at the scale of every perturbed activation (``hzo_ext.numerics``): an error below
            it, a warning where round-off or truncation dominates.
        check_samples: run the one-time dynamic check (determinism, no in-batch mixing).
        process_group: a ``torch.distributed`` group: data-parallel, each rank estimates on its
            shard of the batch and the gradients are combined (the whole batch's gradient on
            every rank); see ``hzo_ext.distributed`` and docs/distributed.md.
        query_parallel: with process_group, every rank has the same batch and runs its block of
            the probes of every split; the partial targets are summed (the single-process
            estimate on every rank).
        executor: 'python' (this module), 'cpp' (the C++ executor, ``hzo_ext.executor``;
            ValueError naming the option it cannot run) or 'auto' (cpp when the extension is
            loaded and every option is supported, else python). ``self.executor`` tells which.
        fast: C++ executor only: reassociate floating-point work to do less of it (fold +-eps
            into large first Linears of right sub-networks, stack small same-shaped right
            sub-networks of a level); round-off then differs from the Python path
            (docs/executor.md).
    """

    def __init__(self, model, loss_fn, eps: float = 1e-3, split="auto", chunk_size: int | None = None,
                 spp="auto", eps_mode: str = "absolute", query_dtype: torch.dtype | None = None,
                 check_samples: bool = True, process_group=None, query_parallel: bool = False,
                 executor: str = "auto", fast: bool = False, memory_budget: int | None = None):
        super().__init__(model, loss_fn, eps, chunk_size, eps_mode, query_dtype, check_samples,
                         process_group, query_parallel)
        check_split_policy(split, auto=True)
        if spp not in ("auto", True, False):
            raise ValueError(f"spp must be 'auto', True or False, got {spp!r}")
        if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                          or memory_budget < 1):
            raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
        self.split = split
        self.spp = spp
        self.memory_budget = memory_budget
        self._stage_split = "bisect" if split == "auto" else split  # the stage-wise engines' policy
        self._colorings: dict = {}  # (m, j, S_m, S_j) -> the coloring split (m, j] is probed with
        self._barriers: dict = {}  # activation shapes -> the barrier stages (_split_policy)
        self._spp_warned: set = set()
        # (shape, dtype, device) of x and the options -> (op-level plan, probed op -> chunk size)
        self._op_plans: dict = {}
        self._op_cores: dict = {}  # the same keys -> (executor.CppOps or None: Python, executor_reason)
        self.executor_reason = None  # why the op-level engine ran in Python (None: it ran in C++)
        self._executor_args = (executor, fast)
        self._select_engine()

    def _select_engine(self) -> None:
        """split='auto': the op-level engine unless an option or the model rules it out
        (``engine_reason`` says which); else the stage-wise engines (C++ executor or Python)."""
        executor, fast = self._executor_args
        self._ops, self.engine_reason = None, None
        if self.split == "auto":
            why = ("executor='cpp' runs the stage-wise engine" if executor == "cpp" else
                   "fast=True is a C++ executor option" if fast else
                   "query_parallel shards the probes of stage-wise splits" if self.query_parallel else None)
            if why is None:
                try:
                    self._ops = opengine.OpProgram(self.model)
                    # fx baked the plain attributes of the modules it traced through: watch them too
                    self._watch = graph.ModelWatch(self.model, traced=self._ops.traced.through)
                except opengine.Unsupported as exc:
                    why = str(exc)
            self.engine_reason = why
        self._set_engine()

    def _fall_back(self, why: str) -> None:
        """The op-level engine met something it does not run: the stage-wise engines from now on."""
        self._ops, self.engine_reason = None, why
        self._set_engine()

    def _set_engine(self) -> None:
        """engine/executor from ``_ops``: the op-level engine, else the stage-wise C++ or Python one."""
        self._cpp = None if self._ops is not None else cpp_executor.select(self, *self._executor_args)
        self.engine = "ops" if self._ops is not None else "stages"
        self.executor = "python" if self._cpp is None else "cpp"
        if self._ops is not None and self._executor_args[0] != "python" \
                and cpp_executor.ops_unsupported(self, self._ops) is None:
            self.executor = "cpp"  # unless the input's dtype or an op's outputs rule it out (executor_reason)

    def _restaged(self) -> None:
        super()._restaged()
        self._colorings.clear()
        self._barriers.clear()
        self._op_plans.clear()
        self._op_cores.clear()
        self._select_engine()  # traced and lowered anew, or refused

    def _split_coloring(self, m: int, j: int, shapes) -> spp_geometry.DenseColoring | spp_geometry.SpatialColoring:
        """The one place deciding how split (m, j] is probed: SPP coloring or dense (see ``spp``)."""
        key = (m, j, tuple(shapes[m]), tuple(shapes[j]), self.spp)
        if key in self._colorings:
            return self._colorings[key]
        dense = spp_geometry.DenseColoring(math.prod(shapes[m]))
        chosen = dense
        if self.spp is True or (self.spp == "auto" and len(shapes[m]) >= 2):
            names = [stage_name(self.stages, l) for l in range(m + 1, j + 1)]
            try:
                colored = spp_geometry.coloring_for(self.stages[m:j], shapes[m], shapes[j], names, shapes[m:j])
            except spp_geometry.NoFootprint as why:
                if self.spp is True:
                    raise ValueError(f"spp=True: split at a_{m} (right sub-network stages {m + 1}..{j}) cannot be "
                                     f"colored: {why}; use spp='auto' to probe such splits densely") from None
                if why.where not in self._spp_warned:
                    self._spp_warned.add(why.where)
                    warnings.warn(f"SPP: {why}; right sub-networks containing it are probed densely",
                                  stacklevel=6)  # the caller of backward() / plan()
            else:
                if self.spp is True or colored.num_colors < dense.num_colors:
                    chosen = colored
        self._colorings[key] = chosen
        return chosen

    def _split_policy(self, shapes):
        """The policy the plan uses. With SPP on and split='bisect', a barrier stage (no footprint
        or a global one: a linear head, global pooling) is kept at the right end of its own range
        (m = j - 1 when it is stage j, else m = the barrier), so it never sits inside a long right
        half that would then be probed densely; ranges without barriers are bisected as usual."""
        if self.spp is False or self._stage_split != "bisect":
            return self._stage_split
        key = tuple(map(tuple, shapes))
        if key not in self._barriers:
            self._barriers[key] = [l for l in range(1, len(shapes))
                                   if spp_geometry.is_barrier(self.stages[l - 1], shapes[l - 1])]
        barriers = self._barriers[key]
        if not barriers:
            return "bisect"

        def bisect_around_barriers(i: int, j: int) -> int:
            inside = [l for l in barriers if i + 2 <= l <= j]  # stage i+1 is never in a right half
            if not inside:
                return j - (j - i) // 2
            return j - 1 if inside[-1] == j else inside[-1]
        return bisect_around_barriers

    def _build_plan(self, shapes, batch: int, itemsize: int) -> Plan:
        plan = build_plan(shapes, batch, self._split_policy(shapes), self.chunk_size, itemsize,
                          probes=lambda m, j: self._split_coloring(m, j, shapes).num_colors)
        names = tuple(stage_name(self.stages, l) for l in range(1, len(self.stages) + 1))
        return dataclasses.replace(plan, stage_names=names)

    @torch.no_grad()
    def plan(self, x: torch.Tensor) -> Plan:
        """The tree of splits for input x, before running anything but a clean forward for shapes."""
        self._refresh_stages()
        check_batch(x, None, self.stages)
        if self._ops is not None:
            try:
                return self._ops_plan(x)[0]
            except opengine.Unsupported as exc:
                self._fall_back(str(exc))
        a, shapes = x.clone(), [tuple(x.shape[1:])]  # a copy: in-place ops must not write x
        for l in range(1, len(self.stages) + 1):
            a = run_stage(self.stages, l, a)
            shapes.append(tuple(a.shape[1:]))
        dtype = compute_dtype(x, self.stages)
        return self._build_plan(shapes, x.shape[0], (numerics.probe_dtype(dtype, self.query_dtype) or dtype).itemsize)

    @outside_inference_mode
    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._refresh_stages()
        if self._ops is not None:
            try:
                return self._backward_ops(x, y)
            except opengine.Unsupported as exc:  # found in the clean forward, before any p.grad was written
                self._fall_back(str(exc))
        if self._cpp is not None and isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.float64):
            self._dtype, self._probe_dtype = x.dtype, None  # the C++ executor probes in the model's dtype
            return self._cpp.backward(x, y)  # low-precision models and ids: the Python path
        t0 = time.perf_counter()
        with nvtx_range("hzo/estimate"):
            self._prepare(x, y)
            acts, local = self._clean_forward(x)
            plan = self._build_plan([tuple(a.shape[1:]) for a in acts], x.shape[0],
                                    (self._probe_dtype or self._dtype).itemsize)
            self._check_steps(acts, [s.m for s in plan.splits] + [len(self.stages)])
            loss = self.loss.check_reproduces(acts[-1], y)
            deltas = self._run_plan(plan, acts, y)
            with nvtx_range("hzo/leaves"):
                self._leaves(acts, local, deltas)
        self.last_stats.seconds = time.perf_counter() - t0
        return loss.detach()

    @torch.no_grad()
    def _run_plan(self, plan: Plan, acts, y) -> dict[int, torch.Tensor]:
        """Targets delta_l for every stage: the loss head, then the splits level by level."""
        L = len(self.stages)
        with nvtx_range("hzo/head"):
            deltas = {L: self._loss_head(acts[L], y)}
        qstages = self._query_stages()
        for k, level in enumerate(plan.levels):
            with nvtx_range(f"hzo/level{k}"):
                for s in level:  # independent: each needs only clean activations and delta_j
                    deltas[s.m] = self._probe_split(qstages, s, acts[s.m], deltas[s.j], plan.shapes)
        return deltas

    def _probe_split(self, qstages, s: Split, a_m: torch.Tensor, delta_j: torch.Tensor, shapes) -> torch.Tensor:
        """delta_m = J^T delta_j for the right sub-network f_j o ... o f_{m+1} of split s."""
        a, eps = self._qcast(a_m), self._step(a_m)
        coloring = self._split_coloring(s.m, s.j, shapes)
        delta = probe_targets(lambda z, n: self._run_range(qstages, z, s.m, s.j), a, self._qcast(delta_j),
                              eps, self.chunk_size, coloring, shard=self._shard,
                              what=f"split ({s.i}, {s.m}, {s.j}]", nvtx=f"hzo/split{s.i}-{s.m}-{s.j}")
        self._check_probe(delta, qstages, a, s.m, s.j, eps,
                          f"while probing split ({s.i}, {s.m}, {s.j}] (perturbed a_{s.m})", coloring)
        mine = s.probes if self._shard is None else self._shard.count(s.probes)  # this rank's probes
        self.last_stats.fd_layer_evals += 2 * mine * (s.j - s.m)
        self.last_stats.probes += mine
        self.last_stats.splits += 1
        return delta

    # ---- the op-level engine (split='auto'; hzo_ext.opengine) ---------------------------------

    def _op_coloring(self, step, a, in_shape, out_shape):
        """How input ``a`` (a node) of shape in_shape of a probed op is probed: the SPP coloring
        of its module or call where the footprint is known and (spp='auto') needs fewer probes,
        else dense; spp=True: colored or a ValueError naming the op."""
        key = (step.node, a, in_shape, out_shape, self.spp)
        if key not in self._colorings:
            dense = spp_geometry.DenseColoring(math.prod(in_shape))
            chosen = dense
            if self.spp is True or (self.spp == "auto" and len(in_shape) >= 2):
                try:
                    if step.module is None:
                        colored = spp_geometry.coloring_for_call(step.node, a, in_shape, out_shape)
                    elif len(step.inputs) == 1:
                        colored = spp_geometry.coloring_for([step.module], in_shape, out_shape, [step.label],
                                                            [in_shape])
                    else:
                        raise spp_geometry.NoFootprint(step.label, "a module called on several state tensors")
                    chosen = colored if self.spp is True or colored.num_colors < dense.num_colors else dense
                except spp_geometry.NoFootprint as why:
                    if self.spp is True:
                        raise ValueError(f"spp=True: op {step.index} ({step.label}) cannot be colored on its input "
                                         f"{a.name}: {why}; use spp='auto' to probe such ops densely") from None
            self._colorings[key] = chosen
        return self._colorings[key]

    def _ops_plan(self, x: torch.Tensor) -> tuple[Plan, dict]:
        """The op-level plan (one split per op, top down, from a clean forward of one sample) and
        each probed op's chunk size (probes per batched query, from the memory budget)."""
        prog = self._ops
        try:
            env, _ = prog.forward(x[:1].clone(), keep_vjp=False)
        except ValueError:
            prog.forward(x.clone(), keep_vjp=False)  # the same error with the batch's shapes
            raise
        shapes = prog.shapes(env)
        B = x.shape[0]
        dtype = compute_dtype(x, self.stages)
        item = (numerics.probe_dtype(dtype, self.query_dtype) or dtype).itemsize
        pos = {prog.traced.x: 0, **{s.node: s.index for s in prog.steps}}
        # coordinates per sample: the one-sample forward's (the batch need not be the first dim:
        # attention's [3, B, heads, N, d]; a tuple: all its tensors; a bool or size: 1)
        size = lambda n: sum(t.numel() for t in opengine.tensors_of(env[n])) \
            if isinstance(env[n], (torch.Tensor, tuple, list)) else 1  # noqa: E731
        stored = B * item * (size(prog.traced.x) + sum(size(s.node) for s in prog.steps if not opengine.view_like(s)))
        # The ops whose output reaches the loss through values that get a target, as the
        # engines walk them back from the output.
        reached = {prog.traced.out}
        for s in reversed(prog.steps):
            if s.node in reached:
                reached.update(a for a in s.inputs if prog.wants_target(a, env[a]))
        # Targets alive while op s is probed: its own, and those of earlier values an op at or
        # after s reads (a skip connection's target waits for the block's input).
        shared = prog.traced.shared  # the same for every sample (a causal mask): no target
        steps = [s for s in prog.steps if shapes[s.index] is not None and s.node not in shared and s.node in reached]
        last_read = {}
        for s in steps:
            for a in s.inputs:
                if prog.wants_target(a, env[a]):
                    last_read[a] = max(last_read.get(a, 0), s.index)
        budget = self.memory_budget or opengine.default_memory_budget(x.device)
        splits, names, chunk_of = [], [], {}
        for k, s in enumerate(reversed(steps)):
            n_out = size(s.node)
            ins = [a for a in s.inputs if prog.wants_target(a, env[a])]
            # what the op reads of each: an item of a tuple (q of q, k, v = qkv.unbind(0)) is its output
            read = {a: size(s.node) if isinstance(env[a], (tuple, list)) else size(a) for a in ins}
            n_in = sum(read.values())
            pending = n_out + sum(size(a) for a, r in last_read.items() if pos[a] < s.index <= r)
            targets = B * item * pending
            if s.entry.kind == "affine":  # the VJP's result and its sum into the input's target
                how, probes, folded, peak = "folded", n_in, n_in, targets + 2 * B * item * n_in
            elif opengine.fused_elementwise(s, self.spp) and ins:
                how, probes, folded = "elementwise", 1, 0
                peak = targets + B * item * n_out * (2 if s.entry.kernel is not None else 5)
            else:  # the inputs it is affine in fold (counted as a dense probe would), the others are probed
                probed = [a for a in ins if a not in s.folds]
                fused = [a for a in probed if opengine.fused_probe(s, a) is not None]  # a layer norm's input
                probed = [a for a in probed if a not in fused]
                colorings = [self._op_coloring(s, a, shapes[pos[a]], shapes[s.index]) for a in probed]
                folded = sum(read[a] for a in ins if a in s.folds)
                probes = sum(c.num_colors for c in colorings) + folded + len(fused)
                how = "no target" if not ins else "folded" if not (probed or fused) else \
                    "fused" if not probed else \
                    "dense" if all(isinstance(c, spp_geometry.DenseColoring) for c in colorings) else "SPP"
                how += " + folded" if 0 < len(probed) + len(fused) < len(ins) else ""
                K = max([c.num_colors for c in colorings] + [1])
                # a probe's copies: the perturbed input, the others repeated, the output (the
                # op's own temporaries, attention's weights, are not counted)
                every = sum(size(a) for a in s.inputs if shapes[pos[a]] is not None and a not in shared)
                per_probe = 2 * B * item * (every + n_out)
                c = K if self.chunk_size is None else min(K, self.chunk_size)
                if self.chunk_size is None:  # the chunk follows from the memory budget
                    c = max(1, min(K, (budget - stored - targets - 2 * B * item * n_in) // per_probe))
                chunk_of[s.node] = c
                chunks = -(-K // c)
                peak = targets + c * per_probe + 2 * B * item * n_in
            queries = 2 * (n_in if how == "folded" else probes)
            splits.append(Split(s.index - 1, s.index - 1, s.index, k, probes, queries,
                                chunks if how.startswith(("dense", "SPP")) else 1, peak, how == "dense", how, folded))
        for s in prog.steps:
            src = ", ".join(f"a_{pos[a]}" for a in s.inputs) or "constants"
            names.append(f"op {s.index} ({s.label}, {s.entry.kind}) of {src}")
        plan = Plan("auto (op-level chain)", B, tuple(s or () for s in shapes), item, self.chunk_size,
                    tuple((sp,) for sp in splits), tuple(names), stored)
        if plan.predicted_peak_bytes > budget:
            raise MemoryError(f"the estimate is predicted to need {_bytes(plan.predicted_peak_bytes)} (stored values "
                              f"{_bytes(stored)} + the largest split {_bytes(plan.peak_query_bytes)}) beyond the "
                              f"model, over the memory budget of {_bytes(budget)}; lower the batch size, pass "
                              f"chunk_size, or raise memory_budget")
        return plan, chunk_of

    def _backward_ops(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        with nvtx_range("hzo/estimate"):
            self._prepare(x, y)
            key = (tuple(x.shape), x.dtype, x.device)
            # the plan and its C++ lowering also hold the options (eps schedules change them)
            plan_key = key + (self.eps, self.eps_mode, self.chunk_size, self.spp, self.memory_budget)
            if plan_key not in self._op_plans:  # refuses a plan over the memory budget before anything runs
                self._op_plans[plan_key] = self._ops_plan(x)
            plan, chunks = self._op_plans[plan_key]
            prog = self._ops
            first = self.check_samples and key not in self._dynamic_checked
            if first:  # before the clean forward, so its memory is free again when that runs
                with torch.no_grad():
                    # on the first samples only (4 or fewer): the copies stacked before and after
                    # them find coupling at any batch size, and memory stays that of a few samples
                    few = x[:4].clone()
                    try:
                        clean = prog.forward(few.clone(), keep_vjp=False)[0]
                    except ValueError as exc:
                        raise ValueError(f"the model depends on the batch size: it fails on {few.shape[0]} of the "
                                         f"batch's samples alone ({exc}); the probes stack copies of the batch, so "
                                         f"every op must treat samples independently") from exc
                    prog.check_samples(few, clean)
                    del clean
                    model = self.model if isinstance(self.model, nn.Module) else nn.Sequential(*self.model)
                    model_out = None
                    if self._dtype in numerics.LOW_PRECISION:  # compared in float32, where round-off cannot hide
                        wide = copy.deepcopy(model).float()  # a side effect (attention traced as its ops)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # the model's warnings were given once already
                            wide_prog = opengine.OpProgram(wide)
                        xw = x.float() if x.is_floating_point() else x
                        with torch.enable_grad():  # as below
                            wide_out = wide(xw).detach()
                        _same_forward(wide_out, wide_prog.forward(xw, keep_vjp=False)[0][wide_prog.traced.out])
                        del wide, wide_prog
                    else:
                        # the model's own forward, not a trace of it, in grad mode: the function
                        # autograd differentiates (eval encoders take another path under no_grad)
                        with torch.enable_grad():
                            model_out = model(x.clone()).detach()
            if plan_key not in self._op_cores:  # lowered once per input shape (None: the Python engine runs it)
                self._op_cores[plan_key] = cpp_executor.CppOps.build(self, prog, x, chunks) \
                    if self._executor_args[0] != "python" else (None, "executor='python'")
            cpp, self.executor_reason = self._op_cores[plan_key]
            self.executor = "python" if cpp is None else "cpp"
            env, local = prog.forward(x) if cpp is None else (cpp.forward(x), None)
            logits = env[prog.traced.out]
            _check_finite(logits, "the model's output in the clean forward")
            self.last_stats.forward_calls += 1
            if first:
                if model_out is not None:
                    _same_forward(model_out, logits)
                del model_out
                self._dynamic_checked.add(key)
            loss = self.loss.check_reproduces(logits, y)
            perturbed = [(f"the input of op {s.index} ({s.label})", env[a]) for s in prog.steps
                         if s.entry.kind != "affine" for a in s.inputs
                         if a is not prog.traced.x and isinstance(env[a], torch.Tensor) and env[a].is_floating_point()]
            perturbed.append(("the logits (loss head)", logits))
            dtype = self._probe_dtype or self._dtype
            for (what, a), amax in zip(perturbed, numerics.max_abs([a for _, a in perturbed])):
                numerics.check_step_at(self._step(a), amax, dtype, what, warned=self._step_warnings)
            with nvtx_range("hzo/head"), torch.no_grad():
                delta = self._loss_head(logits, y)
            if cpp is not None:
                out = cpp.targets(self, delta)
                if out["failure"] >= 0:  # the Python engine names the op and its input, writing nothing
                    grads = [(p, p.grad) for p in self.model.parameters()] if isinstance(self.model, nn.Module) \
                        else []
                    try:
                        env, local = prog.forward(x)
                        opengine.OpRun(self, prog, chunks).targets(env, local, delta)
                    finally:
                        for p, g in grads:
                            p.grad = g
                    raise ValueError(f"non-finite value (inf/nan) in a query of {cpp.labels[out['failure']]} "
                                     f"(the C++ engine); lower eps or check the model (overflow)")
                for k in ("probes", "fd_layer_evals", "splits"):
                    setattr(self.last_stats, k, getattr(self.last_stats, k) + out[k])
                # C++ runs each item of a tuple op as one step standing for the op and its getitem
                self.last_stats.splits += sum(sp.j in cpp.tuple_ops for sp in plan.splits)
                self.last_stats.forward_calls = out["python_calls"]  # as the stage-wise C++ executor counts
            else:
                opengine.OpRun(self, prog, chunks).targets(env, local, delta)
            folded = sum(sp.folded for sp in plan.splits)  # what the folds stand for: dense probes of their inputs
            self.last_stats.probes += folded
            self.last_stats.fd_layer_evals += 2 * folded
        self.last_stats.seconds = time.perf_counter() - t0
        return loss.detach()
