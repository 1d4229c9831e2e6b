"""Demo: the paper's MLP (64-256-10) on scikit-learn digits, trained with BP, FA and DFA.

    python examples/digits.py [--epochs 25] [--seeds 3]

Prints the plan, a per-epoch progress line, test accuracy (mean ± std over seeds) and the
alignment metrics of the FA model. Data: sklearn's bundled digits (1797 8x8 images), fixed split.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import salcompile
from salcompile.models import MLP


def digits(seed: int = 0):
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return 100 * acc


def train(feedback: str, seed: int, epochs: int, lr: float, batch: int, log: bool):
    (xtr, ytr), (xte, yte) = digits()
    torch.manual_seed(seed)
    sal = salcompile.transform(MLP(64, 256, 10), (xtr[:2],), feedback=feedback, feedback_seed=seed)
    opt = torch.optim.Adam(sal.parameters(), lr=lr)
    for epoch in range(epochs):
        order = torch.randperm(len(xtr))
        for i in range(0, len(xtr), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(sal(xtr[idx]), ytr[idx]).backward()
            opt.step()
        if log:
            print(f"\r  {feedback:3s} seed {seed} epoch {epoch + 1:2d}/{epochs}  "
                  f"test acc {accuracy(sal, xte, yte):5.1f}%", end="", flush=True)
    if log:
        print()
    return sal, accuracy(sal, xte, yte), (xtr[:256], ytr[:256])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    (xtr, _), _ = digits()
    print(salcompile.plan(MLP(64, 256, 10), (xtr[:2],)))
    rows = []
    for feedback in ("bp", "fa", "dfa"):
        t0, accs = time.time(), []
        for seed in range(args.seeds):
            sal, acc, batch = train(feedback, seed, args.epochs, args.lr, args.batch, log=True)
            accs.append(acc)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append((feedback, statistics.mean(accs), sd, time.time() - t0))
        if feedback == "fa":
            x, y = batch
            wa = salcompile.metrics.weight_alignment(sal)
            ga = salcompile.metrics.gradient_alignment(sal, lambda o: F.cross_entropy(o, y), x)
            print("  FA alignment after training (degrees):")
            for name in wa:
                print(f"    {name:18s} angle(W, B) {wa[name]:5.1f}   angle(FA update, BP grad) "
                      f"{ga[name]:5.1f}")
    print(f"\nscikit-learn digits, MLP 64-256-10, Adam lr {args.lr}, batch {args.batch}, "
          f"{args.epochs} epochs, {args.seeds} seeds")
    print(f"{'feedback':10s}{'test acc %':>16s}{'time s':>9s}")
    for fb, mean, sd, secs in rows:
        print(f"{fb:10s}{mean:9.2f} ± {sd:4.2f}{secs:9.1f}")


if __name__ == "__main__":
    main()
