"""One HZO estimate on 1 process against 2 processes (gloo on 127.0.0.1), on the CPU.

    python benchmarks/bench_distributed.py            # -> benchmarks/results/distributed_cpu.{csv,png}

Configurations, all the same float32 residual GELU MLP and batch (a compute-bound estimate):
  1 process x 1 thread, 1 process x 2 threads (intra-op threads), and 2 processes x 1 thread
  in each mode: data-parallel (each rank half the batch, one gradient all_reduce) and
  query-parallel (each rank half the probes of every split, one all_reduce per split); and
  rank 0's share of each mode run alone in one process (no second rank, no collectives): the
  speedup the split of the work allows.
Each configuration runs in fresh processes, ``--rounds`` times interleaved with the others (the
machine is shared, so load changes over time), ``--repeats`` timed estimates per round after a
warm-up. An estimate's time on 2 processes is the slower rank's, measured from a barrier.
Breakdown (EstimateStats): comm = time in collectives (gradient / partial-target sums,
including waiting for the slower rank), check = the cross-rank fingerprint check, compute = the
rest. cpu_share = the process's CPU time / wall time of an estimate (all its threads): below
threads_per_process, the process waited for a core (other jobs on the machine), so the
1-minute load average is recorded too. cpu_ms = the slower rank's CPU time per estimate;
speedup_if_dedicated_cores = cpu_ms(1 x 1) / (cpu_ms / threads): the speedup with a core per
thread and no waiting (collectives on loopback are short next to this compute), a
load-independent reading of the work each process does.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [  # name, processes, threads per process, mode
    ("1 proc x 1 thread", 1, 1, "single"),
    ("1 proc x 2 threads", 1, 2, "single"),
    ("2 procs x 1 thread, data-parallel", 2, 1, "dp"),
    ("2 procs x 1 thread, query-parallel", 2, 1, "qp"),
    ("1 proc x 1 thread, rank 0's share alone, data-parallel", 1, 1, "dp-alone"),
    ("1 proc x 1 thread, rank 0's share alone, query-parallel", 1, 1, "qp-alone"),
]


class _RankZeroAlone:
    """Rank 0's probe blocks of a 2-rank query-parallel estimate, without the other rank and
    without collectives: the work one rank does, timed alone (the Shard interface)."""

    def __init__(self, est):
        self.est = est

    def probes(self, n: int) -> tuple[int, int]:
        from hzo_ext.distributed import block
        return block(n, 0, 2)

    def count(self, n: int) -> int:
        lo, hi = self.probes(n)
        return hi - lo

    def sum(self, part, like, n: int, what: str):
        return part if part is not None else like.new_zeros(like.shape[0], n)


def worker(a) -> None:
    import torch
    torch.set_num_threads(a.threads)
    import torch.distributed as dist
    from torch import nn

    import hzo_ext
    from hzo_ext.distributed import block
    from hzo_ext.models import deep_mlp

    group = None
    if a.world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world)
        group = dist.group.WORLD
    model = deep_mlp(a.depth, a.width, "gelu", residual=True, din=a.width, dout=10, dtype=torch.float32,
                     residual_scale=0.25)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(a.batch, a.width, generator=g), torch.randint(0, 10, (a.batch,), generator=g)
    if a.mode in ("dp", "dp-alone"):
        part = slice(*block(a.batch, a.rank, 2))
        x, y = x[part], y[part]
    est = hzo_ext.HZO(model, nn.CrossEntropyLoss(), split=a.split, process_group=group,
                      query_parallel=a.mode == "qp")
    if a.mode == "qp-alone":
        est._shard = _RankZeroAlone(est)
    rows = []
    for k in range(a.repeats + 1):  # the first is a warm-up
        if group is not None:
            dist.barrier()
        model.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        est.backward(x, y)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        s = est.last_stats
        if k:
            rows.append(dict(wall=wall, cpu=cpu, comm=s.comm_seconds, check=s.check_seconds,
                             fd_layer_evals=s.fd_layer_evals, load=os.getloadavg()[0]))
    with open(a.out, "w") as f:
        json.dump(rows, f)
    if group is not None:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(a, procs: int, threads: int, mode: str, tmp: str) -> list[list[dict]]:
    """Per rank, the timed rows of one launch."""
    port, outs, ps = _free_port(), [], []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for r in range(procs):
        outs.append(os.path.join(tmp, f"{mode}-{procs}-{threads}-{r}.json"))
        ps.append(subprocess.Popen([sys.executable, __file__, "--worker", "--rank", str(r), "--world", str(procs),
                                    "--port", str(port), "--mode", mode, "--threads", str(threads),
                                    "--depth", str(a.depth), "--width", str(a.width), "--batch", str(a.batch),
                                    "--split", a.split, "--repeats", str(a.repeats), "--out", outs[-1]], env=env))
    for p in ps:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"a benchmark worker failed ({mode}, {procs} processes)")
    return [json.load(open(o)) for o in outs]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--split", default="bisect")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed_cpu.csv"))
    for name in ("rank", "world", "port", "threads"):
        ap.add_argument(f"--{name}", type=int, default=0)
    ap.add_argument("--mode", default="single")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)

    samples = {c[0]: [] for c in CONFIGS}  # per config: per estimate, per rank rows
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            for name, procs, threads, mode in CONFIGS:
                per_rank = run_config(a, procs, threads, mode, tmp)
                samples[name] += [list(rows) for rows in zip(*per_rank)]
                walls = [max(r["wall"] for r in est) for est in samples[name][-a.repeats:]]
                print(f"round {rnd + 1}/{a.rounds}  {name:36s} {statistics.median(walls) * 1e3:9.1f} ms", flush=True)

    base = statistics.median(max(r["wall"] for r in est) for est in samples[CONFIGS[0][0]])
    base_cpu = statistics.median(max(r["cpu"] for r in est) for est in samples[CONFIGS[0][0]])
    rows = []
    for name, procs, threads, mode in CONFIGS:
        ests = samples[name]
        wall = statistics.median(max(r["wall"] for r in est) for est in ests)
        # the breakdown of the rank that finished last, per estimate (medians of each part)
        slow = [max(est, key=lambda r: r["wall"]) for est in ests]
        comm, check = (statistics.median(r[k] for r in slow) for k in ("comm", "check"))
        share = statistics.median(r["cpu"] / r["wall"] for est in ests for r in est)
        cpu = statistics.median(max(r["cpu"] for r in est) for est in ests)
        rows.append(dict(config=name, processes=procs, threads_per_process=threads, mode=mode, depth=a.depth,
                         width=a.width, batch=a.batch, split=a.split, estimates=len(ests),
                         median_ms=round(wall * 1e3, 2), speedup_vs_1x1=round(base / wall, 3),
                         compute_ms=round((statistics.median(r["wall"] for r in slow) - comm - check) * 1e3, 2),
                         comm_ms=round(comm * 1e3, 2), check_ms=round(check * 1e3, 2),
                         fd_layer_evals_per_rank=ests[0][0]["fd_layer_evals"], cpu_ms=round(cpu * 1e3, 2),
                         speedup_if_dedicated_cores=round(base_cpu / (cpu / threads), 3), cpu_share=round(share, 2),
                         load_1min=round(statistics.median(r["load"] for est in ests for r in est), 2)))
    from hzo_ext.apps.results import write_csv
    out = write_csv(a.out, rows)
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    for r in rows:
        print(f"{r['config']:36s} {r['median_ms']:9.1f} ms  speedup {r['speedup_vs_1x1']:.2f}x  "
              f"compute {r['compute_ms']:.1f}  comm {r['comm_ms']:.1f}  check {r['check_ms']:.1f} ms  "
              f"cpu {r['cpu_ms']:.1f} ms ({r['speedup_if_dedicated_cores']:.2f}x with dedicated cores)  "
              f"cpu share {r['cpu_share']:.2f}  load {r['load_1min']:.1f}")


def replot(csv_path: str) -> None:
    """Redraw the PNG from a CSV this script wrote."""
    with open(csv_path) as f:
        rows = [{k: (v if k in ("config", "mode", "split") else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]
    plot(rows, Path(csv_path).with_suffix(".png"))


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax_cpu) = plt.subplots(1, 2, figsize=(14, 4.6))
    short = {"single": "1 proc", "dp": "2 procs\ndata-par.", "qp": "2 procs\nquery-par.",
             "dp-alone": "rank 0 alone\ndata-par.", "qp-alone": "rank 0 alone\nquery-par."}
    names = [short[r["mode"]] + (f"\n{int(r['threads_per_process'])} thread{'s' if r['threads_per_process'] > 1 else ''}"
                                 if r["mode"] == "single" else "") for r in rows]
    bottom = [0.0] * len(rows)
    for key, label in (("compute_ms", "compute"), ("comm_ms", "collectives (incl. waiting)"),
                       ("check_ms", "cross-rank check")):
        vals = [r[key] for r in rows]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for k, r in enumerate(rows):
        ax.text(k, r["median_ms"], f"{r['median_ms']:.0f} ms\n{r['speedup_vs_1x1']:.2f}x", ha="center", va="bottom",
                fontsize=8)
    ax.set_ylabel("one estimate, wall ms (median; slower rank)")
    ax.set_ylim(0, max(r["median_ms"] for r in rows) * 1.25)
    r0 = rows[0]
    ax.set_title(f"HZO ({r0['split']}), residual MLP depth {int(r0['depth'])} width {int(r0['width'])}, batch {int(r0['batch'])}, "
                 f"float32; CPU, 2 cores shared (load ~{r0['load_1min']:.0f})", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    ax_cpu.bar(names, [r["cpu_ms"] for r in rows], color="tab:gray")
    for k, r in enumerate(rows):
        ax_cpu.text(k, r["cpu_ms"], f"{r['cpu_ms']:.0f} ms\n{r['speedup_if_dedicated_cores']:.2f}x", ha="center",
                    va="bottom", fontsize=8)
    ax_cpu.set_ylim(0, max(r["cpu_ms"] for r in rows) * 1.25)
    ax_cpu.set_ylabel("CPU time of the slower process, ms (all threads)")
    ax_cpu.set_title("work per process; x: speedup with a core per thread", fontsize=9)
    ax_cpu.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
