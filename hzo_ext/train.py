"""``hzo-ext train``: train a model with HZO (or a baseline) and watch the estimate's quality.

Per epoch: loss and test accuracy (a line with ``test_acc=<value>``); every ``cosine_every``
steps: the per-layer cosine of the estimate against backprop on a held batch. Writes
``metrics.csv``, ``cosine.csv``, PNG plots, and an atomic checkpoint after every epoch;
``resume=True`` continues a killed run to the same final weights as an uninterrupted one
(data order and SPSA directions are functions of the seed and the epoch/step counters).

Under torchrun (docs/distributed.md), ``distributed='dp'`` gives each rank its block of every
batch, ``'qp'`` shards the probes of every batch's estimate; both keep the single-process
batches and sampling order, so the run matches a single-process one to round-off. Rank 0
alone prints, plots and writes checkpoints; a resume loads on rank 0 and broadcasts.
"""
from __future__ import annotations

import copy
import csv
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from . import distributed as hzo_dist
from .baselines import CGE, SPSA, Backprop
from .data import load_cifar10, load_digits
from .estimator import HZO
from .metrics import grads_of, per_layer_cosine
from .models import digits_cnn, residual_mlp, resnet20_cifar
from .results import write_csv

ESTIMATORS = ("hzo", "cge", "spsa", "bp")
MODELS = ("resmlp", "cnn", "resnet20")  # residual MLP; models.digits_cnn; models.resnet20_cifar
DEFAULT_WIDTH = {"resmlp": 64, "cnn": 8, "resnet20": 16}
DATASETS = ("digits", "cifar10")
DISTRIBUTED = ("auto", "none", "dp", "qp")  # auto: dp under torchrun (WORLD_SIZE set), else none


@dataclass
class TrainConfig:
    out: str
    estimator: str = "hzo"
    split: str = "bisect"
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
    if cfg.split not in ("bisect", "chain"):
        raise ValueError(f"unknown split {cfg.split!r} (choose from bisect, chain)")
    if cfg.optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} (choose from adam, sgd)")
    if cfg.width is None:
        cfg.width = DEFAULT_WIDTH[cfg.model]
    for name in ("epochs", "batch_size", "width", "depth", "cosine_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not (cfg.eps > 0 and cfg.lr > 0) or cfg.eps != cfg.eps or cfg.lr != cfg.lr:
        raise ValueError(f"--eps and --lr must be positive, got eps={cfg.eps}, lr={cfg.lr}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA device is available")
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
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) a training run; returns the final metrics row."""
    validate(cfg)
    mode = distributed_mode(cfg)
    if mode == "none":
        return _train(cfg, None, 0, 1, cfg.device)
    group, rank, world, device = hzo_dist.init_from_env(cfg.device)
    try:
        return _train(cfg, group, rank, world, device)
    finally:
        torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, group, rank: int, world: int, device: str) -> dict:
    lead = rank == 0  # prints, plots and writes checkpoints
    if lead:
        os.makedirs(cfg.out, exist_ok=True)
    data = load_dataset(cfg)
    device = torch.device(device)
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
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    history, cosines, start_epoch = [], [], 0
    if cfg.resume:
        state = None
        if lead and os.path.isfile(ckpt_path):
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if group is not None:  # rank 0's checkpoint to every rank (no shared filesystem needed)
            box = [state]
            torch.distributed.broadcast_object_list(box, src=0, group=group,
                                                    device=device if device.type == "cuda" else None)
            state = box[0]
        if state is None:
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
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
        row = dict(epoch=epoch + 1, train_loss=running / len(x_tr), test_loss=test_loss, test_acc=test_acc,
                   seconds=time.perf_counter() - t0)
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
    plot_run(cfg, history, cosines)


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
