"""``hzo-ext train``: train a model with HZO (or a baseline) and watch the estimate's quality.

Per epoch: loss and test accuracy (a line with ``test_acc=<value>``); every ``cosine_every``
steps: the per-layer cosine of the estimate against backprop on a held batch. Writes
``metrics.csv``, ``cosine.csv``, PNG plots, and an atomic checkpoint after every epoch;
``resume=True`` continues a killed run to the same final weights as an uninterrupted one
(data order and SPSA directions are functions of the seed and the epoch/step counters).

The run folder ``out`` belongs to one run at a time: the run holds an exclusive lock on
``out/.lock`` (flock, dropped by the kernel when the process ends, however it ends) and a
second run on it is refused naming the holder; a fresh run (no ``resume``) is refused where
``out`` already holds a checkpoint; what a resume may change is in ``train``'s docstring.
Bad input (an unreadable or foreign checkpoint, a corrupt CIFAR batch, an unusable ``out`` or
``device``) raises ValueError (FileNotFoundError for a missing file) naming it before anything
is written: the last good checkpoint is only ever replaced, atomically, by the next epoch's.

Under torchrun (docs/distributed.md), ``distributed='dp'`` gives each rank its block of every
batch, ``'qp'`` shards the probes of every batch's estimate; both keep the single-process
batches and sampling order, so the run matches a single-process one to round-off. Rank 0
alone prints, plots and writes checkpoints; a resume loads on rank 0 and broadcasts.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import fcntl
import os
import socket
import time
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from tqdm import tqdm

from .. import distributed as hzo_dist
from ..baselines import CGE, SPSA, Backprop
from .data import load_cifar10, load_digits
from ..estimator import HZO
from ..metrics import grads_of, per_layer_cosine
from ..models import digits_cnn, residual_mlp, resnet20_cifar
from .results import write_csv

ESTIMATORS = ("hzo", "cge", "spsa", "bp")
MODELS = ("resmlp", "cnn", "resnet20")  # residual MLP; models.digits_cnn; models.resnet20_cifar
DEFAULT_WIDTH = {"resmlp": 64, "cnn": 8, "resnet20": 16}
DATASETS = ("digits", "cifar10")
DISTRIBUTED = ("auto", "none", "dp", "qp")  # auto: dp under torchrun (WORLD_SIZE set), else none
# What --resume may change; every other option must equal the checkpoint's (they fix the run's weights).
RESUMABLE = ("epochs", "lr", "device", "data_dir", "cosine_every", "distributed")
CHECKPOINT_KEYS = ("model", "optimizer", "history", "cosines", "epoch", "config", "spsa_calls")


@dataclass
class TrainConfig:
    out: str
    estimator: str = "hzo"
    split: str = "auto"
    eps: float = 1e-3
    model: str = "resmlp"
    dataset: str = "digits"
    data_dir: str | None = None
    device: str = "cpu"
    epochs: int = 15
    batch_size: int = 32
    lr: float = 3e-3
    optimizer: str = "adam"
    seed: int = 0
    width: int | None = None  # None: the model's default (DEFAULT_WIDTH)
    depth: int = 4
    cosine_every: int = 50
    resume: bool = False
    distributed: str = "auto"


def validate(cfg: TrainConfig) -> None:
    """Raises ValueError naming the bad option."""
    if cfg.estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {cfg.estimator!r} (choose from {', '.join(ESTIMATORS)})")
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r} (choose from {', '.join(MODELS)})")
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r} (choose from {', '.join(DATASETS)})")
    if cfg.split not in ("auto", "bisect", "chain"):
        raise ValueError(f"unknown split {cfg.split!r} (choose from auto, bisect, chain)")
    if cfg.optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} (choose from adam, sgd)")
    if cfg.width is None:
        cfg.width = DEFAULT_WIDTH[cfg.model]
    for name in ("epochs", "batch_size", "width", "depth", "cosine_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not (cfg.eps > 0 and cfg.lr > 0) or cfg.eps != cfg.eps or cfg.lr != cfg.lr:
        raise ValueError(f"--eps and --lr must be positive, got eps={cfg.eps}, lr={cfg.lr}")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {cfg.device!r} is not a device (e.g. cpu, cuda, cuda:1)") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {cfg.device}: hzo-ext train runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {cfg.device}: only {torch.cuda.device_count()} CUDA device(s)")
    if cfg.dataset == "cifar10" and not cfg.data_dir:
        raise ValueError("--dataset cifar10 needs --data-dir FOLDER holding data_batch_1..5 and test_batch")
    if cfg.distributed not in DISTRIBUTED:
        raise ValueError(f"unknown --distributed {cfg.distributed!r} (choose from {', '.join(DISTRIBUTED)})")
    if cfg.distributed == "qp" and cfg.estimator not in ("hzo", "cge"):
        raise ValueError(f"--distributed qp shards probes: it needs --estimator hzo or cge, not {cfg.estimator}")
    if cfg.distributed in ("dp", "qp") and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--distributed {cfg.distributed} needs torchrun (WORLD_SIZE is not set), e.g. "
                         f"torchrun --nproc_per_node 2 -m hzo_ext train --distributed {cfg.distributed}")


def distributed_mode(cfg: TrainConfig) -> str:
    """'none', 'dp' or 'qp' ('auto': dp under torchrun with more than one process)."""
    if cfg.distributed != "auto":
        return cfg.distributed
    return "dp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"


def load_dataset(cfg: TrainConfig):
    if cfg.dataset == "digits":
        return load_digits(image=cfg.model != "resmlp")  # [N, 1, 8, 8] for the convolutional models
    return load_cifar10(cfg.data_dir)


def build_model(cfg: TrainConfig, data) -> nn.Sequential:
    """resmlp: --depth residual blocks of --width; cnn: digits_cnn with --width channels (two
    residual conv blocks, GAP, Linear; HZO probes its conv splits with SPP); resnet20: the
    ResNet-20-style model with base width --width (--depth does not apply to cnn/resnet20)."""
    torch.manual_seed(cfg.seed)
    if cfg.model == "cnn":
        return digits_cnn(cfg.width, data.num_classes, in_channels=data.input_shape[0])
    if cfg.model == "resnet20":
        return resnet20_cifar(data.num_classes, cfg.width, in_channels=data.input_shape[0])
    in_features = 1
    for s in data.input_shape:
        in_features *= s
    return residual_mlp(in_features, cfg.width, cfg.depth, data.num_classes)


def build_estimator(cfg: TrainConfig, model, loss_fn, group=None):
    qp = group is not None and distributed_mode(cfg) == "qp"
    if cfg.estimator == "hzo":
        return HZO(model, loss_fn, eps=cfg.eps, split=cfg.split, process_group=group, query_parallel=qp)
    if cfg.estimator == "cge":
        return CGE(model, loss_fn, eps=cfg.eps, process_group=group, query_parallel=qp)
    if cfg.estimator == "spsa":
        return SPSA(model, loss_fn, eps=cfg.eps, seed=cfg.seed, process_group=group)
    return Backprop(model, loss_fn, process_group=group)


@torch.no_grad()
def evaluate(model, x, y, loss_fn, batch=512):
    total_loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        total_loss += float(loss_fn(logits, y[i:i + batch])) * len(logits)
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return total_loss / len(x), correct / len(x)


def estimate_cosines(model, estimator, loss_fn, x, y, part: slice = slice(None)) -> list[float]:
    """Per-layer cosine of one estimate against backprop on (x, y); gradients are restored.
    ``part``: the rows this rank's estimator sees (data-parallel), default all."""
    saved = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    estimator.backward(x[part], y[part])
    est = grads_of(model)
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    ref = grads_of(model)
    for n, p in model.named_parameters():
        p.grad = saved[n]
    return per_layer_cosine(model, est, ref)


