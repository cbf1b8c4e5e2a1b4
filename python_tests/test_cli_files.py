"""hzo-ext train and its files: the resume rule, one run per folder, and damaged or unusable
inputs (checkpoint, CIFAR batches, --out, --device) refused in one line, exit 2, the last good
checkpoint untouched."""
import csv
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hzo_ext.apps.cli import main

TINY = ["--estimator", "bp", "--width", "16", "--depth", "2", "--batch-size", "256", "--cosine-every", "1000"]


def cli(capsys, *args):
    code = main(["train", *args])
    return code, *capsys.readouterr()


def refused(capsys, *args, words=()):
    code, _, err = cli(capsys, *args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("hzo-ext train: error: "), err
    for w in words:
        assert w in err, err
    return err


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    """A finished 1-epoch run (Adam, lr 3e-3): its folder."""
    out = str(tmp_path_factory.mktemp("run1") / "run")
    assert main(["train", "--out", out, "--epochs", "1", *TINY]) == 0
    return out


@pytest.fixture
def run(run1, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(run1, out)
    return out, os.path.join(out, "checkpoint.pt")


def test_resume_applies_and_records_a_changed_lr(run, tmp_path, capsys):
    same, ckpt = run
    changed = str(tmp_path / "changed")
    shutil.copytree(same, changed)
    assert cli(capsys, "--out", same, "--resume", "--epochs", "2", *TINY)[0] == 0
    code, out, err = cli(capsys, "--out", changed, "--resume", "--epochs", "2", "--lr", "0.05", *TINY)
    assert code == 0, err
    a, b = torch.load(ckpt, weights_only=True), torch.load(os.path.join(changed, "checkpoint.pt"), weights_only=True)
    assert b["config"]["lr"] == 0.05 and [g["lr"] for g in b["optimizer"]["param_groups"]] == [0.05]
    assert [r["lr"] for r in b["history"]] == [3e-3, 0.05]
    with open(os.path.join(changed, "metrics.csv")) as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == [3e-3, 0.05]
    # the same epoch-1 weights and data order: only the lr differs, so epoch 2 must end elsewhere
    assert a["config"]["lr"] == 3e-3 and [g["lr"] for g in a["optimizer"]["param_groups"]] == [3e-3]
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("change,words", [
    (["--optimizer", "sgd"], ["--optimizer adam in the checkpoint, sgd now"]),
    (["--width", "8", "--seed", "3"], ["--width 16 in the checkpoint, 8 now", "--seed 0 in the checkpoint, 3 now"]),
    (["--model", "cnn", "--width", "16"], ["--model resmlp in the checkpoint, cnn now"]),
    (["--estimator", "spsa"], ["--estimator bp in the checkpoint, spsa now"]),
])
def test_resume_with_another_meaning_is_refused(run, capsys, change, words):
    out, ckpt = run
    before = digest(ckpt)
    args = TINY + change  # argparse: the last value of a repeated flag wins
    refused(capsys, "--out", out, "--resume", "--epochs", "2", *args, words=words + [ckpt, "only --epochs, --lr"])
    assert digest(ckpt) == before


def test_resume_past_the_requested_epochs_is_refused(run, capsys):
    out, ckpt = run
    state = torch.load(ckpt, weights_only=True)
    state["epoch"] = 3
    torch.save(state, ckpt)
    refused(capsys, "--out", out, "--resume", "--epochs", "2", *TINY, words=["already at epoch 3", "--epochs 2"])


def test_fresh_run_over_a_checkpoint_is_refused(run, capsys):
    out, ckpt = run
    before = digest(ckpt)
    refused(capsys, "--out", out, "--epochs", "1", *TINY, words=[ckpt, "pass --resume", "another --out"])
    assert digest(ckpt) == before


def _damage(ckpt, how):
    data = open(ckpt, "rb").read()
    if how == "truncated":
        open(ckpt, "wb").write(data[: len(data) // 2])
    elif how == "empty":
        open(ckpt, "wb").close()
    elif how == "text":
        open(ckpt, "w").write("not a checkpoint\n")
    elif how == "tensor":
        torch.save(torch.zeros(3), ckpt)
    elif how == "pickle_of_code":  # weights_only refuses it: nothing in it runs
        open(ckpt, "wb").write(pickle.dumps(os.getcwd, protocol=2))
    elif how == "other_width":  # the config says width 16 but the weights are of width 8
        from hzo_ext.models import residual_mlp
        state = torch.load(ckpt, weights_only=True)
        state["model"] = residual_mlp(64, 8, 2, 10).state_dict()
        torch.save(state, ckpt)


@pytest.mark.parametrize("how,words", [
    ("truncated", ["is unreadable"]), ("empty", ["is unreadable"]), ("text", ["is unreadable"]),
    ("tensor", ["is not an hzo-ext train checkpoint"]), ("pickle_of_code", ["is unreadable"]),
    ("other_width", ["does not fit --model resmlp --width 16", "size mismatch"]),
])
def test_damaged_or_foreign_checkpoint_is_refused_and_kept(run, capsys, how, words):
    out, ckpt = run
    _damage(ckpt, how)
    before = digest(ckpt)
    refused(capsys, "--out", out, "--resume", "--epochs", "2", *TINY, words=words + [ckpt])
    assert digest(ckpt) == before and not os.path.exists(ckpt + ".tmp")


@pytest.fixture
def cifar(tmp_path):
    """A fake CIFAR-10 folder: 6 batches of 2 random images each."""
    folder = tmp_path / "cifar"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 7]}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def test_fake_cifar_batches_load(cifar):
    from hzo_ext.apps.data import load_cifar10
    data = load_cifar10(str(cifar))
    assert data.x_train.shape == (10, 3, 32, 32) and data.x_test.shape == (2, 3, 32, 32)
    assert data.y_train.tolist() == [1, 7] * 5


@pytest.mark.parametrize("content,words", [
    ("truncated", ["is not a python-pickle batch"]),
    ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [1, 2]}, ["expected uint8 data [N, 3072]", "[2, 1024]"]),
    ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, 2]}, ["labels int64 [2]"]),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, ["N labels in 0..9"]),
    ({b"data": np.zeros((2, 3072), np.float64), b"labels": [1, 2]}, ["got data float64"]),
    ([1, 2, 3], ["is not a python-pickle batch", "TypeError"]),
])
def test_corrupt_cifar_batch_is_named(cifar, tmp_path, capsys, content, words):
    bad = cifar / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100] if content == "truncated" else pickle.dumps(content))
    refused(capsys, "--out", str(tmp_path / "out"), "--dataset", "cifar10", "--data-dir", str(cifar), *TINY,
            words=words + [str(bad)])


