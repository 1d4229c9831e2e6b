"""Command line: `python -m salcompile convert|inspect ...`."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

import torch

from .config import (AREA_IMPLS, AREA_MODES, FEEDBACK_INITS, FEEDBACK_MODES, FEEDBACK_SCALES,
                     ROUTE_BY, BLOCK_GAINS, ON_BACKPROP, SALConfig)
from .errors import SalcompileError
from .training import OPTIMIZERS, Recipe
from . import files


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m salcompile",
        description="Compile PyTorch models to train with SAL (feedback alignment, no backprop).")
    sub = ap.add_subparsers(dest="command", required=True)

    def source_args(p):
        p.add_argument("input", help="a torch.export archive, or a state_dict saved with torch.save "
                                     "(then give --model), or a pickled module (--trust-pickle)")
        p.add_argument("--model", help="zoo model whose architecture a state_dict file fills in")
        p.add_argument("--input-shape", help="example input shape without the batch dimension, "
                                             "e.g. 64 or 1,28,28 (when the file carries none)")
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow loading a fully pickled module. DANGER: this runs code stored "
                            "in the file; only use it on files you made yourself")

    c = sub.add_parser("convert", help="transform a model file and save a trainable .pt2 archive")
    source_args(c)
    c.add_argument("-o", "--output", required=True, help="output torch.export archive (.pt2)")
    c.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    config_args(c)

    i = sub.add_parser("inspect", help="print the plan of a model file (a converted archive shows "
                                       "its own plan; other files the plan convert would follow)")
    source_args(i)
    config_args(i)

    e = sub.add_parser("export", help="export a converted archive (.pt2 from convert/save) to "
                                      "another runtime")
    e.add_argument("input", help="an archive written by `convert` or salcompile.save")
    e.add_argument("--to", choices=["onnx", "ort-training", "train-step"], default="onnx",
                   help="onnx: an inference graph for onnxruntime (gates and areas included); "
                        "ort-training: a directory of ONNX Runtime training artifacts "
                        "(onnxruntime-training 1.19.2) whose gradients are the module's FA/DFA; "
                        "train-step: one self-contained ONNX graph (parameters, optimizer state, "
                        "batch -> loss, updated parameters and state) for any onnxruntime")
    e.add_argument("-o", "--output", required=True,
                   help="output file (onnx, train-step) or directory (ort-training)")
    e.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    e.add_argument("--input-shape", help="example input shape without the batch dimension "
                                         "(default: the archive's own example input)")
    e.add_argument("--opset", type=int, help="onnx: ONNX opset (default: the exporter's)")
    e.add_argument("--loss", choices=["cross_entropy", "mse"], default="cross_entropy",
                   help="ort-training, train-step: the training loss (mean)")
    e.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="ort-training, train-step: the optimizer")
    e.add_argument("--lr", type=float, default=1e-3,
                   help="train-step: learning rate written into the graph (ort-training sets it "
                        "at run time)")
    e.add_argument("--weight-decay", type=float,
                   help="train-step: weight decay (default: torch's, 0.01 adamw / 0 sgd)")
    e.add_argument("--momentum", type=float, default=0.0, help="train-step, sgd: momentum")

    t = sub.add_parser("train", help="train a zoo model on a dataset with SAL/FA/DFA/BP",
                       description="Train a zoo model on an offline dataset, one run per seed. "
                                   "Example: python -m salcompile train --model mlp --data digits "
                                   "--feedback fa --areas 16 --optimizer sgd --lr 0.05 --epochs 25 "
                                   "--seeds 3 --out runs/digits-sal16")
    t.add_argument("--model", required=True, help="zoo model name (salcompile.models.REGISTRY)")
    t.add_argument("--data", required=True, help="dataset name (salcompile.data.DATASETS)")
    t.add_argument("--data-dir", help="directory holding MNIST IDX / CIFAR binary files")
    t.add_argument("--grayscale", action="store_true", help="turn colour images to grayscale")
    t.add_argument("--flatten", action="store_true", help="flatten inputs (the paper's MLP setup)")
    t.add_argument("--limit", type=int, help="use only the first N training samples")
    t.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=Recipe.optimizer)
    t.add_argument("--lr", type=float, default=Recipe.lr)
    t.add_argument("--momentum", type=float, default=Recipe.momentum)
    t.add_argument("--weight-decay", type=float, default=Recipe.weight_decay)
    t.add_argument("--batch", type=int, default=Recipe.batch)
    t.add_argument("--epochs", type=int, default=Recipe.epochs)
    t.add_argument("--seeds", type=int, default=1)
    t.add_argument("--no-alignment", action="store_true",
                   help="skip logging the angle between the SAL update and the true backprop "
                        "gradient (measured on 256 training samples each epoch)")
    t.add_argument("--out", help="directory for metrics.json, metrics.csv, learning_curve.png")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    config_args(t)
    return ap


def config_args(p: argparse.ArgumentParser) -> None:
    """One option per SALConfig field, defaulting to SALConfig's own defaults."""
    d = SALConfig()
    p.add_argument("--feedback", choices=FEEDBACK_MODES, default=d.feedback)
    p.add_argument("--feedback-init", choices=FEEDBACK_INITS, default=d.feedback_init)
    p.add_argument("--feedback-scale", choices=FEEDBACK_SCALES, default=d.feedback_scale)
    p.add_argument("--feedback-seed", type=int, default=d.feedback_seed)
    p.add_argument("--areas", type=int, default=d.areas,
                   help=f"number of parameter areas K (default {d.areas}; 1 = dense, no gates)")
    p.add_argument("--area-mode", choices=AREA_MODES, default=d.area_mode)
    p.add_argument("--route-by", choices=ROUTE_BY, default=d.route_by)
    p.add_argument("--route-dim", type=int, default=d.route_dim)
    p.add_argument("--gate-layers", default=None,
                   help="comma-separated fnmatch patterns of the layers to gate (default: DESIGN "
                        "regions: every layer but the head; the FFN blocks of sequence models)")
    p.add_argument("--routing-seed", type=int, default=d.routing_seed)
    p.add_argument("--balance-weight", type=float, default=d.balance_weight)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--area-impl", choices=AREA_IMPLS, default=d.area_impl)
    p.add_argument("--no-fuse-regions", dest="fuse_regions", action="store_false",
                   help="keep one self-contained area op per layer instead of running each "
                        "region's layers in area-sorted compact form")
    p.add_argument("--input-block-gain", choices=BLOCK_GAINS, default=d.input_block_gain,
                   help="fan_in: scale layers that read an area block by sqrt(K) (keeps "
                        "activations from shrinking with depth)")
    p.add_argument("--check-finite", action="store_true",
                   help="raise at the first NaN/inf in a layer's output or gradient, naming it")
    p.add_argument("--on-backprop", choices=ON_BACKPROP, default=d.on_backprop,
                   help="a layer salcompile cannot rewrite stays on backprop with a warning (warn) "
                        "or makes the conversion fail (error)")


