"""``hzo-ext bench``: time and query counts of one gradient estimate against depth for
HZO-bisect, HZO-chain, CGE, SPSA and backprop.

    hzo-ext bench                     # CPU, depths 4..64, width 128, batch 8 -> benchmarks/results/depth_cpu.csv
    hzo-ext bench --quick             # depths 2..8, width 16 (CI)
    hzo-ext bench --device cuda --out benchmarks/results/depth_cuda.csv

Model: `depth` stages ResidualBlock(Linear(128, 128), GELU) (uniform width M = 128, so the
exact counts are bisect M L log2 L, chain 2M(L-1), CGE M L (L-1)), CrossEntropy over the 128
outputs. Time is the median of --repeats runs (time.perf_counter, after one warm-up run).
Writes the CSV (default benchmarks/results/depth_cpu.csv) and a PNG beside it, and prints the
table and the CGE/HZO time ratios at the largest depth.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import hzo_ext
from .results import write_csv

METHODS = {
    "hzo-bisect": lambda m, lf: hzo_ext.HZO(m, lf, split="bisect"),
    "hzo-chain": lambda m, lf: hzo_ext.HZO(m, lf, split="chain"),
    "cge": lambda m, lf: hzo_ext.CGE(m, lf),
    "spsa": lambda m, lf: hzo_ext.SPSA(m, lf, num_samples=1),
    "backprop": lambda m, lf: hzo_ext.Backprop(m, lf),
}


def make_model(depth: int, width: int, device: str) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        with torch.no_grad():
            lin.weight.mul_(0.3)  # near the unitary limit
        blocks.append(hzo_ext.ResidualBlock(nn.Sequential(lin, nn.GELU())))
    return nn.Sequential(*blocks).to(device)


def predicted_queries(method: str, L: int, M: int) -> int | str:
    return {"hzo-bisect": hzo_ext.build_plan([(M,)] * (L + 1), 1, "bisect").fd_layer_evals,
            "hzo-chain": 2 * M * (L - 1), "cge": M * L * (L - 1), "spsa": 2 * L, "backprop": 0}[method]


def time_one(est, model, x, y, repeats: int, device: str) -> float:
    def run():
        model.zero_grad(set_to_none=True)
        est.backward(x, y)
        if device == "cuda":
            torch.cuda.synchronize()
    run()  # warm-up (also the one-time dynamic stage check)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--depths", type=int, nargs="+", default=None, help="default 4 8 16 32 64 (--quick: 2 4 8)")
    ap.add_argument("--width", type=int, default=None, help="default 128 (--quick: 16)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (--quick: 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a small, fast run (CI)")
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/depth_<device>[_quick].csv)")


def run(args) -> None:
    quick = args.quick
    args.depths = args.depths or ([2, 4, 8] if quick else [4, 8, 16, 32, 64])
    args.width = args.width or (16 if quick else 128)
    args.repeats = args.repeats or (1 if quick else 5)
    if min(args.depths) < 1 or args.width < 1 or args.batch < 1 or args.repeats < 1:
        raise ValueError("--depths, --width, --batch and --repeats must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available")
    device_name = args.device.split(":")[0]
    args.out = args.out or f"benchmarks/results/depth_{device_name}{'_quick' if quick else ''}.csv"

    rows = []
    for depth in args.depths:
        model = make_model(depth, args.width, args.device)
        x = torch.randn(args.batch, args.width, device=args.device)
        y = torch.randint(0, args.width, (args.batch,), device=args.device)
        for name, make in METHODS.items():
            est = make(model, nn.CrossEntropyLoss())
            seconds = time_one(est, model, x, y, args.repeats, args.device)
            s = est.last_stats
            rows.append(dict(method=name, depth=depth, width=args.width, batch=args.batch, device=args.device,
                             median_s=round(seconds, 6), fd_layer_evals=s.fd_layer_evals,
                             predicted_fd_layer_evals=predicted_queries(name, depth, args.width),
                             probes=s.probes, forward_calls=s.forward_calls, loss_evals=s.loss_evals))
            print(f"depth {depth:3d}  {name:10s}  {seconds * 1e3:10.2f} ms  fd_layer_evals {s.fd_layer_evals:8d}",
                  flush=True)

    out = write_csv(args.out, rows)
    plot(rows, out.with_suffix(".png"))

    deepest = max(args.depths)
    t = {r["method"]: r["median_s"] for r in rows if r["depth"] == deepest}
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    print(f"depth {deepest}: CGE/HZO-bisect time ratio {t['cge'] / t['hzo-bisect']:.1f}, "
          f"CGE/HZO-chain {t['cge'] / t['hzo-chain']:.1f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    run(ap.parse_args(argv))


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_q) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in METHODS:
        r = [row for row in rows if row["method"] == name]
        d = [row["depth"] for row in r]
        ax_t.plot(d, [row["median_s"] * 1e3 for row in r], "o-", label=name)
        if name != "backprop":
            ax_q.plot(d, [row["fd_layer_evals"] for row in r], "o-", label=name)
    for ax, label in ((ax_t, "time per estimate (ms, median)"), (ax_q, "fd_layer_evals (queries)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("depth (stages)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    r0 = rows[0]
    fig.suptitle(f"one gradient estimate vs depth: width {r0['width']}, batch {r0['batch']}, {r0['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
