"""The planner: the C++ planner (hzo_ext._C.build_plan) against the Python one, callables and
their exceptions through the binding, hzo_ext.plan, and the memory prediction against the
measured peak of the query tensors."""
from __future__ import annotations

import inspect
import math
import random

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.profiler import ProfilerActivity, profile, record_function

import hzo_ext
import hzo_ext.estimator as estimator
from hzo_ext import _ext
from _models import batch, mlp

CE = nn.CrossEntropyLoss
needs_cpp = pytest.mark.skipif(getattr(_ext._C, "build_plan", None) is None,
                               reason="the C++ planner is not built (or HZO_EXT_DISABLE=1)")


def _python_plan(monkeypatch, *args, **kw):
    with monkeypatch.context() as mp:
        mp.setattr(_ext, "_C", None)
        return hzo_ext.build_plan(*args, **kw)


def _outcome(fn):
    """(exception type, message) raised by fn(), or ('ok', result)."""
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001  (comparing whatever each planner raises)
        return type(exc), str(exc)


def _both(monkeypatch, *args, **kw):
    cpp = _outcome(lambda: hzo_ext.build_plan(*args, **kw))
    with monkeypatch.context() as mp:
        mp.setattr(_ext, "_C", None)
        py = _outcome(lambda: hzo_ext.build_plan(*args, **kw))
    return cpp, py


# ---- the C++ planner gives the Python planner's Plan ------------------------------------------

def _third(i, j):
    return i + max(1, (j - i) // 3)


def _left_leaning(i, j):
    return i + 1


def _random_policy(seed):
    def split(i, j):  # deterministic in (i, j)
        return i + 1 + random.Random(hash((seed, i, j))).randrange(j - i - 1)
    return split


@needs_cpp
def test_cpp_plan_identical_to_python(monkeypatch):
    rng = random.Random(0)
    assert hzo_ext.planner_backend() == "cpp"
    cases = 0
    for trial in range(150):
        L = rng.choice([1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 33, 64, 100])
        shapes = [tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 3))) for _ in range(L + 1)]
        policy = rng.choice(["bisect", "chain", _third, _left_leaning, _random_policy(trial)])
        kw = dict(chunk_size=rng.choice([None, 1, 2, 3, 7, 1000]), itemsize=rng.choice([2, 4, 8]))
        if rng.random() < 0.3:  # an SPP-like probe count, sometimes dense
            kw["probes"] = lambda m, j, s=shapes: math.prod(s[m]) if (m + j) % 3 == 0 else 1 + (m * j) % 5
        b = rng.randint(1, 9)
        cpp = hzo_ext.build_plan(shapes, b, policy, **kw)
        py = _python_plan(monkeypatch, shapes, b, policy, **kw)
        assert cpp == py, (shapes, b, policy, kw)
        assert str(cpp) == str(py)
        cases += 1
    assert cases == 150


@needs_cpp
@pytest.mark.parametrize("L", [1, 2, 63, 64, 65, 1000, 4096])
@pytest.mark.parametrize("policy", ["bisect", "chain"])
def test_cpp_plan_identical_deep(monkeypatch, L, policy):
    shapes = [(3 + (l * 5) % 7,) for l in range(L + 1)]
    cpp = hzo_ext.build_plan(shapes, 8, policy, chunk_size=5)
    assert cpp == _python_plan(monkeypatch, shapes, 8, policy, chunk_size=5)
    assert len(cpp.levels) == (math.ceil(math.log2(L)) if policy == "bisect" else L - 1)


@needs_cpp
def test_estimator_plans_identical_with_spp(monkeypatch):
    # HZO's own probes callback (SPP colorings) through the binding
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GELU(), nn.Conv2d(3, 3, 3, padding=1), nn.GELU(),
                          nn.Flatten(), nn.Linear(3 * 12 * 12, 4)).double()
    x = torch.zeros(2, 2, 12, 12, dtype=torch.float64)
    for split in ("bisect", "chain"):
        est = hzo_ext.HZO(model, CE(), split=split, chunk_size=7)
        cpp = est.plan(x)
        with monkeypatch.context() as mp:
            mp.setattr(_ext, "_C", None)
            py = est.plan(x)
        assert cpp == py
        assert any(not s.dense for s in cpp.splits) and any(s.dense for s in cpp.splits)


# ---- callables and their errors through the binding --------------------------------------------

class _PolicyError(Exception):
    pass


def _raising(i, j):
    if j - i < 4:
        raise _PolicyError(f"no split for ({i}, {j}]")
    return j - 2


@needs_cpp
@pytest.mark.parametrize("policy, error", [
    (_raising, _PolicyError),
    (lambda i, j: {}[i], KeyError),
    (lambda i, j: i, ValueError),             # m = i
    (lambda i, j: j, ValueError),             # m = j
    (lambda i, j: (j if j < 8 else 4), ValueError),  # fine at the top, wrong below
    (lambda i, j: float(j - 1), ValueError),  # not an int
    (lambda i, j: True, ValueError),          # bool is not a split point
    (lambda i, j: 2 ** 70, ValueError),       # beyond int64
    ("middle", ValueError),
    (3, ValueError),
])
def test_policy_errors_same_in_both_planners(monkeypatch, policy, error):
    cpp, py = _both(monkeypatch, [(4,)] * 9, 2, policy)
    assert cpp[0] is error and cpp == py


