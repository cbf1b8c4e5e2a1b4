"""SPP against dense HZO on a small residual CNN at growing image sizes, and one HZO+SPP estimate
of the ResNet-20-style model at 32x32 against float64 autograd.

    python benchmarks/bench_spp.py            # writes benchmarks/results/spp_cpu.{csv,png} and resnet20_spp_<split>.csv

Part 1: the model is hzo_ext.models.digits_cnn (stem conv, residual block, strided residual
block with a 1x1 shortcut, GAP, Linear; width 8) with 3 input channels, at H = W = 16, 32, 64, batch 2,
float32, split='bisect', chunk_size 512 (both modes). Probes and fd_layer_evals come from the plan (exact counts); time is the
median of --repeats estimates. Dense runs only while its predicted queries stay under
--dense-max-queries (beyond that it would take hours on 2 cores): those rows say 'not run'.
Part 2: resnet20_cifar (width 16) on one batch of 32x32 inputs: per-layer cosine of one HZO+SPP
float32 estimate against float64 autograd, its time, probes, and memory (the plan's predicted
peak of query tensors, and the growth of the process's peak RSS during the estimate).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
import warnings

import torch
from torch import nn

import hzo_ext
from hzo_ext.models import digits_cnn, resnet20_cifar
from hzo_ext.apps.results import write_csv

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")




def time_estimate(est, x, y, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        est.model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        est.backward(x, y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def spp_vs_dense(sizes, batch: int, repeats: int, dense_max_queries: int, chunk_size: int) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    model = digits_cnn(width=8, in_channels=3)
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        x, y = torch.randn(batch, 3, n, n, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
        for mode, spp in (("spp", "auto"), ("dense", False)):
            est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), spp=spp, chunk_size=chunk_size)
            plan = est.plan(x)
            # the splits at feature maps: C * min(s, H) * min(s, W) probes with SPP
            spatial = [s.probes for s in plan.splits if len(plan.shapes[s.m]) == 3]
            row = dict(mode=mode, pixels=n, batch=batch, probes=plan.probes, fd_layer_evals=plan.fd_layer_evals,
                       max_probes_spatial_split=max(spatial), predicted_peak_MiB=plan.peak_query_bytes / 2**20)
            if mode == "dense" and plan.fd_layer_evals > dense_max_queries:
                row["seconds"] = float("nan")
                row["note"] = f"not run: {plan.fd_layer_evals} queries > --dense-max-queries"
            else:
                row["seconds"] = time_estimate(est, x, y, repeats)
                row["note"] = ""
            rows.append(row)
            print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    return rows


def resnet20_estimate(batch: int, split: str) -> dict:
    model = resnet20_cifar()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    ref = hzo_ext.reference_grads(model, nn.CrossEntropyLoss(), x, y)  # float64 autograd
    est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), eps=1e-3, split=split)
    plan = est.plan(x)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no split may fall back to dense probing
        t0 = time.perf_counter()
        est.backward(x, y)
        seconds = time.perf_counter() - t0
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before  # KiB on Linux
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    nn.CrossEntropyLoss()(model(x), y).backward()
    bp_seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    est.backward(x, y)
    cos = hzo_ext.per_layer_cosine(model, hzo_ext.grads_of(model), ref)
    row = dict(model="resnet20_cifar", split=split, pixels=32, batch=batch, dtype="float32", seconds=seconds,
               backprop_seconds=bp_seconds, probes=plan.probes, fd_layer_evals=plan.fd_layer_evals,
               dense_probes=sum(int(torch.tensor(plan.shapes[s.m]).prod()) for s in plan.splits),
               predicted_peak_query_MiB=plan.peak_query_bytes / 2**20, peak_rss_growth_MiB=rss_growth / 1024,
               min_layer_cosine=min(cos), median_layer_cosine=statistics.median(cos), layers=len(cos))
    print(plan)
    print(", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def write_results(path: str, rows: list[dict], command: str) -> None:
    write_csv(path, rows, comment=f"{command} | {platform.processor() or platform.machine()}, "
                                  f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
                                  f"extension {hzo_ext.has_extension()}")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("spp", "o-"), ("dense", "s--")):
        r = [row for row in rows if row["mode"] == mode]
        ax1.plot([row["pixels"] for row in r], [row["probes"] for row in r], style, label=mode)
        ran = [row for row in r if row["seconds"] == row["seconds"]]
        ax2.plot([row["pixels"] for row in ran], [row["seconds"] for row in ran], style, label=mode)
    for ax, title in ((ax1, "total probes per estimate (plan)"), (ax2, "seconds per estimate (median)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("image size H = W (pixels)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("SPP vs dense HZO, small residual CNN, batch 2, float32, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-max-queries", type=int, default=2_000_000)
    ap.add_argument("--chunk-size", type=int, default=512, help="probes per batched query (bounds memory)")
    ap.add_argument("--resnet-batch", type=int, default=4)
    ap.add_argument("--resnet-splits", nargs="+", default=["bisect", "chain"])
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--skip-sizes", action="store_true", help="only part 2 (ResNet-20)")
    args = ap.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    command = "python benchmarks/bench_spp.py " + " ".join(
        f"--sizes {' '.join(map(str, args.sizes))} --batch {args.batch} --repeats {args.repeats} "
        f"--chunk-size {args.chunk_size}".split())
    if not args.skip_sizes:
        rows = spp_vs_dense(args.sizes, args.batch, args.repeats, args.dense_max_queries, args.chunk_size)
        write_results(os.path.join(RESULTS, "spp_cpu.csv"), rows, command)
        plot(rows, os.path.join(RESULTS, "spp_cpu.png"))
    if not args.skip_resnet:
        for split in args.resnet_splits:
            write_results(os.path.join(RESULTS, f"resnet20_spp_{split}.csv"),
                          [resnet20_estimate(args.resnet_batch, split)],
                          f"python benchmarks/bench_spp.py --skip-sizes --resnet-batch {args.resnet_batch} "
                          f"--resnet-splits {split}")


if __name__ == "__main__":
    main()
