"""Per-stage cosine of HZO against float64 autograd (min over stages) for the configurations of
docs/estimator.md.

    python benchmarks/accuracy_figures.py

Prints one line per configuration; uses the same builders as python_tests/ and the package's
scale-free ``hzo_ext.per_layer_cosine``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_tests"))
import hzo_ext  # noqa: E402
from _models import batch, min_cosine, mlp  # noqa: E402

CE = nn.CrossEntropyLoss


def main() -> None:
    x64, y64 = batch()
    print("float64, width 8, batch 4, eps 1e-3: min over depths {1,2,3,5,8,13,64} of min-stage cosine")
    for act in ("linear", "tanh", "gelu"):
        for residual in (False, True):
            for split in ("bisect", "chain"):
                worst = min(min_cosine(m, CE(), x64, y64, hzo_ext.HZO(m, CE(), split=split))
                            for m in (mlp(d, 8, act, residual) for d in (1, 2, 3, 5, 8, 13, 64)))
                print(f"  {act:6s} {'residual' if residual else 'plain':8s} {split:6s}  {worst:.12f}")
    x, y = batch(8, 16, 10, dtype=torch.float32)
    print("float32, depth 64 (66 stages), width 128, batch 8, eps 1e-3")
    configs = [
        ("residual gain 0.25", dict(residual=True, residual_scale=0.25), {}),
        ("residual gain 0.5 ", dict(residual=True, residual_scale=0.5), {}),
        ("residual gain 0.5 ", dict(residual=True, residual_scale=0.5), dict(eps_mode="relative")),
        ("plain GELU Kaiming", dict(residual=False), {}),
        ("plain GELU Kaiming", dict(residual=False), dict(query_dtype=torch.float64)),
    ]
    for name, model_kw, est_kw in configs:
        model = mlp(64, 128, "gelu", din=16, dout=10, dtype=torch.float32, **model_kw)
        for split in ("bisect", "chain"):
            est = hzo_ext.HZO(model, CE(), split=split, **est_kw)
            ref = hzo_ext.reference_grads(model, CE(), x, y)
            model.zero_grad(set_to_none=True)
            est.backward(x, y)
            cos = hzo_ext.per_layer_cosine(model, hzo_ext.grads_of(model), ref)
            bad = sum(c < 0.999 for c in cos)
            opts = ", ".join(f"{k}={v}" for k, v in est_kw.items()) or "defaults"
            print(f"  {name} {split:6s} {opts:28s} min {min(cos):+.6f}  stages below 0.999: {bad}/{len(cos)}")


if __name__ == "__main__":
    main()
