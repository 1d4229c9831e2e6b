"""Per-area bias gradients of the compact linear backward on CPU: index_add_ over the rows (what
salcompile/ops/compact.py uses on CPU, float32/64) beside a grouped matmul with a ones column
(what it used before, and still uses on CUDA), alone and inside the large-batch partition step.

    python benchmarks/compact_bias_grad.py [--threads 2] [--rounds 16]

Prints a table and writes benchmarks/results/compact_bias_grad.md. Both forms run side by side
in one process, interleaved rounds, medians."""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import timeit
from pathlib import Path

import torch
import torch.nn.functional as F

import salcompile
from salcompile.files import atomic_write_text
from salcompile.models import DeepMLP
from salcompile.ops import compact


def alone(rows: int, areas: int, width: int, rounds: int) -> tuple:
    """µs per call of each form, and their largest difference."""
    g = torch.randn(rows, width)
    area = torch.randint(0, areas, (rows,)).sort().values
    offs = torch.bincount(area, minlength=areas).cumsum(0).to(torch.int32)

    def grouped():
        return F.grouped_mm(g.t(), g.new_ones(rows, 4), offs=offs)[..., 0]

    def index_add():
        return compact._segment_sum(g, area, areas)

    diff = (grouped() - index_add()).abs().max().item()
    times = {grouped: [], index_add: []}
    for _ in range(rounds):
        for f in times:
            times[f].append(min(timeit.repeat(f, number=20, repeat=3)) / 20 * 1e6)
    return statistics.median(times[grouped]), statistics.median(times[index_add]), diff


def in_step(rounds: int) -> tuple:
    """ms per SGD step of the partition K=16 model of step_time.py (256 -> 5 x 1024 -> 256,
    4096 rows), with each form."""
    torch.manual_seed(0)
    x, y = torch.randn(4096, 256), torch.randint(0, 256, (4096,))
    sal = salcompile.transform(DeepMLP(256, 1024, 256, depth=6), (x,), feedback="fa", areas=16,
                               area_mode="partition")
    opt = torch.optim.SGD(sal.parameters(), lr=1e-3)
    real = compact._segment_sum_ok
    forms = {"grouped matmul": lambda v: False, "index_add_": real}
    times = {k: [] for k in forms}

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(sal(x), y).backward()
        opt.step()
    try:
        for _ in range(rounds):
            for k, ok in forms.items():
                compact._segment_sum_ok = ok
                step()   # one untimed step after the switch
                t0 = time.perf_counter()
                step()
                times[k].append((time.perf_counter() - t0) * 1e3)
    finally:
        compact._segment_sum_ok = real
    return statistics.median(times["grouped matmul"]), statistics.median(times["index_add_"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "compact_bias_grad.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["# Per-area bias gradients on CPU: index_add_ vs a grouped matmul with ones", "",
             f"- command: `python benchmarks/compact_bias_grad.py --threads {args.threads} "
             f"--rounds {args.rounds}`",
             f"- torch {torch.__version__}, Python {platform.python_version()}, threads "
             f"{torch.get_num_threads()}; medians of {args.rounds} interleaved rounds", "",
             "| case | grouped matmul | index_add_ | ratio | max abs difference |",
             "|---|---|---|---|---|"]
    for width in (64, 256):
        gm, ia, diff = alone(4096, 16, width, args.rounds)
        lines.append(f"| alone: 4096 rows, 16 areas, width {width} (µs) | {gm:.0f} | {ia:.0f} | "
                     f"{ia / gm:.2f} | {diff:.1e} |")
    gm, ia = in_step(args.rounds)
    lines.append(f"| partition K=16 SGD step, 256 -> 5 x 1024 -> 256, 4096 rows (ms) | {gm:.1f} | "
                 f"{ia:.1f} | {ia / gm:.2f} | |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