def config_from(args) -> SALConfig:
    gate_layers = None if args.gate_layers is None else \
        [s.strip() for s in args.gate_layers.split(",") if s.strip()]
    return SALConfig(feedback=args.feedback, feedback_init=args.feedback_init,
                     feedback_scale=args.feedback_scale, feedback_seed=args.feedback_seed,
                     areas=args.areas, area_mode=args.area_mode, route_by=args.route_by,
                     route_dim=args.route_dim, gate_layers=gate_layers,
                     routing_seed=args.routing_seed, balance_weight=args.balance_weight,
                     temperature=args.temperature, area_impl=args.area_impl,
                     fuse_regions=args.fuse_regions, input_block_gain=args.input_block_gain,
                     check_finite=args.check_finite, on_backprop=args.on_backprop)


def _shape(text: Optional[str]):
    if not text:
        return None
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise SalcompileError(f"--input-shape {text!r}: expected integers separated by commas, "
                              "e.g. 1,28,28.") from None


def _load_source(args):
    """(module, example_inputs or None, embedded plan text) from the input file."""
    fmt = files.detect_format(args.input)
    shape = _shape(args.input_shape)
    if fmt == files.EXPORT:
        extra = {files.PLAN_FILE: ""}
        ep = files.load_export(args.input, extra_files=extra)
        example = ep.example_inputs[0] if ep.example_inputs else None
        if shape is not None:
            example = (torch.randn(2, *shape),)
        if example is None:
            raise SalcompileError(f"{args.input} carries no example inputs; pass --input-shape.")
        return files.module_from_export(ep), tuple(example), extra[files.PLAN_FILE]
    if fmt == files.STATE_DICT:
        if not args.model:
            raise SalcompileError(f"{args.input} is a state_dict (weights only): name the "
                                  "architecture with --model NAME (see the zoo: "
                                  "salcompile.models.REGISTRY).")
        from .models import build, example_input
        model = build(args.model)
        try:
            model.load_state_dict(files.load_state_dict(args.input))
        except RuntimeError as exc:
            raise SalcompileError(f"{args.input} does not fit --model {args.model}: "
                                  f"{str(exc).splitlines()[0]}") from exc
        example = (torch.randn(2, *shape),) if shape else (example_input(args.model),)
        return model, example, ""
    model = files.load_pickled_module(args.input, args.trust_pickle)
    if shape is None:
        raise SalcompileError("a pickled module carries no example input: pass --input-shape.")
    return model, (torch.randn(2, *shape),), ""


