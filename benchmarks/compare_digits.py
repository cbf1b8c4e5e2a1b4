"""Convergence study on digits: backprop, HZO, CGE, SPSA (MeZO) and SPSA by blocks (MeZO-BCD).

    python benchmarks/compare_digits.py     # -> benchmarks/results/compare_digits.{csv,png}

Every method trains its own copy of the same model from the same initial weights: the residual MLP
of ``hzo-ext train`` (``hzo_ext.models.residual_mlp``, width 64, 4 residual blocks: 6 stages,
21,066 parameters) on scikit-learn's digits (``hzo_ext.apps.data.load_digits``), Adam lr 3e-3, batch 32,
the same batches in the same order, ``--steps`` steps. The methods are interleaved step by step
in one process (each step runs every method once, in turn), so a change of load on the shared
machine hits all alike. seconds = the estimator's own time (``backward``, not the optimiser
step or the evaluations); queries = cumulative ``fd_layer_evals`` (backprop makes none). Every
``--eval-every`` steps: loss and accuracy on the 360 test images.

The time ratio MeZO-BCD / MeZO is the median per-step estimator time of SPSA(blocks="layer")
and SPSA(blocks="random") over that of SPSA(blocks=None), from the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hzo_ext  # noqa: E402
from hzo_ext.apps.data import load_digits  # noqa: E402
from hzo_ext.models import residual_mlp  # noqa: E402
from hzo_ext.apps.results import write_csv  # noqa: E402

METHODS = {  # label -> estimator factory (model, loss_fn)
    "backprop": lambda m, lf: hzo_ext.Backprop(m, lf),
    "hzo (default)": lambda m, lf: hzo_ext.HZO(m, lf),
    "hzo bisect": lambda m, lf: hzo_ext.HZO(m, lf, split="bisect"),
    "cge": lambda m, lf: hzo_ext.CGE(m, lf),
    "spsa (MeZO)": lambda m, lf: hzo_ext.SPSA(m, lf, seed=0),
    "spsa layer (MeZO-BCD)": lambda m, lf: hzo_ext.SPSA(m, lf, seed=0, blocks="layer"),
    "spsa random (MeZO-BCD)": lambda m, lf: hzo_ext.SPSA(m, lf, seed=0, blocks="random"),
}


@torch.no_grad()
def evaluate(model, x, y, loss_fn) -> tuple[float, float]:
    logits = model(x)
    return float(loss_fn(logits, y)), float((logits.argmax(1) == y).float().mean())


def run(steps: int, eval_every: int, batch: int, lr: float, seed: int) -> tuple[list[dict], dict]:
    torch.manual_seed(seed)
    data = load_digits()
    base = residual_mlp(64, 64, 4, data.num_classes)
    loss_fn = nn.CrossEntropyLoss()
    runs = {}
    for label, make in METHODS.items():
        model = residual_mlp(64, 64, 4, data.num_classes)
        model.load_state_dict(base.state_dict())
        runs[label] = dict(model=model, est=make(model, loss_fn), opt=torch.optim.Adam(model.parameters(), lr=lr),
                           seconds=0.0, queries=0, step_times=[])
    rows = []

    def log(step):
        for label, r in runs.items():
            loss, acc = evaluate(r["model"], data.x_test, data.y_test, loss_fn)
            rows.append(dict(method=label, step=step, seconds=r["seconds"], queries=r["queries"], test_loss=loss,
                             test_acc=acc))

    order = torch.Generator().manual_seed(seed)
    perm = torch.empty(0, dtype=torch.long)
    log(0)
    for step in tqdm(range(1, steps + 1), desc="steps", mininterval=2.0):
        if len(perm) < batch:  # a new epoch: a fresh shuffle, the same for every method
            perm = torch.randperm(len(data.x_train), generator=order)
        idx, perm = perm[:batch], perm[batch:]
        x, y = data.x_train[idx], data.y_train[idx]
        for r in runs.values():
            r["opt"].zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            r["est"].backward(x, y)
            dt = time.perf_counter() - t0
            r["opt"].step()
            r["seconds"] += dt
            r["step_times"].append(dt)
            r["queries"] += r["est"].last_stats.fd_layer_evals
        if step % eval_every == 0 or step == steps:
            log(step)
    medians = {label: statistics.median(r["step_times"]) for label, r in runs.items()}
    return rows, medians


def plot(rows: list[dict], path: Path, title: str) -> None:
    """2 x 2 panels: test accuracy (top) and test loss (bottom) against estimator seconds (left) and
    queries (right), log-x; backprop makes no queries: its best value is a dotted line on the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharex="col")
    for row, (key, best, name) in enumerate([("test_acc", max, "test accuracy"), ("test_loss", min, "test loss")]):
        for k, label in enumerate(METHODS):
            pts = [r for r in rows if r["method"] == label and r["step"] > 0]
            style = dict(ls="--" if label == "hzo bisect" else "-", marker=".", color=f"C{k}", label=label)
            axes[row, 0].plot([r["seconds"] for r in pts], [r[key] for r in pts], **style)
            if label == "backprop":
                axes[row, 1].axhline(best(r[key] for r in pts), color="C0", ls=":", label="backprop (best, no queries)")
            else:
                axes[row, 1].plot([r["queries"] for r in pts], [r[key] for r in pts], **style)
        for ax in axes[row]:
            ax.set(xscale="log", ylabel=name)
            ax.grid(True, which="both", alpha=0.3)
        if key == "test_acc":
            axes[row, 0].set_ylim(0, 1)
            axes[row, 1].set_ylim(0, 1)
        else:
            axes[row, 0].set_yscale("log")
            axes[row, 1].set_yscale("log")
    axes[0, 0].set_title("against wall-clock time (estimator only)")
    axes[0, 1].set_title("against queries")
    axes[1, 0].set_xlabel("estimator seconds (cumulative)")
    axes[1, 1].set_xlabel("queries (cumulative fd_layer_evals)")
    axes[0, 1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1350)
    ap.add_argument("--eval-every", type=int, default=45)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare_digits"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, medians = run(args.steps, args.eval_every, args.batch, args.lr, args.seed)
    default_split = hzo_ext.HZO(residual_mlp(64, 64, 4, 10), nn.CrossEntropyLoss()).split
    for label, t in medians.items():
        print(f"{label:24s} median estimator time per step {1e3 * t:8.3f} ms")
    mezo = medians["spsa (MeZO)"]
    ratios = {k: medians[k] / mezo for k in ("spsa layer (MeZO-BCD)", "spsa random (MeZO-BCD)")}
    for k, v in ratios.items():
        print(f"time per step {k} / spsa (MeZO): {v:.3f} (MeZO-BCD {1 / v:.2f}x faster)")
    comment = (f"python benchmarks/compare_digits.py --steps {args.steps} --eval-every {args.eval_every} "
               f"(CPU, 1 thread, shared machine; hzo default split={default_split}); median ms per step: "
               + ", ".join(f"{k}={1e3 * t:.3f}" for k, t in medians.items())
               + "; ratio vs MeZO: " + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    out = Path(args.out)
    write_csv(out.with_suffix(".csv"), rows, comment=comment, float_format=".6g")
    plot(rows, out.with_suffix(".png"), f"digits, residual MLP (6 stages), Adam lr {args.lr}, batch {args.batch}, "
                                        f"{args.steps} steps")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
