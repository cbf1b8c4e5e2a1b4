"""The ``hzo-ext`` command (also ``python -m hzo_ext``): train, bench, cosine, info."""
from __future__ import annotations

import argparse
import os
import sys
import time


def _train_parser(sub) -> None:
    from .train import DATASETS, DISTRIBUTED, ESTIMATORS, MODELS, RESUMABLE, TrainConfig
    d = TrainConfig(out="")
    p = sub.add_parser("train", help="train a model with HZO (default: residual MLP on digits, CPU)")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/<timestamp>); one run at a time (a second is refused), and a "
                        "folder that holds a checkpoint only with --resume")
    changeable = ", ".join("--" + n.replace("_", "-") for n in RESUMABLE)
    p.add_argument("--resume", action="store_true",
                   help=f"continue the run in --out from its last checkpoint; only {changeable} may differ from "
                        "the run's options (a new --lr applies from the resumed epoch on), any other difference is "
                        "refused")
    p.add_argument("--estimator", default=d.estimator, help=f"one of {', '.join(ESTIMATORS)}")
    p.add_argument("--split", default=d.split, help="auto (op-level, the default), bisect or chain")
    p.add_argument("--eps", type=float, default=d.eps)
    p.add_argument("--model", default=d.model, help=f"one of {', '.join(MODELS)}")
    p.add_argument("--width", type=int, default=d.width,
                   help="resmlp: hidden width (64); cnn / resnet20: channels of the first stage (8 / 16)")
    p.add_argument("--depth", type=int, default=d.depth, help="residual blocks of resmlp")
    p.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (python pickle batches)")
    p.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--optimizer", default=d.optimizer, help="adam or sgd")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--cosine-every", type=int, default=d.cosine_every,
                   help="steps between per-layer cosine checks against backprop on a held batch")
    p.add_argument("--distributed", default=d.distributed,
                   help=f"{', '.join(DISTRIBUTED)}; under torchrun: dp (each rank its block of every batch) or qp (each rank its block "
                        "of the probes); auto: dp under torchrun, else none (docs/distributed.md)")


def _run_train(args) -> int:
    from .train import TrainConfig, train, validate
    fields = {k: v for k, v in vars(args).items() if k not in ("command",)}
    if fields["out"] is None:
        if fields["resume"]:
            raise ValueError("--resume needs --out DIR (the run to continue)")
        fields["out"] = time.strftime("runs/%Y%m%d-%H%M%S")
    cfg = TrainConfig(**fields)
    validate(cfg)
    lead = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    if lead:
        print(f"hzo-ext train: writing to {cfg.out}", flush=True)
    final = train(cfg)
    if lead:
        print(f"final test_acc={final['test_acc']:.4f} ({cfg.estimator}); outputs in {cfg.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hzo-ext", description="Hierarchical zeroth-order gradient estimation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build diagnostics: torch/CUDA versions, kernels present")
    _train_parser(sub)
    from . import bench, cosine_study
    bench.add_arguments(sub.add_parser("bench", help="time and queries against depth: HZO, CGE, SPSA, backprop"))
    cosine_study.add_arguments(sub.add_parser("cosine", help="per-layer cosine against depth, activation, dtype"))
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            from ..info import format_info
            print(format_info())
            return 0
        if args.command == "bench":
            from .bench import run
            run(args)
            return 0
        if args.command == "cosine":
            from .cosine_study import run
            run(args)
            return 0
        return _run_train(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: one line, exit code 2, no traceback
        print(f"hzo-ext {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
