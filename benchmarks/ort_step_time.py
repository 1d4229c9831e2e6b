"""One AdamW training step of the same FA model: ONNX Runtime training artifacts and the
train-step graph (salcompile.export_train_step in a plain InferenceSession) vs torch eager.

    python benchmarks/ort_step_time.py [--steps 30] [--rounds 5] [--threads 1] [--batch 256]
                                       [--areas 1] [--routed-form compact|masked]

Model: salcompile.models.MLP(784, 1024, 10, depth=3) (784-1024-1024-10, ReLU), transformed with
salcompile.transform(areas=--areas) (1: dense FA; feedback_scale="match": B rescaled to ||W|| every
step; K > 1: SAL-K partition, whose routed layers both ONNX exports write in `--routed-form`:
"compact" (default; rows sorted by area, each area's block on its own rows) or "masked" (every
block on every row, masked)),
float32, batch 256, cross-entropy on random labels, AdamW (torch.optim.AdamW lr 1e-3 /
ORT's AdamW from generate_artifacts). Step = forward + backward + optimizer step (+ zero_grad /
lazy_reset_grad). Both sides run with the same thread count (`--threads`:
torch.set_num_threads and ORT's intra_op_num_threads, inter_op 1). After warm-up, `--rounds`
rounds each time `--steps` torch steps then `--steps` ORT steps, so load from other processes on
a shared machine hits both alike; medians over all timed steps. Also checks that one ORT step's
gradients equal torch's on this model. Writes benchmarks/results/ort_step_time.md (atomically).
"""
from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import salcompile  # noqa: E402
from salcompile.files import atomic_write_text  # noqa: E402
from salcompile.models import MLP  # noqa: E402
from salcompile.onnx import export_ort_training  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--areas", type=int, default=1)
    ap.add_argument("--routed-form", choices=("compact", "masked"), default="compact",
                    help="how both ONNX exports write routed (area) layers")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ort_step_time.md"))
    args = ap.parse_args(argv)

    import onnxruntime as ort
    from onnxruntime.training import api

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 784)
    y = torch.randint(0, 10, (args.batch,))
    sal = salcompile.transform(MLP(784, 1024, 10, depth=3), (x[:8],), areas=args.areas)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        export_ort_training(sal, (x[:8],), d, optimizer="adamw", routed_form=args.routed_form)
        export_s = time.perf_counter() - t0
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        state = api.CheckpointState.load_checkpoint(str(d / "checkpoint"))
        module = api.Module(str(d / "training_model.onnx"), state, str(d / "eval_model.onnx"),
                            session_options=so)
        opt_ort = api.Optimizer(str(d / "optimizer_model.onnx"), module)
        opt_ort.set_learning_rate(1e-3)
        module.train()
        xn, yn = x.numpy(), y.numpy()
        t1 = time.perf_counter()
        salcompile.export_train_step(sal, (x[:8],), d / "step.onnx", optimizer="adamw", lr=1e-3,
                                     routed_form=args.routed_form)
        step_export_s = time.perf_counter() - t1
        graph = salcompile.TrainStepSession(d / "step.onnx", sal.state_dict(), sess_options=so)

        # correctness on this model: one step's gradients (before any update)
        sal.train()
        sal.zero_grad()
        F.cross_entropy(sal(x), y).backward()
        module(xn, yn)
        worst = max(float(np.abs(np.array(state.parameters[n].grad) - p.grad.numpy()).max()
                          / np.abs(p.grad.numpy()).max()) for n, p in sal.named_parameters())
        module.lazy_reset_grad()

        opt_t = torch.optim.AdamW(sal.parameters(), lr=1e-3)

        def torch_step():
            opt_t.zero_grad(set_to_none=True)
            F.cross_entropy(sal(x), y).backward()
            opt_t.step()

        def ort_step():
            module(xn, yn)
            opt_ort.step()
            module.lazy_reset_grad()

        def graph_step():
            graph.step(xn, yn)

        steps = (("torch eager", torch_step), ("ORT training", ort_step),
                 ("train-step graph (InferenceSession)", graph_step))
        for _ in range(args.warmup):
            for _, step in steps:
                step()
        times = {name: [] for name, _ in steps}
        cpu = {k: 0.0 for k in times}   # process CPU time: shows the thread setting holds
        for _ in range(args.rounds):
            for name, step in steps:
                c = time.process_time()
                for _ in range(args.steps):
                    t = time.perf_counter()
                    step()
                    times[name].append((time.perf_counter() - t) * 1e3)
                cpu[name] += time.process_time() - c

    med = {k: statistics.median(v) for k, v in times.items()}
    q = {k: (np.percentile(v, 25), np.percentile(v, 75)) for k, v in times.items()}
    rows = [f"| {k} | {med[k]:.2f} | {q[k][0]:.2f}-{q[k][1]:.2f} | "
            f"{cpu[k] * 1e3 / len(times[k]):.2f} | {len(times[k])} | "
            f"{med[k] / med['torch eager']:.2f} |" for k in times]
    cmd = "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{Path(__file__).name}"]
                                 + list(argv if argv is not None else sys.argv[1:]))
    what = "dense FA" if args.areas == 1 else (f"SAL-{args.areas} partition, FA, routed layers "
                                               f"{args.routed_form} in both ONNX exports")
    text = "\n".join([
        "# ONNX Runtime training step vs torch eager step (same model, AdamW)",
        "",
        f"`{cmd}`",
        "",
        f"MLP 784-1024-1024-10, salcompile.transform(areas={args.areas}) "
        f"({what}, "
        "feedback_scale=match), "
        f"float32, batch {args.batch}, cross-entropy, AdamW; {args.threads} thread(s) on both "
        f"sides (torch.set_num_threads, ORT intra_op_num_threads; inter_op 1). "
        f"{args.rounds} interleaved rounds x {args.steps} steps per side after {args.warmup} "
        "warm-up steps.",
        "",
        "| step | median ms | p25-p75 ms | CPU ms / step (mean) | steps | median vs torch |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"One ORT step's gradients vs torch's on this model: max relative difference "
        f"{worst:.1e}. export_ort_training took {export_s:.1f} s, export_train_step "
        f"{step_export_s:.1f} s.",
        "",
        f"torch {torch.__version__}, onnxruntime-training {ort.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, {platform.processor() or 'cpu'}; "
        "measured on a shared machine (other processes running).",
        "",
    ])
    print(text)
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
