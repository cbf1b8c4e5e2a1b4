"""The small CNN (hzo_ext.models.digits_cnn) trained on scikit-learn's digits with HZO+SPP and
with backprop, same settings; fails (exit 1) when HZO's test accuracy, averaged over the last
--last epochs, is more than --max-gap points below backprop's (one epoch's accuracy on the 360
test images moves by 2-4 points from epoch to epoch for either estimator).

    python benchmarks/train_digits_cnn.py     # -> benchmarks/results/digits_cnn_training.csv (+ runs/ folders)

Both runs are `hzo-ext train --model cnn --lr 1e-2 --epochs 15` (Adam, batch 32, seed 0,
split bisect: HZO probes the conv splits with SPP, the pool split channelwise, the Linear
split densely); CI runs this script.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--max-gap", type=float, default=3.0, help="percentage points")
    ap.add_argument("--last", type=int, default=5, help="epochs the compared accuracy is averaged over")
    ap.add_argument("--out", default="runs/digits_cnn")
    args = ap.parse_args()
    from hzo_ext.apps.results import write_csv
    from hzo_ext.apps.train import TrainConfig, train

    rows = []
    for estimator in ("hzo", "bp"):
        cfg = TrainConfig(out=os.path.join(args.out, estimator), estimator=estimator, model="cnn", lr=args.lr,
                          epochs=args.epochs)
        t0 = time.perf_counter()
        final = train(cfg)
        with open(os.path.join(cfg.out, "metrics.csv")) as f:
            accs = [float(r["test_acc"]) for r in csv.DictReader(line for line in f if not line.startswith("#"))]
        last = statistics.mean(accs[-args.last:])
        rows.append(dict(estimator=estimator, model="cnn", epochs=args.epochs, lr=args.lr,
                         test_acc=final["test_acc"], mean_test_acc_last=last, last_epochs=args.last,
                         seconds=time.perf_counter() - t0))
        print(f"{estimator}: test_acc={final['test_acc']:.4f}, mean of the last {args.last} epochs {last:.4f}",
              flush=True)
    write_csv(os.path.join(HERE, "results", "digits_cnn_training.csv"), rows,
              comment=f"python benchmarks/train_digits_cnn.py --epochs {args.epochs} --lr {args.lr} --last {args.last}")
    gap = 100 * (rows[1]["mean_test_acc_last"] - rows[0]["mean_test_acc_last"])
    print(f"mean test accuracy over the last {args.last} epochs: HZO+SPP {rows[0]['mean_test_acc_last']:.4f}, "
          f"backprop {rows[1]['mean_test_acc_last']:.4f}: backprop - HZO = {gap:.2f} points (allowed {args.max_gap})")
    return 0 if gap <= args.max_gap else 1


if __name__ == "__main__":
    sys.exit(main())
