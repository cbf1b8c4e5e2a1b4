"""Data-parallel and query-parallel estimates (hzo_ext.distributed) with 2 gloo processes on
127.0.0.1, against the single-process estimate in float64; mismatched ranks must raise on
every rank (never hang); `hzo-ext train` under torchrun against a single-process run."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import hzo_ext
import _dist_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario of _dist_worker on 2 ranks; a list of their results (one dict per rank)."""
    out, port = tmp_path_factory.mktemp("dist"), _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_dist_worker.py"), str(r), str(WORLD), str(port),
                               str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:  # a hang is a failure, not a stuck CI job
            for q in procs:
                q.kill()
            pytest.fail("the distributed workers did not finish within 240 s (a hang)")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    results[0]["timeout"] = (out / "timeout.txt").read_text()
    return results


def _assert_round_off(got: dict, ref: dict, rtol: float) -> None:
    for name, g in ref.items():
        err = (got[name] - g).abs().max().item()
        assert err <= rtol * g.abs().max().item(), f"{name}: max error {err:.3g}, max |grad| {g.abs().max():.3g}"


DP = [n for n in worker.SCENARIOS if n.startswith("dp_")]
QP = [n for n in worker.SCENARIOS if n.startswith("qp_")]


@pytest.mark.parametrize("name", DP)
def test_data_parallel_equals_one_process_on_the_whole_batch(ranks, name):
    ref, loss, _ = worker.single_process(name)
    for r in range(WORLD):
        # finite differences at eps=1e-3 amplify the matmul round-off of different batch sizes ~1e3x
        _assert_round_off(ranks[r][name]["grads"], ref, 1e-10)
        assert abs(float(ranks[r][name]["loss"]) - float(loss)) <= 1e-13 * abs(float(loss))
    for n, g in ranks[0][name]["grads"].items():  # one all_reduce result: the same step on every rank
        assert torch.equal(g, ranks[1][name]["grads"][n])


@pytest.mark.parametrize("name", QP)
def test_query_parallel_equals_one_process(ranks, name):
    ref, loss, stats = worker.single_process(name)
    for r in range(WORLD):
        _assert_round_off(ranks[r][name]["grads"], ref, 1e-12)
        assert float(ranks[r][name]["loss"]) == float(loss)
    # last_stats says what each rank did: the ranks' probes and queries add up to the whole estimate
    mine = [ranks[r][name]["stats"] for r in range(WORLD)]
    assert sum(s.probes for s in mine) == stats.probes
    assert sum(s.fd_layer_evals for s in mine) == stats.fd_layer_evals
    assert min(s.probes for s in mine) >= 0.4 * stats.probes  # about half each
    assert sum(s.loss_evals for s in mine) == stats.loss_evals


def test_query_parallel_cnn_has_an_spp_split():
    make_model, make_est, *_ = worker.SCENARIOS["qp_hzo_spp_cnn"]
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = make_est(model, nn.CrossEntropyLoss(), None).plan(worker.data(image=True)[0])
    assert any(not s.dense for s in plan.splits) and any(s.dense for s in plan.splits)


def test_data_parallel_accumulates_like_autograd(ranks):
    model = worker.deep_mlp(3, 8, "gelu", residual=True)
    x, y = worker.data()
    hzo_ext.HZO(model, nn.CrossEntropyLoss(), split="bisect").backward(x, y)
    once = {n: p.grad for n, p in model.named_parameters()}
    _assert_round_off(ranks[0]["accumulate"]["grads"], {n: 2 * g for n, g in once.items()}, 1e-10)


