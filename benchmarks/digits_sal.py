"""SAL-16 on scikit-learn digits, the paper's MLP (64-256-10): accuracy and routing balance.

    python benchmarks/digits_sal.py [--epochs 25] [--seeds 3] [--out runs/digits_sal.md]

A run writes runs/digits_sal.md (under the working directory) unless --out is given; the
committed results are refreshed only on purpose: --out benchmarks/results/digits_sal.md.

Each row trains from scratch for every seed (the seed draws the initial weights, B, the gate's
prototypes and the batch order; the train/test split is fixed) and reports the final test
accuracy, mean ± std over seeds. Routing columns are measured on the test set after training:
areas that received a test sample, balance = normalised entropy of the area fractions (1 = even,
0 = one area), max load = busiest area's share × K (1 = even, 16 = collapsed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

import salcompile
from salcompile.data import digits
from salcompile.models import MLP
from salcompile.training import Recipe, accuracy, fit

RECIPE = dict(optimizer="adam", lr=3e-3, batch=16)
PAPER_RECIPE = dict(optimizer="sgd", lr=1e-4, batch=16)
# (label, config overrides, training recipe, the paper's figure)
VARIANTS = [
    ("BP dense", dict(feedback="bp", areas=1), RECIPE, None),
    ("FA dense", dict(areas=1), RECIPE, None),
    ("SAL-16 partition + FA", dict(areas=16), RECIPE, 71.63),
    ("SAL-16 partition + FA, no balance term", dict(areas=16, balance_weight=0.0), RECIPE, None),
    ("SAL-16 replicate + FA", dict(areas=16, area_mode="replicate"), RECIPE, None),
    ("SAL-16 partition + FA, paper's BP recipe", dict(areas=16), PAPER_RECIPE, 71.63),
    ("BP dense, paper's BP recipe", dict(feedback="bp", areas=1), PAPER_RECIPE, 38.53),
]


def run(overrides, recipe, seed, epochs, train, test, label):
    torch.manual_seed(seed)
    sal = salcompile.transform(MLP(64, 256, 10), (train[0][:2],), feedback_seed=seed,
                               routing_seed=seed, **overrides)

    def progress(rec):
        print(f"\r  {label:42s} seed {seed} epoch {rec.epoch:2d}/{epochs} test "
              f"{rec.test_acc:5.1f}%", end="", file=sys.stderr, flush=True)

    fit(sal, train, test, Recipe(epochs=epochs, **recipe), seed=seed, on_epoch=progress)
    acc, stats = accuracy(sal, *test), None
    if sal.sal_plan.regions:  # routing of the test set (accuracy() leaves the counts as they were)
        salcompile.reset_routing_stats(sal)
        sal.eval()
        with torch.no_grad():
            sal(test[0])
        stats = salcompile.routing_stats(sal)["gate_0"]
    return acc, stats


DEFAULT_OUT = os.path.join("runs", "digits_sal.md")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help=f"the results table (default: {DEFAULT_OUT}; the committed one is "
                         "benchmarks/results/digits_sal.md: pass it to refresh it)")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)  # tiny matmuls: one thread avoids OpenMP stalls on a busy CPU
    train, test = digits()
    print(salcompile.plan(MLP(64, 256, 10), (train[0][:2],), areas=16))
    rows = []
    for label, overrides, recipe, paper in VARIANTS:
        t0, accs, stats = time.time(), [], []
        for seed in range(args.seeds):
            acc, st = run(overrides, recipe, seed, args.epochs, train, test, label)
            accs.append(acc)
            stats.append(st)
        print(file=sys.stderr)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        route = "- | - | -"
        if stats[0] is not None:
            route = (f"{statistics.mean(s['active'] for s in stats):.1f} | "
                     f"{statistics.mean(s['balance'] for s in stats):.3f} | "
                     f"{statistics.mean(s['max_load'] for s in stats):.2f}")
        recipe_text = f"{recipe['optimizer']} lr {recipe['lr']:g}, batch {recipe['batch']}"
        rows.append(f"| {label} | {recipe_text} | {statistics.mean(accs):.2f} ± {sd:.2f} | "
                    f"{paper if paper is not None else '-'} | {route} | "
                    f"{time.time() - t0:.0f} |")
    header = ["| variant | recipe | test acc % | paper | areas used | balance | max load | time s |",
              "|---|---|---|---|---|---|---|---|"]
    table = "\n".join(header + rows)
    print(table)
    text = (f"# SAL-16 on scikit-learn digits (MLP 64-256-10)\n\n"
            f"Command: `python benchmarks/digits_sal.py --epochs {args.epochs} --seeds "
            f"{args.seeds}` (CPU, torch {torch.__version__}). {args.epochs} epochs, "
            f"{args.seeds} seeds, mean ± std; fixed 80/20 split (1438 train, 359 test). Routing "
            f"measured on the test set after training (mean over seeds). Default SALConfig "
            f"otherwise (route_dim 32, temperature 0.1, balance_weight 1.0, "
            f"feedback_scale match).\n\n{table}\n")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
