"""The default HZO estimate (split='auto': op-level cuts, affine ops folded, elementwise ops probed
by the fused kernel) against backprop, and on ResNet-20 against DeepZero's CGE.

    python benchmarks/bench_default.py                 # both cases, CSV + plot in benchmarks/results
    python benchmarks/bench_default.py --case mlp --repeats 5

- mlp: residual GELU MLP (hzo_ext.models.deep_mlp(64, 128, residual=True, residual_scale=0.25):
  width 128, depth 64), float32, 1 thread, batch 32 and 256.
- resnet20: DeepZero's ResNet-20 as its authors wrote it (hzo_ext.models.DeepZeroResNet, BN
  eval, F.relu, option-A shortcuts), batch 256, float32, 2 threads. DeepZero's CGE with
  feature reuse, re-implemented here (one parameter coordinate per query, forward difference,
  the network re-run from the perturbed layer): its time per query is measured on a sample
  of coordinates of every layer and multiplied by the layer's coordinate count (a full run
  would take days); the count is exact.
- vit: a small timm VisionTransformer (32x32 images, patch 8, width 64, depth 2, 2 heads),
  float32, 1 thread, batch 32: attention traced as its ops (its softmax probed), layer norms
  probed per feature.
- encoder: nn.TransformerEncoder (width 64, 4 heads, FFN 128, GELU, 2 layers, eval) with a
  linear head on the mean token, 16 tokens, float32, 1 thread, batch 32: traced as the ops of
  its layers.
- causal: the same encoder after an input projection (nn.Linear(64, 64), as an embedding
  precedes it in a language model, so the encoder's input needs a target) with a causal mask
  (nn.Transformer.generate_square_subsequent_mask, is_causal=True), the head on the last token.
HZO (the default: its C++ version where the extension is loaded), the same engine in Python
(executor='python') and backprop are timed interleaved (round robin) in one process; medians. Accuracy:
cosine per parameter tensor of the float32 estimate against float64 autograd. Memory: each
HZO estimate once more in a fresh process, its peak RSS growth against the plan's prediction.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import hzo_ext
from hzo_ext.models import DeepZeroResNet, deep_mlp, resnet20_cifar

RESULTS = Path(__file__).resolve().parent / "results"


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder (width 64, 4 heads, FFN 128, 2 layers, GELU) and a linear head on the
    mean token, or (causal) an input projection, the encoder causally masked and the head on
    the last token."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.proj = nn.Linear(64, 64) if causal else None
        layer = nn.TransformerEncoderLayer(64, nhead=4, dim_feedforward=128, dropout=0.1, activation="gelu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(x.size(1), device=x.device)
            return self.head(self.encoder(self.proj(x), mask=mask, is_causal=True)[:, -1])
        return self.head(self.encoder(x).mean(1))


def build(case: str, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    if case == "mlp":
        # branches scaled so the residual stream stays O(10) over 64 blocks (at 0.5 it reaches
        # 1e4, where float32's spacing exceeds the default eps and HZO refuses it)
        model = deep_mlp(64, 128, residual=True, din=128, dout=10, dtype=torch.float32, residual_scale=0.25)
        x = torch.randn(batch, 128)
    elif case in ("encoder", "causal"):  # torch's own encoder as users build it, with a linear head
        model = EncoderClassifier(causal=case == "causal").eval()
        x = torch.randn(batch, 16, 64)
    elif case == "vit":
        import timm  # a test dependency (pyproject's test extra)
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()
        x = torch.randn(batch, 3, 32, 32)
    else:
        model = DeepZeroResNet().eval()
        with torch.no_grad():  # trained-looking BN statistics, not the identity at init
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.1, 0.1)
        x = torch.randn(batch, 3, 32, 32)
    return model, x, torch.randint(0, 10, (batch,))


def traced_vs_vocabulary(batch: int, threads: int, repeats: int) -> dict:
    """DeepZero's ResNet-20 as its authors wrote it (traced) against hzo_ext.models.resnet20_cifar
    (our vocabulary, nn.Sequential of stages): default estimates, interleaved."""
    torch.set_num_threads(threads)
    loss = nn.CrossEntropyLoss()
    traced, x, y = build("resnet20", batch)
    torch.manual_seed(0)
    vocab = resnet20_cifar()
    ests = {"deepzero_traced": hzo_ext.HZO(traced, loss), "resnet20_cifar": hzo_ext.HZO(vocab, loss)}
    for est in ests.values():
        est.backward(x, y)
    t = time_round_robin({k: (lambda e=e: e.backward(x, y)) for k, e in ests.items()}, repeats)
    row = {"case": "traced_vs_vocabulary", "batch": batch, "threads": threads,
           **{f"{k}_s": v for k, v in t.items()},
           "traced_over_vocabulary": t["deepzero_traced"] / t["resnet20_cifar"],
           **{f"{k}_fd_layer_evals": e.last_stats.fd_layer_evals for k, e in ests.items()}}
    print(json.dumps(row), flush=True)
    return row


def min_cosine(model, loss, x, y) -> float:
    ref = hzo_ext.reference_named_grads(model, loss, x, y)
    model.zero_grad(set_to_none=True)
    hzo_ext.HZO(model, loss).backward(x, y)
    return min(hzo_ext.per_parameter_cosine(hzo_ext.named_grads(model), ref).values())


class DeepZeroCGE:
    """DeepZero's coordinate-wise gradient estimate with feature reuse: for each parameter
    coordinate w_k of stage l, one query (w_k + mu) through stages l..L from the clean a_{l-1},
    g_k = (loss(w + mu e_k) - loss(w)) / mu."""

    def __init__(self, model, loss, mu: float = 5e-3):
        self.stages, self.loss, self.mu = hzo_ext.stages.as_stages(model), loss, mu

    @torch.no_grad()
    def seconds_per_layer(self, x, y, sample: int = 4) -> list[tuple[int, float]]:
        acts = [x]
        for s in self.stages:
            acts.append(s(acts[-1]))
        base = self.loss(acts[-1], y)
        out = []
        for l, stage in enumerate(self.stages):
            params = [p for p in stage.parameters() if p.requires_grad]
            n = sum(p.numel() for p in params)
            if not n:
                continue
            t0 = time.perf_counter()
            for k in range(sample):  # coordinate k of the first parameter tensor
                p = params[0].view(-1)
                old = p[k].item()
                p[k] = old + self.mu
                a = acts[l]
                for s in self.stages[l:]:
                    a = s(a)
                _ = (self.loss(a, y) - base) / self.mu
                p[k] = old
            out.append((n, (time.perf_counter() - t0) / sample))
        return out


def time_round_robin(fns: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_memory(case: str, batch: int, threads: int) -> dict:
    """Peak RSS growth (sampled from /proc/self/statm) of the first and the second default
    estimate in a fresh process, and the plan's prediction."""
    code = f"""
import json, os, sys, threading, time, torch, hzo_ext
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_default import build
torch.set_num_threads({threads})
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
model, x, y = build({case!r}, {batch})
est = hzo_ext.HZO(model, torch.nn.CrossEntropyLoss())
plan = est.plan(x)
peak, done = [0], [False]
def poll():  # the resident set, sampled every 0.2 ms while the estimate runs
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(2e-4)
out = {{"predicted": plan.predicted_peak_bytes}}
for call in ("first", "second"):
    before = rss()
    peak[0], done[0] = before, False
    t = threading.Thread(target=poll)
    t.start()
    est.backward(x, y)
    done[0] = True
    t.join()
    out[call] = peak[0] - before
    model.zero_grad(set_to_none=True)
print(json.dumps(out))
"""
    # glibc keeps freed blocks below its mmap threshold (which rises to 32 MB after frees) in the
    # heap, so the resident set would show allocator reuse, not live tensors: allocations of 64 KiB
    # and more are mapped and unmapped each time here.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(case: str, batch: int, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    model, x, y = build(case, batch)
    loss = nn.CrossEntropyLoss()
    cos = min_cosine(model, loss, x, y)
    est, bp = hzo_ext.HZO(model, loss), hzo_ext.Backprop(model, loss)
    in_python = hzo_ext.HZO(model, loss, executor="python")  # the same engine, its Python version
    est.backward(x, y)  # warm: one-time checks
    in_python.backward(x, y)
    plan = est.plan(x)
    t = time_round_robin({"hzo": lambda: est.backward(x, y), "backprop": lambda: bp.backward(x, y),
                          "python": lambda: in_python.backward(x, y)}, repeats)
    row = {"case": case, "batch": batch, "threads": threads, "hzo_s": t["hzo"], "backprop_s": t["backprop"],
           "hzo_over_backprop": t["hzo"] / t["backprop"], "min_param_cosine": cos, "engine": est.engine,
           "executor": est.executor, "python_engine_s": t["python"], "python_over_cpp": t["python"] / t["hzo"],
           "fd_layer_evals": est.last_stats.fd_layer_evals}
    if case == "resnet20":
        per_layer = DeepZeroCGE(copy.deepcopy(model), loss).seconds_per_layer(x, y)
        row["deepzero_cge_s"] = sum(n * s for n, s in per_layer)
        row["deepzero_queries"] = sum(n for n, _ in per_layer)
        row["deepzero_over_hzo"] = row["deepzero_cge_s"] / t["hzo"]
    mem = measure_memory(case, batch, threads)
    row["predicted_mib"] = mem["predicted"] / 2**20
    row["rss_growth_first_call_mib"] = mem["first"] / 2**20  # includes the one-time sample checks
    row["rss_growth_mib"] = mem["second"] / 2**20
    row["measured_over_predicted"] = mem["second"] / mem["predicted"]
    print(json.dumps(row), flush=True)
    del plan
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = [r for r in rows if "hzo_over_backprop" in r]
    labels = [f"{r['case']}\nbatch {r['batch']}" for r in rows]
    at = range(len(rows))
    ax.bar([i - 0.2 for i in at], [r["hzo_over_backprop"] for r in rows], width=0.4, color="tab:blue",
           label=f"default HZO ({rows[0]['executor']}) / backprop" if rows else "")
    ax.bar([i + 0.2 for i in at], [r["python_engine_s"] / r["backprop_s"] for r in rows], width=0.4,
           color="tab:orange", label="same engine in Python / backprop")
    for i, r in enumerate(rows):
        ax.text(i - 0.2, r["hzo_over_backprop"], f"{r['hzo_over_backprop']:.1f}x", ha="center", va="bottom",
                fontsize=8)
        ax.text(i + 0.2, r["python_engine_s"] / r["backprop_s"], f"{r['python_engine_s'] / r['backprop_s']:.1f}x",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(at), labels)
    ax.legend(fontsize=8, loc="upper left")
    ax.axhline(8, color="gray", ls=":", lw=1)
    ax.axhline(20, color="gray", ls="--", lw=1)
    ax.set_ylabel("time of one estimate / backprop")
    ax.set_yscale("log")
    ax.set_title("default HZO estimate vs backprop (CPU; targets: 8x mlp, 20x resnet20)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["mlp", "resnet20", "vit", "encoder", "causal", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "default_cpu"))
    args = ap.parse_args(argv)
    configs = []
    if args.case in ("mlp", "all"):
        configs += [("mlp", 32, 1), ("mlp", 256, 1)]
    if args.case in ("resnet20", "all"):
        configs += [("resnet20", 256, 2)]
    if args.case in ("vit", "all"):
        configs += [("vit", 32, 1)]
    if args.case in ("encoder", "all"):
        configs += [("encoder", 32, 1)]
    if args.case in ("causal", "all"):
        configs += [("causal", 32, 1)]
    rows = [bench(c, b, t, args.repeats) for c, b, t in configs]
    if args.case in ("resnet20", "all"):
        rows.append(traced_vs_vocabulary(64, 2, args.repeats))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        f.write(f"# python benchmarks/bench_default.py --case {args.case} --repeats {args.repeats}  "
                f"({platform.processor() or platform.machine()}, torch {torch.__version__})\n")
        w = csv.DictWriter(f, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(rows)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
