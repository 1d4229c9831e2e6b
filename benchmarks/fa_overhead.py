"""FA / DFA training-step time against backprop, measured side by side in one process.

    python benchmarks/fa_overhead.py [--repeats 30] [--compile]

One step = forward, backward, Adam step, on the MLP 784-1024-1024-10 at batch 256 (fp32, CPU) and
on LeNet-5 at batch 64. Prints medians and ratios to BP; writes benchmarks/results/fa_overhead.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import salcompile
from salcompile.models import MLP, LeNet5


def step_times(module, x, y, repeats: int):
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    times = []
    for i in range(repeats + 3):  # 3 warm-up steps
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), y).backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="also time salcompile.compile variants")
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = [("MLP 784-1024-1024-10, batch 256", lambda: MLP(784, 1024, 10, depth=3),
              torch.randn(256, 784), torch.randint(0, 10, (256,))),
             ("LeNet-5, batch 64", LeNet5, torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))]
    rows = []
    for name, make, x, y in cases:
        model = make()
        variants = [("plain model, BP", model)]
        for fb in ("bp", "fa", "dfa"):
            variants.append((f"salcompile {fb}", salcompile.transform(model, (x,), feedback=fb)))
        if args.compile:
            for fb in ("bp", "fa"):
                sal = salcompile.transform(model, (x,), feedback=fb)
                variants.append((f"salcompile {fb}, compiled", salcompile.compile(sal)))
        # Interleave repeats so drift on a shared machine hits every variant alike.
        results = {label: [] for label, _ in variants}
        for _ in range(3):
            for label, module in variants:
                results[label].append(step_times(module, x, y, args.repeats // 3 or 1))
        base = statistics.median(results["plain model, BP"])
        for label, _ in variants:
            ms = statistics.median(results[label])
            rows.append((name, label, ms, ms / base))
    lines = [f"# FA/DFA step time vs backprop ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__})", "",
             f"Command: `python benchmarks/fa_overhead.py --repeats {args.repeats}"
             f"{' --compile' if args.compile else ''}`", "",
             "| model | variant | median ms/step | vs plain BP |", "|---|---|---|---|"]
    lines += [f"| {m} | {v} | {ms:.2f} | {r:.2f} |" for m, v, ms, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "fa_overhead.md"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)


if __name__ == "__main__":
    main()