def _atomic_save(obj, path: str) -> None:
    """``path`` is replaced whole or not at all: a failed or killed save leaves the previous file."""
    tmp = f"{path}.tmp"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def run_folder(cfg: TrainConfig):
    """Makes ``cfg.out`` and holds its lock for the run; refuses a folder another run holds and a
    fresh run over an existing checkpoint."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out} is a file, not a folder")
    if cfg.resume and not os.path.isdir(cfg.out):
        raise FileNotFoundError(f"--resume: no run folder {cfg.out}")
    path = os.path.join(cfg.out, ".lock")
    try:
        os.makedirs(cfg.out, exist_ok=True)
        lock = open(path, "a+")  # not "w": truncating would erase the holder's pid before we know we hold it
    except OSError as exc:
        raise ValueError(f"--out {cfg.out} is not writable ({exc.strerror or exc})") from exc
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process that has not written its pid yet"
            raise ValueError(f"--out {cfg.out} is in use by another run ({holder}; lock {path}); wait for it to "
                             f"end or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        ckpt = os.path.join(cfg.out, "checkpoint.pt")
        if not cfg.resume and os.path.exists(ckpt):
            raise ValueError(f"--out {cfg.out} already holds a run ({ckpt}); pass --resume to continue it or "
                             f"choose another --out")
        yield  # the kernel drops the lock when the file closes or the process dies


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by ``train``; FileNotFoundError if absent, ValueError naming ``path``
    if it is unreadable (truncated, empty, not a torch file) or not a training checkpoint."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:  # weights_only: a foreign pickle is refused, never run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises any of a dozen types on a damaged file
        raise ValueError(f"checkpoint {path} is unreadable: truncated, empty or not written by hzo-ext train "
                         f"({type(exc).__name__})") from exc
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS) or \
            not isinstance(state["config"], dict):
        raise ValueError(f"checkpoint {path} is not an hzo-ext train checkpoint (expected a dict with "
                         f"{', '.join(CHECKPOINT_KEYS)})")
    return state


def check_resume(cfg: TrainConfig, state: dict, path: str) -> None:
    """Refuses a resume that would change the run's meaning (the rule is in ``train``'s docstring)."""
    old, diffs = state["config"], []
    for f in fields(TrainConfig):
        was, now = old.get(f.name, f.default), getattr(cfg, f.name)
        if f.name not in RESUMABLE + ("out", "resume") and was != now:
            diffs.append(f"--{f.name.replace('_', '-')} {was} in the checkpoint, {now} now")
    if diffs:
        raise ValueError(f"--resume: {path} is a run with other options: {'; '.join(diffs)}; only "
                         f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} may change")
    if cfg.epochs < state["epoch"]:
        raise ValueError(f"--resume: {path} is already at epoch {state['epoch']}, past --epochs {cfg.epochs}")


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) a training run; returns the final metrics row.

    On resume, only the options in ``RESUMABLE`` (epochs, lr, device, data_dir, cosine_every,
    distributed) may differ from the checkpoint's; any other difference raises ValueError naming
    each option and both values. A changed lr is set on the optimizer from the resumed epoch on
    and recorded in the checkpoint's config and in the ``lr`` column of ``metrics.csv``.
    """
    validate(cfg)
    mode = distributed_mode(cfg)
    lead = mode == "none" or os.environ.get("RANK", "0") == "0"  # rank 0 alone writes to --out
    with run_folder(cfg) if lead else contextlib.nullcontext():
        if mode == "none":
            return _train(cfg, None, 0, 1, cfg.device)
        group, rank, world, device = hzo_dist.init_from_env(cfg.device)
        try:
            row = _train(cfg, group, rank, world, device)
            # every rank done with the group before it goes: a rank tearing gloo down while a peer
            # still transfers aborted once in CI ("terminate called without an active exception")
            torch.distributed.barrier(group)
            return row
        finally:
            torch.distributed.destroy_process_group()


