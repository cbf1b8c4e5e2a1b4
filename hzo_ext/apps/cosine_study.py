"""``hzo-ext cosine``: the paper's accuracy studies. Minimum per-layer cosine of HZO's estimate
against float64 autograd, against depth, for plain and residual MLPs, ReLU and GELU, in
float16, float32 and float64.

    hzo-ext cosine                    # depths 2..64, width 32 -> benchmarks/results/cosine_study.{csv,png}
    hzo-ext cosine --quick            # depths 2..8, width 8 (CI)
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from tqdm import tqdm

from ..estimator import HZO
from ..metrics import grads_of, per_layer_cosine, reference_grads
from ..models import deep_mlp
from .results import write_csv

DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--depths", type=int, nargs="+", default=None, help="default 2 4 8 16 32 64 (--quick: 2 4 8)")
    ap.add_argument("--width", type=int, default=None, help="default 32 (--quick: 8)")
    ap.add_argument("--split", default="chain", help="bisect or chain")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true", help="a small, fast run (CI)")
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/cosine_study[_quick].csv)")


def min_layer_cosine(depth, width, act, residual, dtype, split, eps, batch=8, din=16, dout=10) -> float:
    model = deep_mlp(depth, width, act=act, residual=residual, din=din, dout=dout, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, din, generator=g, dtype=torch.float64)
    y = torch.randint(0, dout, (batch,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    ref = reference_grads(model, loss_fn, x, y)
    model = model.to(dtype)
    model.zero_grad(set_to_none=True)
    try:
        HZO(model, loss_fn, eps=eps, split=split).backward(x.to(dtype), y)
    except ValueError as exc:  # e.g. overflow to inf in float16: the estimate is lost
        if "non-finite" not in str(exc):
            raise
        return float("nan")
    return min(per_layer_cosine(model, grads_of(model), ref))


def run(args) -> list[dict]:
    depths = args.depths or ([2, 4, 8] if args.quick else [2, 4, 8, 16, 32, 64])
    width = args.width or (8 if args.quick else 32)
    if min(depths) < 1 or width < 1 or not args.eps > 0:
        raise ValueError("--depths and --width must be >= 1 and --eps positive")
    if args.split not in ("bisect", "chain"):
        raise ValueError(f"unknown split {args.split!r} (choose from bisect, chain)")
    out = args.out or f"benchmarks/results/cosine_study{'_quick' if args.quick else ''}.csv"
    configs = [(a, r, d, L) for a in ("relu", "gelu") for r in (False, True) for d in DTYPES for L in depths]
    rows = []
    for act, residual, dtype, depth in tqdm(configs, desc="cosine study", mininterval=1.0):
        cos = min_layer_cosine(depth, width, act, residual, DTYPES[dtype], args.split, args.eps)
        rows.append(dict(act=act, arch="residual" if residual else "plain", dtype=dtype, depth=depth, width=width,
                         split=args.split, eps=args.eps, min_layer_cosine=cos))
    write_csv(out, rows)
    png = os.path.splitext(out)[0] + ".png"
    plot(rows, png)
    print(f"wrote {out} and {png}")
    for r in rows:
        if r["depth"] == max(depths):
            print(f"depth {r['depth']} {r['arch']:8s} {r['act']} {r['dtype']}: min per-layer cosine "
                  f"{r['min_layer_cosine']:.6f}")
    return rows


def plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(DTYPES), figsize=(13, 4), sharey=True)
    for ax, dtype in zip(axes, DTYPES):
        for arch, style in (("plain", "--"), ("residual", "-")):
            for act, marker in (("relu", "o"), ("gelu", "s")):
                r = [x for x in rows if x["dtype"] == dtype and x["arch"] == arch and x["act"] == act]
                ax.plot([x["depth"] for x in r], [x["min_layer_cosine"] for x in r], style, marker=marker,
                        label=f"{arch} {act}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype} queries")
        ax.set_xlabel("hidden layers")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("min per-layer cosine vs float64 autograd")
    axes[0].set_ylim(-1.05, 1.05)
    axes[-1].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"HZO ({r0['split']}, eps {r0['eps']}) gradient accuracy vs depth, MLP width {r0['width']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
