"""Peak memory of one SPSA estimate: the copying algorithm (before issue 16) against the in-place one.

    python benchmarks/bench_spsa_memory.py        # -> benchmarks/results/spsa_memory_cpu.csv

The model is one 64 MiB parameter, ``nn.Linear(4096, 4096, bias=False)`` in float32, and a batch of
8 (activations: 128 KiB each). Every row is measured in a fresh process: build the model, one
warm-up forward, then the resident set size (RSS) now, then one estimate, then the process's peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). growth = peak after - RSS before: the extra
memory the estimate needed at its peak, the ``p.grad`` it returns included (1x the parameters).
``new_peak`` is False when the estimate did not raise the process's peak (the growth is then an
upper bound). The target (issue 16): growth below 1.3x the parameters plus the activations.

"copying" is the algorithm as it was (a copy of every weight, every direction materialised, kept
here as the baseline); "in place" is ``hzo_ext.SPSA``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N, BATCH = 4096, 8


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def copying_spsa(model, loss_fn, x, y, eps: float, num_samples: int, seed: int, calls: int = 0):
    """SPSA as it was before issue 16 (hzo_ext.baselines.SPSA.backward at 704530c: a copy of every
    weight, every direction materialised), one call with call count ``calls``; returns (loss,
    grads in parameter order). The baseline here and the plain reference of
    python_tests/test_baselines.py."""
    import torch
    from hzo_ext.stages import LossHead, as_stages
    stages, head = as_stages(model), LossHead(loss_fn)

    def forward(a):
        for s in stages:
            a = s(a)
        return a

    with torch.no_grad():
        params = list({id(p): p for s in stages for p in s.parameters() if p.requires_grad}.values())
        loss = head.total(forward(x), y)
        gen = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + calls)
        saved = [p.detach().clone() for p in params]
        grads = [torch.zeros_like(p) for p in params]
        for _ in range(num_samples):
            z = [torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device) for p in params]
            side = []
            for sign in (1.0, -1.0):
                for p, w, d in zip(params, saved, z):
                    p.copy_(w + sign * eps * d)
                side.append(head.total(forward(x), y))
            for p, w in zip(params, saved):
                p.copy_(w)
            proj = (side[0] - side[1]) / (2 * eps)
            for g, d in zip(grads, z):
                g.add_(d, alpha=proj.item() / num_samples)
    return loss, grads


def child(method: str, num_samples: int) -> dict:
    import torch
    from torch import nn
    import hzo_ext

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N, N, bias=False))
    x, y = torch.randn(BATCH, N), torch.randint(0, N, (BATCH,))
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        loss_fn(model(x), y)  # warm-up forward
    before, peak_before = _rss_bytes(), _peak_bytes()
    if method == "copying":
        _, grads = copying_spsa(model, loss_fn, x, y, 1e-3, num_samples, 0)
        for p, g in zip(model.parameters(), grads):
            p.grad = g
    else:
        hzo_ext.SPSA(model, loss_fn, eps=1e-3, num_samples=num_samples, seed=0).backward(x, y)
    peak = _peak_bytes()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"method": method, "num_samples": num_samples, "param_mib": params / 2**20,
            "activation_kib": BATCH * N * 4 / 2**10, "rss_before_mib": before / 2**20,
            "growth_mib": (peak - before) / 2**20, "growth_x_params": (peak - before) / params,
            "new_peak": peak > peak_before,
            "below_target": peak - before < 1.3 * params + 2 * BATCH * N * 4}  # x, the output: 2 activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "spsa_memory_cpu.csv"))
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "NUM_SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    sys.path.insert(0, str(ROOT))
    from hzo_ext.apps.results import write_csv
    rows = []
    for num_samples in (1, 2):
        for method in ("copying", "in place"):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            out = subprocess.run([sys.executable, __file__, "--child", method, str(num_samples)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    write_csv(args.out, rows, comment="python benchmarks/bench_spsa_memory.py (CPU, fresh process per row)",
              float_format=".4g")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
