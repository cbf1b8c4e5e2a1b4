"""The hzo-ext command: bad input, and a run killed mid-epoch then resumed."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

SMALL = ["--width", "16", "--depth", "2", "--epochs", "3", "--batch-size", "64", "--cosine-every", "1000"]


def hzo_ext(*args, **kw):
    return subprocess.run([sys.executable, "-m", "hzo_ext", *args], capture_output=True, text=True, **kw)


@pytest.mark.parametrize("args,words", [
    (["train", "--epochs", "-1"], "--epochs must be >= 1"),
    (["train", "--estimator", "magic"], "unknown estimator 'magic'"),
    (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent"], "lacks data_batch_1"),
    (["train", "--eps", "0"], "--eps and --lr must be positive"),
    (["train", "--model", "vgg"], "unknown model 'vgg'"),
])
def test_bad_command_line_is_one_line_and_exit_2(args, words, tmp_path):
    result = hzo_ext(*args, "--out", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cnn_model_trains_on_digit_images(tmp_path):
    # the conv model gets [N, 1, 8, 8] images; HZO on it runs in benchmarks/train_digits_cnn.py (CI)
    result = hzo_ext("train", "--model", "cnn", "--estimator", "bp", "--epochs", "2", "--lr", "1e-2",
                     "--cosine-every", "1000", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    accs = [float(line.split("test_acc=")[1].split()[0]) for line in result.stdout.splitlines()
            if line.startswith("epoch") and "test_acc=" in line]
    assert len(accs) == 2 and accs[-1] > 0.5  # 10 classes: chance is 0.1


def test_info_runs():
    result = hzo_ext("info")
    assert result.returncode == 0 and "extension:" in result.stdout


def _final_state(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert hzo_ext("train", "--out", full, *SMALL).returncode == 0
    # Start the same run, SIGKILL it once epoch 1 is checkpointed (mid-epoch 2), then resume.
    proc = subprocess.Popen([sys.executable, "-m", "hzo_ext", "train", "--out", killed, *SMALL],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = os.path.join(killed, "checkpoint.pt")
    deadline = time.time() + 120
    while not os.path.exists(ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = _final_state(killed)
    assert state["epoch"] < 3, "the run finished before it could be killed; make it longer"
    resumed = hzo_ext("train", "--out", killed, "--resume", *SMALL)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {ckpt} after epoch {state['epoch']}" in resumed.stdout
    a, b = _final_state(full), _final_state(killed)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["test_acc"] for r in a["history"]] == [r["test_acc"] for r in b["history"]]
    for name in ("metrics.csv", "loss.png", "accuracy.png"):
        assert os.path.getsize(os.path.join(killed, name)) > 0


def test_bench_quick_counts_match_the_exact_recursion(tmp_path):
    import csv
    out = tmp_path / "depth.csv"
    result = hzo_ext("bench", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(out)))
    assert {r["method"] for r in rows} == {"hzo-bisect", "hzo-chain", "cge", "spsa", "backprop"}
    for r in rows:
        assert r["fd_layer_evals"] == r["predicted_fd_layer_evals"], r
    assert (tmp_path / "depth.png").stat().st_size > 0


def test_cosine_quick_float64_is_exact(tmp_path):
    import csv
    out = tmp_path / "cos.csv"
    result = hzo_ext("cosine", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 * 2 * 3 * 3
    assert min(float(r["min_layer_cosine"]) for r in rows if r["dtype"] == "float64") >= 0.9999
    assert (tmp_path / "cos.png").stat().st_size > 0
