"""A model written as its authors wrote it, traced, against the same network family built from
hzo_ext's stages: DeepZero's ResNet-20 (``hzo_ext.models.DeepZeroResNet``: BatchNorm in eval
mode, functional ReLU, option-A shortcuts, traced by torch.fx) and ``hzo_ext.models.resnet20_cifar``
(an nn.Sequential of ResidualBlock stages). One HZO estimate each (default executor, SPP on),
interleaved round by round, with backprop on each for scale; accuracy as the minimum
per-parameter-tensor cosine against float64 autograd.

    python benchmarks/bench_traced.py [--batch 4] [--repeats 3] [--split chain] [--threads 2]
    -> benchmarks/results/traced_resnet20.{csv,png}
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import hzo_ext
from hzo_ext.models import DeepZeroResNet, resnet20_cifar
from hzo_ext.apps.results import write_csv

OUT = Path(__file__).parent / "results" / "traced_resnet20"


def _bn_as_trained(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their initial values (as after training)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--split", default="chain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"deepzero_traced": _bn_as_trained(DeepZeroResNet()).eval(), "resnet20_cifar_stages": resnet20_cifar()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    rows = {}
    for name, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = hzo_ext.HZO(model, loss_fn, split=args.split)
            plan = est.plan(x)
        rows[name] = dict(model=name, stages=plan.num_stages, probes=plan.probes, queries=plan.fd_layer_evals,
                          dense_splits=sum(s.dense for s in plan.splits), executor=est.executor, hzo_s=[], bp_s=[],
                          est=est)
    for _ in tqdm(range(args.repeats), desc="rounds (all models in each)"):
        for name, model in models.items():
            r = rows[name]
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            r["est"].backward(x, y)
            r["hzo_s"].append(time.perf_counter() - t0)
            r["python_calls"] = r["est"].last_stats.forward_calls
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss_fn(model(x), y).backward()
            r["bp_s"].append(time.perf_counter() - t0)
    for name, model in models.items():  # accuracy of the last estimate against float64 autograd
        model.zero_grad(set_to_none=True)
        rows[name]["est"].backward(x, y)
        cos = hzo_ext.per_parameter_cosine(hzo_ext.named_grads(model),
                                           hzo_ext.reference_named_grads(model, loss_fn, x, y))
        rows[name]["min_param_cosine"] = round(min(cos.values()), 6)
    out = []
    for r in rows.values():
        r.pop("est")
        hzo_s, bp_s = statistics.median(r.pop("hzo_s")), statistics.median(r.pop("bp_s"))
        out.append(dict(r, batch=args.batch, split=args.split, threads=args.threads, hzo_median_s=round(hzo_s, 4),
                        backprop_median_s=round(bp_s, 5), hzo_over_backprop=round(hzo_s / bp_s, 1)))
    base = out[1]["hzo_median_s"]
    for r in out:
        r["time_vs_resnet20_cifar"] = round(r["hzo_median_s"] / base, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.out.with_suffix(".csv"), out,
              comment=f"python benchmarks/bench_traced.py --batch {args.batch} --repeats {args.repeats} "
                      f"--split {args.split} --threads {args.threads}; CPU, {torch.__version__}")
    for r in out:
        print(r)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["model"] for r in out]
    axes[0].bar(names, [r["hzo_median_s"] for r in out])
    axes[0].set_ylabel("one HZO estimate, median s")
    axes[1].bar(names, [r["probes"] for r in out])
    axes[1].set_ylabel("probes")
    fig.suptitle(f"ResNet-20, batch {args.batch}, split={args.split}, {args.threads} threads (CPU)")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)


if __name__ == "__main__":
    main()
