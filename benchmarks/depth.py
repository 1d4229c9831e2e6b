"""Numerical consistency with depth: deep MLPs on digits under BP, FA, DFA, uSF, frSF, KP and
SAL-16.

    python benchmarks/depth.py [--depths 2,8,32,128] [--archs plain,res] [--epochs 10] [--seeds 1]
                               [--modes BP,FA,DFA,uSF,frSF,KP,SAL-16]

Every mode trains with Adam lr 1e-3, batch 16, except KP (Kolen-Pollack), which needs weight
decay on both W and B to align (salcompile/feedback/kp.py): AdamW lr 1e-3, weight decay 0.1, as
in benchmarks/paper_table2.py.

For each architecture (plain deep MLP, residual deep MLP), depth and mode: final test accuracy,
and, measured after training on 256 training samples, each layer's output RMS (activation norm),
each weight's last-epoch relative update ‖ΔW‖/‖W‖, and the NaN/inf count over all activations,
gradients-applied parameters and outputs. Writes benchmarks/results/depth.md, depth.json and
depth.png (per-layer activation RMS and update size at the largest depth).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.fx as fx

import salcompile
from salcompile.data import load
from salcompile.files import atomic_write_text
from salcompile.models import build
from salcompile.training import Recipe, fit

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = {"BP": dict(feedback="bp", areas=1), "FA": dict(feedback="fa", areas=1),
         "DFA": dict(feedback="dfa", areas=1), "uSF": dict(feedback="usf", areas=1),
         "frSF": dict(feedback="frsf", areas=1), "KP": dict(feedback="kp", areas=1),
         "SAL-16": dict(feedback="fa", areas=16)}
MODE_RECIPE = {"KP": dict(optimizer="adamw", weight_decay=0.1)}  # the rest: the common recipe
ARCHS = {"plain": "deep-mlp", "res": "deep-mlp-res"}


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the output of the named layer nodes."""

    def __init__(self, gm, names):
        super().__init__(gm)
        self.names, self.seen = set(names), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names and isinstance(out, torch.Tensor):
            self.seen[n.name] = out.detach()
        return out


def probe(sal, x):
    """(per-layer activation RMS, non-finite activation count) on a batch, in eval mode."""
    layers = sal.sal_plan.layers
    was = sal.training
    sal.eval()
    rec = _Recorder(sal, [l.node for l in layers])
    with torch.no_grad():
        out = rec.run(x)
    sal.train(was)
    rms, bad = [], int((~torch.isfinite(out)).sum())
    areas = int(sal.sal_plan.config.get("areas", 1))
    for l in layers:
        a = rec.seen.get(l.node)
        if a is None:
            rms.append(float("nan"))
            continue
        bad += int((~torch.isfinite(a)).sum())
        n = a.numel()
        if l.area_mode == "partition" and l.shape and a.shape[-1] * areas == l.shape[0]:
            n *= areas   # a fused region's compact value: the row's own block; zeros elsewhere
        rms.append(float((a.double().square().sum() / max(n, 1)).sqrt()))
    return rms, bad


def one_run(arch, depth, mode, seed, recipe, width, data):
    if mode in MODE_RECIPE:
        recipe = dataclasses.replace(recipe, **MODE_RECIPE[mode])
    torch.manual_seed(seed)
    model = build(ARCHS[arch], in_features=64, width=width, num_classes=10, depth=depth)
    xtr = data.x_train
    sal = salcompile.transform(model, (xtr[:2],), feedback_seed=seed, routing_seed=seed,
                               **MODES[mode])
    weights = [l.weight for l in sal.sal_plan.layers]
    snap = {}

    def on_epoch(rec):
        if rec.epoch == recipe.epochs - 1:  # parameters before the last epoch
            snap.update({w: sal.get_parameter(w).detach().clone() for w in weights})

    records = fit(sal, (xtr, data.y_train), (data.x_test, data.y_test), recipe, seed=seed,
                  on_epoch=on_epoch, progress=sys.stderr.isatty(),
                  desc=f"{arch} depth {depth} {mode}")
    if not snap:  # a single epoch: compare with the start
        snap = {w: torch.zeros_like(sal.get_parameter(w)) for w in weights}
    updates = []
    for w in weights:
        p = sal.get_parameter(w).detach()
        updates.append(float((p - snap[w]).norm() / p.norm().clamp_min(1e-12)))
    rms, bad_act = probe(sal, xtr[:256])
    return dict(acc=records[-1].test_acc, rms=rms, updates=updates,
                nonfinite=bad_act + records[-1].nonfinite)


