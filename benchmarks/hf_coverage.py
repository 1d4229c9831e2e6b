"""What salcompile does to real architectures: per Hugging Face model (tiny configs, random
weights, built offline by tests/hf_models.py) and per zoo model (its tiny version), the layers that
train by a feedback rule, the parameters with a local gradient, those left on backprop, and the
SAL regions at areas=4 (default regions; zoo entries with their own SAL settings).

    python benchmarks/hf_coverage.py [--areas 4]

Prints a table and writes benchmarks/results/hf_coverage.md. Needs `transformers` (dev extra).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import salcompile  # noqa: E402
from salcompile.files import atomic_write_text  # noqa: E402


def row(name, build, areas, overrides=None):
    model, inputs, _, _ = build()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dense = salcompile.transform(model, example_inputs=inputs, areas=1)
            gated = salcompile.transform(model, example_inputs=inputs,
                                         **{**(overrides or {}), "areas": areas})
    except salcompile.SalcompileError as exc:
        return [name, "-", "-", "-", "-", "-", "-", f"refused: {str(exc)[:90]}..."]
    seconds = time.perf_counter() - t0
    plan = dense.sal_plan
    roles = list(plan.roles.values())
    composed = sum(1 for l in plan.layers if l.constituents)
    grouped = sum(1 for l in plan.layers if l.op == "grouped_mm")
    notes = "; ".join(gated.sal_plan.notes) if getattr(gated.sal_plan, "notes", None) else ""
    return [name, str(len(plan.layers)), f"{composed} / {grouped}", str(roles.count("local")),
            str(roles.count("backprop")), str(len(gated.sal_plan.regions)), f"{seconds:.1f}",
            notes[:90]]


def zoo_builders():
    from salcompile.models import REGISTRY, build, example_input

    def builder(name):
        entry = REGISTRY[name]

        def make():
            torch.manual_seed(0)
            model = build(name, **entry.tiny)
            return model, (example_input(name, batch=3, **entry.tiny),), None, None
        return make
    return {f"zoo:{n}": (builder(n), REGISTRY[n].sal) for n in REGISTRY}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--areas", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("SALCOMPILE_STRICT_AUDIT", "1")   # a missed weight use is an error
    import hf_models
    header = ["model", "FA layers", "composed / grouped_mm", "local params", "backprop params",
              f"regions (areas={args.areas})", "transform s (both)", "notes"]
    builders = {**{n: (b, None) for n, b in hf_models.BUILDERS.items()}, **zoo_builders()}
    rows = [row(name, build, args.areas, sal) for name, (build, sal) in builders.items()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = Path(__file__).resolve().parent / "results" / "hf_coverage.md"
    atomic_write_text(out, "# Real architectures: coverage\n\n`python benchmarks/hf_coverage.py"
                      f" --areas {args.areas}` (torch {torch.__version__}, one thread)\n\n"
                      + table + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
