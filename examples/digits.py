"""Demo: the paper's MLP (64-256-10) on scikit-learn digits, dense (BP, FA, DFA) and SAL-16.

    python examples/digits.py [--epochs 25] [--seeds 3] [--lr 3e-3]

Prints the SAL plan, a per-epoch progress line, test accuracy (mean ± std over seeds), the
routing balance of the SAL models and the alignment metrics of the FA model.
Data: sklearn's bundled digits (1797 8x8 images), fixed 80/20 split.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import salcompile
from salcompile.data import digits
from salcompile.models import MLP
from salcompile.training import Recipe, fit

VARIANTS = [
    ("BP", dict(feedback="bp", areas=1)),
    ("FA", dict(feedback="fa", areas=1)),
    ("DFA", dict(feedback="dfa", areas=1)),
    ("SAL-16 partition + FA", dict(areas=16)),
    ("SAL-16 replicate + FA", dict(areas=16, area_mode="replicate")),
]


def train(label, overrides, seed, args, train_set, test_set):
    torch.manual_seed(seed)
    sal = salcompile.transform(MLP(64, 256, 10), (train_set[0][:2],), feedback_seed=seed,
                               routing_seed=seed, **overrides)

    def progress(rec):
        print(f"\r  {label:22s} seed {seed} epoch {rec.epoch:2d}/{args.epochs}  test acc "
              f"{rec.test_acc:5.1f}%", end="", file=sys.stderr, flush=True)

    recipe = Recipe(optimizer="adam", lr=args.lr, epochs=args.epochs, batch=args.batch)
    records = fit(sal, train_set, test_set, recipe, seed=seed, on_epoch=progress)
    return sal, records[-1].test_acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    train_set, test_set = digits()
    print(salcompile.plan(MLP(64, 256, 10), (train_set[0][:2],)))
    rows = []
    for label, overrides in VARIANTS:
        t0, accs, balance = time.time(), [], []
        for seed in range(args.seeds):
            sal, acc = train(label, overrides, seed, args, train_set, test_set)
            accs.append(acc)
            if sal.sal_plan.regions:
                balance.append(salcompile.routing_stats(sal)["gate_0"]["balance"])
        print(file=sys.stderr)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        bal = f"{statistics.mean(balance):.3f}" if balance else "-"
        rows.append((label, statistics.mean(accs), sd, bal, time.time() - t0))
        if label == "FA":
            x, y = train_set[0][:256], train_set[1][:256]
            wa = salcompile.metrics.weight_alignment(sal)
            ga = salcompile.metrics.gradient_alignment(sal, lambda o: F.cross_entropy(o, y), x)
            print("  FA alignment after training (degrees):")
            for name in wa:
                print(f"    {name:18s} angle(W, B) {wa[name]:5.1f}   angle(FA update, BP grad) "
                      f"{ga[name]:5.1f}")
    print(f"\nscikit-learn digits, MLP 64-256-10, Adam lr {args.lr:g}, batch {args.batch}, "
          f"{args.epochs} epochs, {args.seeds} seeds (the paper's SAL-16: 71.63%)")
    print(f"{'variant':24s}{'test acc %':>16s}{'routing balance':>17s}{'time s':>9s}")
    for label, mean, sd, bal, secs in rows:
        print(f"{label:24s}{mean:9.2f} ± {sd:4.2f}{bal:>17s}{secs:9.1f}")


if __name__ == "__main__":
    main()