@pytest.mark.parametrize("kind,words", [
    ("qp_batch_size", ["ValueError", "batch size", "rank 0: 10, rank 1: 8"]),
    ("qp_batch_contents", ["ValueError", "batch's contents"]),
    ("dp_model_shapes", ["ValueError", "the model (parameter names, shapes", "(8, 6)", "(9, 6)"]),
    ("dp_model_depth", ["ValueError", "the model (parameter names"]),
    ("qp_model_weights", ["ValueError", "weights (checksum)", "broadcast_parameters"]),
    ("dp_settings", ["ValueError", "eps: rank 0: 0.001, rank 1: 0.002"]),
    ("dp_bad_input_one_rank", ["TypeError", "rank 1: x is torch.float32"]),
])
def test_mismatched_ranks_raise_on_every_rank(ranks, kind, words):
    for r in range(WORLD):
        err = ranks[r][kind]["error"]
        assert err is not None and all(w in err for w in words), err


def test_broadcast_parameters(ranks):
    ref = worker.deep_mlp(3, 8, "gelu", seed=0)
    for r in range(WORLD):
        for n, p in ref.named_parameters():
            assert torch.equal(ranks[r]["broadcast"]["weights"][n], p.detach())


def test_failure_inside_one_ranks_estimate_reaches_the_others(ranks):
    assert ranks[1]["dp_failure_inside_estimate"]["error"].startswith("ValueError: eps=0.001 is below the resolution")
    assert "1 other rank(s) failed" in ranks[0]["dp_failure_inside_estimate"]["error"]


def test_a_missing_rank_times_out_with_a_clear_error(ranks):
    assert ranks[0]["timeout"].startswith("TimeoutError: hzo_ext.distributed: waited 2 s in the cross-rank check")


def test_arguments_without_a_group():
    model = worker.deep_mlp(2, 4, "gelu")
    with pytest.raises(ValueError, match="query_parallel=True needs a process_group"):
        hzo_ext.HZO(model, nn.CrossEntropyLoss(), query_parallel=True, split="bisect")
    with pytest.raises(ValueError, match="not initialised"):
        hzo_ext.Backprop(model, nn.CrossEntropyLoss(), process_group=object())
    with pytest.raises(TypeError, match="query_parallel must be a bool"):
        hzo_ext.HZO(model, nn.CrossEntropyLoss(), query_parallel=1, split="bisect")


@pytest.mark.parametrize("options,words", [
    (dict(distributed="dp"), "needs torchrun"),
    (dict(distributed="qp", estimator="bp"), "needs --estimator hzo or cge"),
    (dict(distributed="ddp"), "unknown --distributed 'ddp'"),
])
def test_train_distributed_options(monkeypatch, options, words):
    from hzo_ext.apps.train import TrainConfig, validate
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=words):
        validate(TrainConfig(out="unused", **options))


def test_torchrun_train_dp_then_resume_qp_matches_one_process(tmp_path):
    """2 processes: epoch 1 data-parallel, killed-run style resume for epoch 2 query-parallel;
    the same weights as one process for 2 epochs (float32 training: finite-difference round-off)."""
    from hzo_ext.apps.train import TrainConfig, train
    small = ["--width", "12", "--depth", "2", "--batch-size", "100", "--cosine-every", "10"]
    out = str(tmp_path / "dist")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "hzo_ext", "train",
                "--out", out, *small]
    first = subprocess.run(torchrun + ["--epochs", "1", "--distributed", "dp"], env=_env(), capture_output=True,
                           text=True, timeout=180)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("epoch 1/1 train_loss=") == 1  # rank 0 alone prints
    torchrun[torchrun.index("--master_port") + 1] = str(_free_port())
    second = subprocess.run(torchrun + ["--epochs", "2", "--distributed", "qp", "--resume"], env=_env(),
                            capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resumed from" in second.stdout and "epoch 2/2 train_loss=" in second.stdout

    ref = train(TrainConfig(out=str(tmp_path / "one"), width=12, depth=2, batch_size=100, cosine_every=10,
                            epochs=2, distributed="none"))
    got = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    one = torch.load(str(tmp_path / "one" / "checkpoint.pt"), weights_only=False)
    for n, w in one["model"].items():
        assert (got["model"][n] - w).abs().max().item() < 1e-3, n
    assert got["history"][-1]["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
    assert [c[0] for c in got["cosines"]] == [c[0] for c in one["cosines"]]
    assert min(min(c[1:]) for c in got["cosines"]) > 0.999
