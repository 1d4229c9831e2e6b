"""Example: the paper's MLP (64-256-10) on scikit-learn digits, dense (BP, FA, DFA) and SAL-16,
through the library's experiment runner (what `python -m salcompile train` uses).

    python examples/digits.py [--epochs 25] [--seeds 3] [--lr 3e-3]
"""
from __future__ import annotations

import argparse
import warnings

import salcompile
from salcompile import SALConfig
from salcompile.experiment import run_experiment
from salcompile.training import Recipe

VARIANTS = [
    ("BP", dict(feedback="bp", areas=1)),
    ("FA", dict(feedback="fa", areas=1)),
    ("DFA", dict(feedback="dfa", areas=1)),
    ("SAL-16 partition + FA", dict(areas=16)),
    ("SAL-16 replicate + FA", dict(areas=16, area_mode="replicate")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    recipe = Recipe(optimizer="adam", lr=args.lr, batch=args.batch, epochs=args.epochs)
    rows = []
    for label, fields in VARIANTS:
        result = run_experiment("mlp", "digits", SALConfig(**fields), recipe, seeds=args.seeds,
                                alignment=fields.get("feedback") == "fa", log=None)
        last = [run.records[-1] for run in result.runs]
        balance = [r.routing_balance for r in last if r.routing_balance is not None]
        align = [r.alignment for r in last if r.alignment is not None]
        rows.append((label, result.mean, result.std,
                     f"{sum(balance) / len(balance):.3f}" if balance else "-",
                     f"{sum(align) / len(align):.1f}°" if align else "-"))
    print(salcompile.plan(salcompile.models.build("mlp"), (salcompile.models.example_input("mlp"),)))
    print(f"\nscikit-learn digits, MLP 64-256-10, {recipe}, {args.seeds} seeds "
          f"(the paper's SAL-16: 71.63%)")
    print(f"{'variant':24s}{'test acc %':>16s}{'routing balance':>17s}{'FA alignment':>14s}")
    for label, mean, sd, bal, align in rows:
        print(f"{label:24s}{mean:9.2f} ± {sd:4.2f}{bal:>17s}{align:>14s}")


if __name__ == "__main__":
    main()