@needs_cpp
def test_policy_error_message_names_range(monkeypatch):
    cpp, _ = _both(monkeypatch, [(4,)] * 9, 2, lambda i, j: j if j < 8 else 4)
    assert cpp == (ValueError, "split policy returned m=4 for the range (0, 4]; it must be an int with 0 < m < 4")


@needs_cpp
@pytest.mark.parametrize("probes, error", [
    (lambda m, j: {}[m], KeyError),
    (lambda m, j: 0, ValueError),
    (lambda m, j: -3, ValueError),
    (lambda m, j: 2.0, ValueError),
    (lambda m, j: None, ValueError),
    ("dense", TypeError),
])
def test_probes_errors_same_in_both_planners(monkeypatch, probes, error):
    cpp, py = _both(monkeypatch, [(4,)] * 9, 2, "bisect", probes=probes)
    assert cpp[0] is error and cpp == py


@pytest.mark.parametrize("args, kw", [
    (([], 2), {}),
    (([(4,), (0,), (4,)], 2), {}),
    (([(4,), (4,), (4,)], 0), {}),
    (([(4,), (4,), (4,)], True), {}),
    (([(4,), (4,), (4,)], 2), {"chunk_size": 0}),
    (([(4,), (4,), (4,)], 2), {"chunk_size": 2.5}),
    (([(4,), (4,), (4,)], 2), {"itemsize": 0}),
    (([(4,), (2.5,), (4,)], 2), {}),
])
def test_bad_arguments_refused_the_same_way(monkeypatch, args, kw):
    cpp, py = _both(monkeypatch, *args, **kw)
    assert cpp[0] in (ValueError, TypeError) and cpp == py


def test_numpy_style_ints_accepted(monkeypatch):
    class Index:  # anything with __index__, like numpy integers
        def __init__(self, v):
            self.v = v

        def __index__(self):
            return self.v
    cpp, py = _both(monkeypatch, [(Index(4),), (4,), (Index(3),), (4,)], 2)
    assert cpp[0] == "ok" and cpp == py and cpp[1].shapes == ((4,), (4,), (3,), (4,))


def test_plan_of_model_and_backend():
    model = mlp(6, 16, "gelu", residual=True)
    x, _ = batch(4)
    p = hzo_ext.plan(model, x, split="chain", chunk_size=4)
    assert p == hzo_ext.HZO(model, CE(), split="chain", chunk_size=4).plan(x)
    assert p.fd_layer_evals == 7 * 2 * 16 and p.policy == "chain"  # 8 stages: 7 splits of 2 K queries
    assert all(prm.grad is None for prm in model.parameters())
    # a loaded extension always plans in C++ (a stale build without _C.build_plan would fall back)
    assert hzo_ext.planner_backend() == ("cpp" if hzo_ext.has_extension() else "python")


# ---- memory: the prediction bounds the measured peak -------------------------------------------

def _python_executor(model, **kw):
    """HZO running the Python executor (the one these measurements wrap)."""
    if "executor" in inspect.signature(hzo_ext.HZO).parameters:
        kw["executor"] = "python"
    return hzo_ext.HZO(model, CE(), **kw)


class _QueryTensors:
    """Live bytes of the query tensors of the current chunk, sampled at every stage boundary.

    Tracks the storages of the chunk's perturbed copies (the input of the right sub-network)
    and of every stage output on the query path, with weak references (no effect on their
    lifetime): at each stage's exit, live = the tracked storages not yet freed. Stage-internal
    temporaries are not stage outputs, so they are not tracked (the model excludes them)."""

    def __init__(self):
        self.tracked: dict[int, tuple[StorageWeakRef, int]] = {}
        self.active = False
        self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        old = self.tracked.get(st.data_ptr())
        if old is None or old[0].expired():  # new, or a freed storage's address reused
            self.tracked[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())

    def sample(self) -> None:
        live = sum(n for ref, n in self.tracked.values() if not ref.expired())
        self.peak = max(self.peak, live)

    def hook(self, module, inputs, output) -> None:
        if self.active:
            self.add(output)
            self.sample()


