"""CPU hzo_ext::contract against its pure-PyTorch reference, with bandwidth next to a plain copy.

    python benchmarks/bench_contract.py            # writes benchmarks/results/contract_cpu.{csv,png}

Shapes: K probes, B samples, Q outputs (the issue's realistic shape is K=256, B=64, Q=256), dense
owner map (every output of probe k -> coordinate k) and an SPP-like one (runs of 5 outputs per owner,
as a 1-D footprint of radius 2 gives). Bandwidth counts the bytes the op must read (y, target, owner) and write
(out); the copy is `y_copy.copy_(y)` into a preallocated tensor (reads and writes y). Medians of torch.utils.benchmark.Timer.
"""
import argparse
import os
import platform

import torch
import torch.utils.benchmark as tbench

import hzo_ext
from hzo_ext import _torch_impl, ops
from hzo_ext.apps.results import write_csv

HERE = os.path.dirname(os.path.abspath(__file__))


def spp_owner(K, Q, radius=2):
    """Owner map of a 1-D SPP coloring with footprint radius r (s = 2r+1 colors): probe k moves
    every input position p = color(k) (mod s) of its own row; output q belongs to the one moved
    position within distance r (runs of s outputs per owner, as a conv footprint gives)."""
    s = 2 * radius + 1
    q = torch.arange(Q)
    color = torch.arange(K) % s
    p = q.unsqueeze(0) + (color.unsqueeze(1) - q.unsqueeze(0) + radius) % s - radius  # [K, Q]
    return torch.where((p >= 0) & (p < Q), p % K, torch.full_like(p, -1))


def median_seconds(fn, min_run_time):
    return tbench.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def run(shapes, min_run_time, threads):
    torch.set_num_threads(threads)
    rows = []
    for K, B, Q in shapes:
        gen = torch.Generator().manual_seed(0)
        y = torch.randn(2, K, B, Q, generator=gen)
        target = torch.randn(B, Q, generator=gen)
        owners = {"dense": ops.dense_owner(torch.arange(K), Q), "spp": spp_owner(K, Q)}
        y_copy = torch.empty_like(y)
        t_copy = median_seconds(lambda: y_copy.copy_(y), min_run_time)
        copy_bw = 2 * y.numel() * y.element_size() / t_copy
        for kind, owner in owners.items():
            moved = (y.numel() + target.numel() + B * K) * y.element_size() + owner.numel() * 8
            t_ext = median_seconds(lambda: ops.contract(y, target, owner, 1e-3, num_inputs=K), min_run_time)
            t_ref = median_seconds(lambda: _torch_impl.contract(y, target, owner, 1e-3, K), min_run_time)
            got = ops.contract(y, target, owner, 1e-3, num_inputs=K)
            want = _torch_impl.contract(y, target, owner, 1e-3, K)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
            rows.append(dict(K=K, B=B, Q=Q, owner=kind, threads=threads, ext_ms=t_ext * 1e3, ref_ms=t_ref * 1e3,
                             speedup=t_ref / t_ext, ext_GBps=moved / t_ext / 1e9, copy_GBps=copy_bw / 1e9,
                             ext_vs_copy_bw=moved / t_ext / copy_bw))
            print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                  flush=True)
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"K{r['K']} B{r['B']} Q{r['Q']}\n{r['owner']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["ref_ms"] for r in rows], width=0.4, label="pure-PyTorch reference")
    ax.bar([i + 0.2 for i in x], [r["ext_ms"] for r in rows], width=0.4, label="hzo_ext CPU kernel")
    for i, r in enumerate(rows):
        ax.text(i + 0.2, r["ext_ms"], f"{r['speedup']:.1f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("median time per call (ms)")
    ax.set_title(f"hzo_ext::contract on CPU ({rows[0]['threads']} threads), lower is better")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not hzo_ext.has_extension():
        raise SystemExit(f"the compiled extension is not loaded: {hzo_ext.info()['extension_error']}")
    shapes = [(256, 64, 256), (64, 16, 1024), (1024, 8, 128)]
    rows = run(shapes, args.min_run_time, args.threads)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "contract_cpu.csv")
    write_csv(csv_path, rows, comment=f"python benchmarks/bench_contract.py; "
                                      f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                      f"torch {torch.__version__}")
    plot(rows, os.path.join(args.out, "contract_cpu.png"))
    print(f"wrote {csv_path} and contract_cpu.png")


if __name__ == "__main__":
    main()