def _convert(args) -> int:
    from .archive import save
    from .pipeline import transform
    out = files.check_output(args.output, args.force)
    config = config_from(args)
    model, example, embedded = _load_source(args)
    if embedded:
        raise SalcompileError(f"{args.input} was already converted by salcompile; convert the "
                              "original model.")
    sal = transform(model, example, config)
    save(sal, example, out, force=args.force)
    print(sal.sal_plan)
    print(f"wrote {out}  (reload: salcompile.load({str(out)!r}); it trains with "
          f"{config.feedback.upper()})")
    return 0


def _inspect(args) -> int:
    from .plan import Plan
    from .pipeline import plan
    model, example, embedded = _load_source(args)
    if embedded:
        print(Plan.from_json(embedded))
    else:
        print(plan(model, example, config_from(args)))
    return 0


def _export(args) -> int:
    from .archive import load
    from .module import SALModule
    if args.to != "ort-training":   # a directory: export_ort_training checks its own contents
        files.check_output(args.output, args.force)
    if files.detect_format(args.input) != files.EXPORT:
        raise SalcompileError(f"{args.input} is not a torch.export archive; run `python -m "
                              "salcompile convert` on it first.")
    sal = load(args.input)
    if not isinstance(sal, SALModule):
        raise SalcompileError(f"{args.input} was not written by salcompile (no plan inside); "
                              "convert the model first: python -m salcompile convert ...")
    shape = _shape(args.input_shape)
    if shape is not None:
        example = (torch.randn(2, *shape),)
    else:
        ep = files.load_export(args.input)
        if not ep.example_inputs:
            raise SalcompileError(f"{args.input} carries no example inputs; pass --input-shape.")
        example = tuple(ep.example_inputs[0])
    if args.to == "onnx":
        from .onnx_export import export_onnx
        export_onnx(sal, example, args.output, opset=args.opset, force=args.force)
        print(f"wrote {args.output}  (onnxruntime.InferenceSession({str(args.output)!r}))")
    elif args.to == "ort-training":
        from .ort_training import export_ort_training
        export_ort_training(sal, example, args.output, loss=args.loss, optimizer=args.optimizer,
                            force=args.force)
        print(f"wrote ONNX Runtime training artifacts to {args.output}  "
              "(onnxruntime.training.api: CheckpointState, Module, Optimizer)")
    else:
        from .train_step_export import export_train_step
        export_train_step(sal, example, args.output, loss=args.loss, optimizer=args.optimizer,
                          lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
                          force=args.force)
        print(f"wrote {args.output}  (salcompile.TrainStepSession({str(args.output)!r}, ...) or "
              "any onnxruntime InferenceSession)")
    return 0


def _train(args) -> int:
    from .experiment import run_experiment
    recipe = Recipe(optimizer=args.optimizer, lr=args.lr, batch=args.batch, epochs=args.epochs,
                    momentum=args.momentum, weight_decay=args.weight_decay)
    if args.out:
        files.check_output_dir(args.out)
    run_experiment(args.model, args.data, config_from(args), recipe, seeds=args.seeds,
                   data_dir=args.data_dir, grayscale=args.grayscale, flatten=args.flatten,
                   limit=args.limit, alignment=not args.no_alignment,
                   progress=not args.no_progress, out=args.out)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return {"convert": _convert, "inspect": _inspect, "train": _train,
                    "export": _export}[args.command](args)
    except SalcompileError as exc:
        print(f"salcompile: error: {exc}", file=sys.stderr)
        return 2