def test_unusable_out_and_device_are_refused(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused(capsys, "--out", str(a_file), *TINY, words=[f"--out {a_file} is a file"])
    refused(capsys, "--out", str(a_file / "run"), *TINY, words=[f"--out {a_file / 'run'} is not writable"])
    refused(capsys, "--out", str(tmp_path / "d"), "--device", "foo", words=["--device 'foo' is not a device"])
    refused(capsys, "--out", str(tmp_path / "d"), "--device", "meta", words=["--device meta", "cpu or cuda"])
    if not torch.cuda.is_available():
        refused(capsys, "--out", str(tmp_path / "d"), "--device", "cuda", words=["--device cuda: no CUDA device"])
    assert not (tmp_path / "d").exists()  # refused before anything was written


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    refused(capsys, "--out", str(ro / "run"), *TINY, words=[f"--out {ro / 'run'} is not writable"])


def test_second_run_on_one_folder_is_refused_naming_the_holder(tmp_path, capsys):
    """Two processes: a run in a child holds the folder; this process's run is refused."""
    from hzo_ext.apps.train import TrainConfig, run_folder
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-m", "hzo_ext", "train", "--out", out, *TINY, "--epochs", "1000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock, deadline = os.path.join(out, ".lock"), time.time() + 120
        while time.time() < deadline and holder.poll() is None and not (
                os.path.exists(lock) and f"pid {holder.pid} " in open(lock).read()):
            time.sleep(0.05)
        assert holder.poll() is None, "the holder ended early"
        refused(capsys, "--out", out, *TINY, "--epochs", "1",
                words=[f"--out {out} is in use by another run (pid {holder.pid} on "])
        assert holder.poll() is None  # the refused run did not disturb the holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # a killed holder blocks nobody: the kernel dropped its lock
    with run_folder(TrainConfig(out=out, resume=True)):
        assert open(lock).read().startswith(f"pid {os.getpid()} on ")
