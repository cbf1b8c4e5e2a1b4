"""The pure-PyTorch HZO of benchmarks/bench_executor.py (what the executor is timed against):
its gradients against float64 autograd and hzo_ext.HZO, its query count, the harness's FLOP
count, and a tiny end-to-end run of the harness."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import hzo_ext
from hzo_ext.models import deep_mlp

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_executor.py"
_spec = importlib.util.spec_from_file_location("bench_executor", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _data(batch, din, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, din, generator=g, dtype=dtype), torch.randint(0, bench.NUM_CLASSES, (batch,), generator=g)


def test_reference_matches_autograd():
    assert bench.check_reference() >= 0.99999


@pytest.mark.parametrize("depth", [1, 5, 13])
def test_reference_matches_hzo(depth):
    model = deep_mlp(depth, 6, residual=True, din=4, dout=bench.NUM_CLASSES, dtype=torch.float64)
    x, y = _data(3, 4)
    ref = hzo_ext.reference_grads(model, nn.CrossEntropyLoss(), x, y)
    est = bench.TorchHZO(model)
    loss = est.backward(x, y)
    mine = hzo_ext.grads_of(model)
    model.zero_grad(set_to_none=True)
    hzo = hzo_ext.HZO(model, nn.CrossEntropyLoss(), split="bisect")
    torch.testing.assert_close(loss, hzo.backward(x, y))
    theirs = hzo_ext.grads_of(model)
    assert min(hzo_ext.per_layer_cosine(model, mine, ref)) >= 0.99999
    for k in mine:  # the same finite differences: equal up to summation order
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-7, atol=1e-10)
    assert est.queries == hzo.last_stats.fd_layer_evals


def test_matmul_flop_count_matches_the_linears_run():
    # the formula (queries from the plan, clean forward, leaves) against the rows every Linear
    # actually sees during one estimate (leaves run no forward: they equal the clean forward)
    model = deep_mlp(7, 8, residual=True, din=8, dout=bench.NUM_CLASSES, dtype=torch.float64)
    x, y = _data(4, 8)
    est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), split="bisect", chunk_size=3)
    seen = []
    hooks = [mod.register_forward_hook(lambda mod, inp, out: seen.append(2 * inp[0].shape[0] * mod.in_features
                                                                          * mod.out_features))
             for mod in model.modules() if isinstance(mod, nn.Linear)]
    est.backward(x, y)  # warm-up: the one-time checks run extra forwards (hooks are a change: checked anew)
    seen.clear()
    est.backward(x, y)
    for h in hooks:
        h.remove()
    clean = 4 * sum(bench.linear_flops_per_row(s) for s in model)
    assert sum(seen) + clean == bench.estimate_matmul_flops(model, est.plan(x), 4)


def test_harness_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "SHAPES", [(2, 4, 2), (3, 8, 2)])
    monkeypatch.setattr(bench, "mm_seconds", lambda rows, width, device, min_run_time: 1e-3)
    out = tmp_path / "executor.csv"
    bench.main(["--repeats", "1", "--out", str(out)])
    text = out.read_text()
    assert "reference" in text and "torch.mm" in text and out.with_suffix(".png").exists()