def _resume_state(cfg: TrainConfig, path: str, group, lead: bool, device: torch.device) -> dict:
    """Rank 0 reads and checks the checkpoint and sends it (or its error) to every rank."""
    state = None
    if lead:
        try:
            state = load_checkpoint(path)
            check_resume(cfg, state, path)
        except (ValueError, FileNotFoundError) as exc:
            state = exc  # every rank raises it, none waits in a collective for rank 0
    if group is not None:  # no shared filesystem needed
        box = [state]
        torch.distributed.broadcast_object_list(box, src=0, group=group,
                                                device=device if device.type == "cuda" else None)
        state = box[0]
    if isinstance(state, Exception):
        raise state
    return state


def _train(cfg: TrainConfig, group, rank: int, world: int, device: str) -> dict:
    lead = rank == 0  # prints, plots and writes checkpoints
    device = torch.device(device)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    state = _resume_state(cfg, ckpt_path, group, lead, device) if cfg.resume else None
    data = load_dataset(cfg)
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in (data.x_train, data.y_train, data.x_test, data.y_test))
    # data-parallel: rank r estimates on its block of every (global) batch of n samples
    part = (lambda n: slice(*hzo_dist.block(n, rank, world))) if distributed_mode(cfg) == "dp" else \
        (lambda n: slice(None))
    smallest = min(cfg.batch_size, len(x_tr) % cfg.batch_size or cfg.batch_size)
    if distributed_mode(cfg) == "dp" and smallest < world:
        raise ValueError(f"--distributed dp: a batch of {smallest} samples cannot give each of {world} ranks one; "
                         f"use a larger --batch-size or fewer processes")
    model = build_model(cfg, data).to(device)
    loss_fn = nn.CrossEntropyLoss()
    estimator = build_estimator(cfg, model, loss_fn, group)
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    optimizer = opt_cls(model.parameters(), lr=cfg.lr)
    held = torch.Generator().manual_seed(cfg.seed + 1)
    held_idx = torch.randperm(len(x_tr), generator=held)[: cfg.batch_size]
    # The cosine probe runs on a copy so the held-batch estimate never touches the trained weights.
    history, cosines, start_epoch = [], [], 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"checkpoint {ckpt_path} does not fit --model {cfg.model} --width {cfg.width} "
                             f"--depth {cfg.depth} ({type(exc).__name__}: {exc})") from exc
        for row in state["history"]:  # checkpoints older than the lr column trained at one lr throughout
            row.setdefault("lr", optimizer.param_groups[0]["lr"])
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr
        history, cosines, start_epoch = state["history"], state["cosines"], state["epoch"]
        if isinstance(estimator, SPSA):
            estimator.calls = state["spsa_calls"]
        if lead:
            print(f"resumed from {ckpt_path} after epoch {start_epoch}")
    steps_per_epoch = (len(x_tr) + cfg.batch_size - 1) // cfg.batch_size
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(cfg.seed * 10_007 + epoch))
        model.train()
        running = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, mininterval=1.0,
                   disable=not lead)
        for step in bar:
            global_step = epoch * steps_per_epoch + step
            if global_step % cfg.cosine_every == 0 and cfg.estimator != "bp":
                probe_model = copy.deepcopy(model)
                cos = estimate_cosines(probe_model, build_estimator(cfg, probe_model, loss_fn, group), loss_fn,
                                       x_tr[held_idx], y_tr[held_idx], part(len(held_idx)))
                cosines.append([global_step] + cos)
                if lead:
                    bar.write(f"step {global_step}: per-layer cosine vs backprop min={min(cos):.6f}")
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].to(device)
            optimizer.zero_grad(set_to_none=True)
            mine = idx[part(len(idx))]
            loss = estimator.backward(x_tr[mine], y_tr[mine])  # the whole batch's loss
            optimizer.step()
            running += float(loss) * len(idx)
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        model.eval()
        test_loss, test_acc = evaluate(model, x_te, y_te, loss_fn)
        row = dict(epoch=epoch + 1, lr=cfg.lr, train_loss=running / len(x_tr), test_loss=test_loss,
                   test_acc=test_acc, seconds=time.perf_counter() - t0)
        history.append(row)
        if not lead:
            continue
        print(f"epoch {epoch + 1}/{cfg.epochs} train_loss={row['train_loss']:.4f} test_loss={test_loss:.4f} "
              f"test_acc={test_acc:.4f} ({row['seconds']:.1f}s)", flush=True)
        _atomic_save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), history=history,
                          cosines=cosines, epoch=epoch + 1, config=asdict(cfg),
                          spsa_calls=getattr(estimator, "calls", 0)), ckpt_path)
        write_outputs(cfg, model, history, cosines)
    return history[-1] if history else {}