def _fmt(v):
    return "nan" if not math.isfinite(v) else f"{v:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depths", default="2,8,32,128")
    ap.add_argument("--archs", default="plain,res")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--keep", default=None,
                    help="a depth.json of an earlier run: its rows for the (arch, depth, mode) "
                         "this run does not run are kept in the table (rerun one mode)")
    args = ap.parse_args()
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {','.join(MODES)}")
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)  # tiny matmuls: one thread avoids OpenMP stalls on a busy CPU
    recipe = Recipe(optimizer="adam", lr=1e-3, batch=16, epochs=args.epochs)
    data = load("digits")
    depths = [int(d) for d in args.depths.split(",")]
    archs, modes = args.archs.split(","), args.modes.split(",")
    results, t_start = {}, time.time()
    for arch in archs:
        for depth in depths:
            for mode in modes:
                t0 = time.time()
                runs = [one_run(arch, depth, mode, s, recipe, args.width, data)
                        for s in range(args.seeds)]
                accs = [r["acc"] for r in runs]
                res = dict(acc=statistics.mean(accs),
                           std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                           rms=runs[0]["rms"], updates=runs[0]["updates"],
                           nonfinite=sum(r["nonfinite"] for r in runs), seconds=time.time() - t0)
                results[f"{arch}|{depth}|{mode}"] = res
                print(f"  {arch:5s} depth {depth:3d} {mode:6s} acc {res['acc']:6.2f}  "
                      f"act rms first/last {_fmt(res['rms'][0])}/{_fmt(res['rms'][-1])}  "
                      f"nonfinite {res['nonfinite']}  ({res['seconds']:.0f} s)", flush=True)
    if args.keep:
        with open(args.keep) as f:
            kept = {k: v for k, v in json.load(f).items() if k not in results}
        results.update(kept)
        order = {m: i for i, m in enumerate(MODES)}
        results = dict(sorted(results.items(), key=lambda kv: (
            archs.index(kv[0].split("|")[0]) if kv[0].split("|")[0] in archs else len(archs),
            int(kv[0].split("|")[1]), order.get(kv[0].split("|")[2], len(order)))))
        modes = [m for m in MODES if any(k.endswith(f"|{m}") for k in results)]
    lines = ["| arch | depth | mode | test acc % | act RMS first | act RMS mid | act RMS last | "
             "update ‖ΔW‖/‖W‖ min | max | NaN/inf |", "|" + "---|" * 10]
    for key, r in results.items():
        arch, depth, mode = key.split("|")
        rms, up = r["rms"], r["updates"]
        std = "" if args.seeds == 1 else f" ± {r['std']:.2f}"   # no spread from one seed
        lines.append(f"| {arch} | {depth} | {mode} | {r['acc']:.2f}{std} | "
                     f"{_fmt(rms[0])} | {_fmt(rms[len(rms) // 2])} | {_fmt(rms[-1])} | "
                     f"{_fmt(min(up))} | {_fmt(max(up))} | {r['nonfinite']} |")
    table = "\n".join(lines)
    print("\n" + table)
    cmd = (f"python benchmarks/depth.py --depths {args.depths} --archs {args.archs} "
           f"--epochs {args.epochs} --seeds {args.seeds} --width {args.width} --modes {args.modes}"
           + (f" --keep {args.keep}" if args.keep else ""))
    kept_note = f"; the rows of other modes come from the run recorded in {args.keep}" \
        if args.keep else ""
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "depth.md"), (
        f"# Depth: deep MLPs on digits (width {args.width})\n\nCommand: `{cmd}` (CPU, torch "
        f"{torch.__version__}, {time.time() - t_start:.0f} s{kept_note}). {recipe}"
        + "".join(f"; {m}: {r['optimizer']}, weight decay {r['weight_decay']:g}"
                  for m, r in MODE_RECIPE.items()
                  if m in modes) + f". Activation RMS: each "
        f"layer's output after training on 256 training samples (eval mode); update: the last "
        f"epoch's relative change of each weight; NaN/inf: non-finite entries in activations, "
        f"outputs and parameters (all seeds).\n\n{table}\n"))
    atomic_write_text(os.path.join(args.out, "depth.json"), json.dumps(results, indent=1))
    plot(results, archs, max(depths), modes, os.path.join(args.out, "depth.png"))
    print(f"wrote {args.out}/depth.md, depth.json, depth.png")


def plot(results, archs, depth, modes, path):
    from salcompile.plots import _pyplot, _save
    plt = _pyplot()
    fig, axes = plt.subplots(len(archs), 2, figsize=(11, 3.6 * len(archs)), squeeze=False)
    for i, arch in enumerate(archs):
        for mode in modes:
            r = results.get(f"{arch}|{depth}|{mode}")
            if r is None:
                continue
            axes[i][0].plot(range(1, len(r["rms"]) + 1), r["rms"], label=mode)
            axes[i][1].plot(range(1, len(r["updates"]) + 1), r["updates"], label=mode)
        axes[i][0].set(yscale="log", xlabel="layer", ylabel="activation RMS",
                       title=f"{arch} MLP, depth {depth}")
        axes[i][1].set(yscale="log", xlabel="layer", ylabel="‖ΔW‖/‖W‖ (last epoch)",
                       title=f"{arch} MLP, depth {depth}")
        for ax in axes[i]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


if __name__ == "__main__":
    main()