def _measure_split_peaks(est, x, y) -> dict:
    """{(m, j): the largest live bytes of one chunk's query tensors} over one backward."""
    meter, peaks, current = _QueryTensors(), {}, {}
    orig_split, orig_probe = est._probe_split, estimator.probe_targets

    def probe_split(qstages, s, *args):
        current["split"] = (s.m, s.j)
        try:
            return orig_split(qstages, s, *args)
        finally:
            current.pop("split")

    def probe_targets(run_right, a, *args, **kw):
        if "split" not in current:  # the loss head
            return orig_probe(run_right, a, *args, **kw)

        def one_chunk(z, n):
            meter.tracked, meter.peak, meter.active = {}, 0, True
            meter.add(z)  # the perturbed copies
            meter.sample()
            try:
                return run_right(z, n)
            finally:
                meter.active = False
                key = current["split"]
                peaks[key] = max(peaks.get(key, 0), meter.peak)
        return orig_probe(one_chunk, a, *args, **kw)

    hooks = [s.register_forward_hook(meter.hook) for s in est.stages]
    est._probe_split = probe_split
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(estimator, "probe_targets", probe_targets)
            est.backward(x, y)
    finally:
        del est._probe_split
        for h in hooks:
            h.remove()
    return peaks


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
@pytest.mark.parametrize("split", ["bisect", "chain", _third])
def test_peak_bytes_bounds_measured_query_tensors(split, chunk_size):
    # non-uniform widths, residual and plain stages
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), hzo_ext.ResidualBlock(nn.Sequential(nn.Linear(12, 12), nn.GELU())),
                          nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 9), nn.Tanh(), nn.Linear(9, 5)).double()
    x, y = batch(3)
    est = _python_executor(model, split=split, chunk_size=chunk_size)
    plan = est.plan(x)
    peaks = _measure_split_peaks(est, x, y)
    assert set(peaks) == {(s.m, s.j) for s in plan.splits}
    for s in plan.splits:
        c = s.probes if chunk_size is None else min(s.probes, chunk_size)
        n = [math.prod(shape) for shape in plan.shapes]
        # What this executor keeps: the copies, then at the first right stage its output (its
        # input is the copies), at a later stage its input and output.
        held = max([n[s.m + 1]] + [n[l - 1] + n[l] for l in range(s.m + 2, s.j + 1)])
        assert peaks[(s.m, s.j)] == 8 * 2 * c * 3 * (n[s.m] + held) <= s.peak_bytes, s


def _query_window_allocations(est, x, y, device: str) -> dict:
    """{(m, j): the peak of the allocator's bytes in use above its level at the start of the
    split, from entering the split to the end of its right sub-network's run (before the
    contraction)}: the CPU profiler's allocation events, or torch.cuda.max_memory_allocated."""
    peaks, orig_split, orig_probe = {}, est._probe_split, estimator.probe_targets
    state = {}

    def probe_split(qstages, s, *args):
        state["split"], state["base"] = (s.m, s.j), None
        if device == "cuda":
            torch.cuda.synchronize()
            state["base"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        try:
            with record_function(f"hzo_test_split:{s.m}:{s.j}"):
                return orig_split(qstages, s, *args)
        finally:
            state.pop("split")

    def probe_targets(run_right, a, *args, **kw):
        if "split" not in state:
            return orig_probe(run_right, a, *args, **kw)

        def run(z, n):
            with record_function("hzo_test_query"):
                out = run_right(z, n)
            if device == "cuda":
                torch.cuda.synchronize()
                peaks[state["split"]] = torch.cuda.max_memory_allocated() - state["base"]
            return out
        return orig_probe(run, a, *args, **kw)

    est.backward(x, y)  # warm-up: one-time checks and caches outside the measured run
    est._probe_split = probe_split
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(estimator, "probe_targets", probe_targets)
            if device == "cuda":
                est.backward(x, y)
                return peaks
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                est.backward(x, y)
    finally:
        del est._probe_split
    events = list(prof.profiler.kineto_results.events())
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    queries = [e.end_ns() for e in events if e.name() == "hzo_test_query"]
    for e in events:
        if e.name().startswith("hzo_test_split:"):
            _, m, j = e.name().split(":")
            t0, t1 = e.start_ns(), max(t for t in queries if e.start_ns() <= t <= e.end_ns())
            live = peak = 0
            for t, n in allocs:
                if t0 <= t <= t1:
                    live += n
                    peak = max(peak, live)
            peaks[(int(m), int(j))] = peak
    return peaks


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])
@pytest.mark.parametrize("split", ["bisect", "chain"])
def test_peak_bytes_bounds_allocator_peak(device, split):
    # Stages of one op each (no stage-internal temporaries) and one chunk per split: everything
    # the allocator hands out between entering a split and the end of its queries is the query
    # tensors plus the probe index tensors (colors [|a_m|], probe ids [K], int64), which the
    # model leaves out; on CUDA each allocation is rounded up to the caching allocator's
    # 512-byte blocks.
    model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 16),
                          nn.Tanh(), nn.Linear(16, 5)).double().to(device)
    x, y = batch(4, device=device)
    est = _python_executor(model, split=split)
    plan = est.plan(x)
    peaks = _query_window_allocations(est, x, y, device)
    assert set(peaks) == {(s.m, s.j) for s in plan.splits}
    for s in plan.splits:
        index_bytes = 8 * (math.prod(plan.shapes[s.m]) + s.probes)
        slack = index_bytes + (6 * 512 if device == "cuda" else 0)
        copies = 8 * 2 * s.probes * 4 * math.prod(plan.shapes[s.m])
        assert copies <= peaks[(s.m, s.j)] <= s.peak_bytes + slack, (s, peaks[(s.m, s.j)])