def write_outputs(cfg: TrainConfig, model, history, cosines) -> None:
    write_csv(os.path.join(cfg.out, "metrics.csv"), history)
    if cosines:
        with open(os.path.join(cfg.out, "cosine.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step"] + [f"stage{l + 1}" for l in trained_stages(model)])
            writer.writerows(cosines)
    plot_run(cfg, history, cosines, trained_stages(model))


def trained_stages(model) -> list[int]:
    """0-based indices of the stages with trainable parameters (per_layer_cosine's order)."""
    return [l for l, s in enumerate(model.children()) if any(p.requires_grad for p in s.parameters())]


def plot_run(cfg: TrainConfig, history, cosines, stage_ids) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = f"width {cfg.width} depth {cfg.depth}" if cfg.model == "resmlp" else f"width {cfg.width}"
    title = f"{cfg.estimator.upper()} ({cfg.split}) on {cfg.dataset}, {cfg.model} {shape}"
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax.plot(epochs, [r["test_loss"] for r in history], "s-", label="test")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title=f"Loss: {title}")
    ax.title.set_fontsize(9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "loss.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [100 * r["test_acc"] for r in history], "o-")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"Test accuracy: {title}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "accuracy.png"), dpi=110)
    plt.close(fig)

    if cosines:
        steps = [c[0] for c in cosines]
        fig, ax = plt.subplots(figsize=(6, 4))
        # 1 - cosine on a log axis: the interesting range is 1e-9 .. 1, not 0.99999 .. 1.
        for col, l in enumerate(stage_ids):
            ax.plot(steps, [max(1.0 - c[col + 1], 1e-16) for c in cosines], ".-", label=f"stage {l + 1}")
        ax.set_yscale("log")
        ax.set(xlabel="training step", ylabel="1 - cosine(estimate, backprop)  (lower is better)",
               title=f"Per-layer cosine on a held batch: {title}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(cfg.out, "cosine.png"), dpi=110)
        plt.close(fig)
