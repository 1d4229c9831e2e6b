"""Command line: `python -m salcompile convert|inspect|export|train ...` (`--help` on each)."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    from .config import SALConfig

# No torch at import time: the parser (--help, --version, argument errors) answers without it;
# each command imports torch and the modules it uses (see main).
from .errors import SalcompileError
from .file_formats import FILE_FORMATS as DATA_FORMATS  # torch-free: the CLI's --help lists them

DEFAULT_THREADS = 1

# ------------------------------------------------------------------ what --help shows
# Plain copies of the real tables, so that building the parser needs no torch (`salcompile
# --help` in ~0.1 s instead of ~2.5 s). tests/test_cli_startup.py asserts each equals its source.
ZOO_NAMES = ("mlp", "mlp-mnist", "lenet5", "deep-mlp", "deep-mlp-res", "resnet20", "vit", "gpt",
             "replicate-1b")                                    # salcompile.models.REGISTRY
DATASET_NAMES = ("digits", "iris", "wine", "breast_cancer", "mnist5k", "mnist1d", "mnist",
                 "fashion_mnist", "cifar10", "cifar100", "tokens")  # data.DATASETS, LM_DATASETS
DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
               "uint8", "bool")                                 # salcompile.model_source.DTYPES
OPTIMIZER_NAMES = ("adam", "adamw", "sgd")                      # salcompile.training.OPTIMIZERS
DEVICE_NAMES = ("auto", "cpu", "cuda")                          # salcompile.training.DEVICES
PRECISION_NAMES = ("fp32", "bf16", "fp16")                      # salcompile.training.PRECISIONS
RECIPE_DEFAULTS = {"optimizer": "adam", "lr": 3e-3, "batch": 16, "epochs": 25,
                   "momentum": 0.0, "weight_decay": 0.0}        # salcompile.training.Recipe()
FEEDBACK_SUMMARIES = {                                          # salcompile.feedback: name, summary
    "fa": "feedback alignment: a fixed random B (drawn once) in place of W in the input gradient",
    "dfa": "direct feedback alignment: each layer's input receives the output error times a "
           "fixed random D",
    "bp": "ordinary backprop (the transposed weight), same graph otherwise: the reference",
    "usf": "uniform sign-concordant feedback: B = sign(W)/sqrt(fan_in), recomputed every step",
    "brsf": "batchwise random-magnitude sign-concordant feedback: B = |fresh U(-s, s)|·sign(W) "
            "every step",
    "frsf": "fixed random-magnitude sign-concordant feedback: B = |B_fixed|·sign(W) every step",
    "kp": "Kolen-Pollack: B is trained with W's gradient; with weight decay on both, B -> W",
}
CONFIG_CHOICES = {                                              # salcompile.config
    "feedback": tuple(FEEDBACK_SUMMARIES),                      # FEEDBACK_MODES
    "feedback_init": ("kaiming_uniform", "weights"),            # FEEDBACK_INITS
    "feedback_scale": ("match", "none"),                        # FEEDBACK_SCALES
    "area_mode": ("partition", "replicate"),                    # AREA_MODES
    "route_by": ("auto", "sample", "token"),                    # ROUTE_BY
    "area_impl": ("fast", "reference"),                         # AREA_IMPLS
    "input_block_gain": ("fan_in", "none"),                     # BLOCK_GAINS
    "on_backprop": ("warn", "error"),                           # ON_BACKPROP
}
CONFIG_DEFAULTS = {                                             # dataclasses.asdict(SALConfig())
    "feedback": "fa", "feedback_init": "kaiming_uniform", "feedback_scale": "match",
    "feedback_seed": 0, "areas": 16, "area_mode": "partition", "route_by": "auto",
    "route_dim": 32, "gate_layers": None, "routing_seed": 0, "balance_weight": 1.0,
    "temperature": 0.1, "area_impl": "fast", "input_block_gain": "fan_in",
    "check_finite": False, "fuse_regions": True, "route_top_k": 1, "shared_fraction": 0.0,
    "on_backprop": "warn",
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows `(default: X)` after every option that has a default worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) \
                or not action.option_strings or isinstance(action, argparse._StoreTrueAction):
            return text
        return text + " (default: %(default)s)"


def _zoo_names() -> str:
    return ", ".join(ZOO_NAMES)


def _dataset_names() -> str:
    return ", ".join(DATASET_NAMES)


def _data_formats() -> str:
    return "; ".join(f"{k}: {v}" for k, v in DATA_FORMATS.items()).replace("%", "%%")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


MODEL_HELP = ("the architecture: a zoo name ({zoo}), path/to/file.py:ClassName, or "
              "package.module:ClassName (imported from the working directory or the installed "
              "packages); constructor arguments go in --model-args")
INPUT_SHAPE_HELP = ("shape of one example input without the batch dimension, e.g. 64 or "
                    "1,28,28; repeat it for a model that takes several inputs (default: the "
                    "archive's own example inputs, or the zoo model's input)")
EPILOG = """threads: every command sets torch to --threads intra-op threads (default 1) and
--interop-threads 1. One thread is the fastest for the small models and batches of the zoo
(a 2-core machine: the digits MLP trains 1.3 s per 2 epochs with 1 thread, 6-8 s with 2);
give --threads 0 to keep torch's own default (one per core) for large models."""


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    ap = argparse.ArgumentParser(
        prog="python -m salcompile", formatter_class=_Formatter,
        description="Compile PyTorch models to train with SAL (feedback alignment, no backprop). "
                    "`python -m salcompile COMMAND --help` describes each command.",
        epilog=EPILOG)
    ap.add_argument("--version", action="version", version=f"salcompile {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    zoo = _zoo_names()

    def common(p):
        p.add_argument("--threads", type=_nonneg_int, default=DEFAULT_THREADS, metavar="N",
                       help="torch intra-op threads (torch.set_num_threads); 0 keeps torch's "
                            "default of one per core")
        p.add_argument("--interop-threads", type=_positive_int, default=1, metavar="N",
                       help="torch inter-op threads (torch.set_num_interop_threads)")

    def model_args(p, required_text=""):
        p.add_argument("--model", metavar="NAME|FILE.py:CLASS|MODULE:CLASS",
                       help=MODEL_HELP.format(zoo=zoo) + required_text)
        p.add_argument("--model-args", metavar="JSON",
                       help="constructor arguments of --model as a JSON object, e.g. "
                            "'{\"hidden\": 64, \"num_classes\": 10}' (a JSON list: positional)")

    def input_args(p):
        p.add_argument("--input-shape", action="append", metavar="SHAPE", help=INPUT_SHAPE_HELP)
        p.add_argument("--input-dtype", action="append", choices=list(DTYPE_NAMES),
                       metavar="DTYPE",
                       help=f"dtype of the example inputs, once for all or once per "
                            f"--input-shape; one of {', '.join(DTYPE_NAMES)} (e.g. int64 for "
                            "token ids) (default: the archive's, else float32)")
        p.add_argument("--vocab", type=_positive_int, metavar="N",
                       help="integer example inputs are drawn from [0, N) (default: the "
                            "smallest nn.Embedding of the model, else 2)")

    def source_args(p):
        p.add_argument("input", nargs="?",
                       help="a torch.export archive (.pt2), a state_dict saved with torch.save "
                            "(then give --model), or a pickled module (--trust-pickle); may be "
                            "left out with --model (fresh weights)")
        model_args(p, "; needed for a state_dict")
        input_args(p)
        p.add_argument("--train-mode", action="store_true",
                       help="an archive exported in eval mode (model.eval()) recorded batch norm "
                            "with running statistics and dropout off: switch them to training "
                            "behaviour before converting")
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow loading a fully pickled module. DANGER: this runs code stored "
                            "in the file; only use it on files you made yourself. The working "
                            "directory is on the import path for the pickle's classes")
        common(p)

    c = sub.add_parser("convert", formatter_class=_Formatter, epilog=EPILOG,
                       help="transform a model file and save a trainable .pt2 archive",
                       description="Transform a model and save it as a torch.export archive "
                                   "that trains with SAL/FA/DFA after salcompile.load(path).\n"
                                   "Examples:\n"
                                   "  python -m salcompile convert model.pt2\n"
                                   "  python -m salcompile convert weights.pt --model net.py:Net "
                                   "--model-args '{\"hidden\": 64}' --input-shape 1,28,28")
    source_args(c)
    c.add_argument("-o", "--output",
                   help="output archive (default: the input's name with .sal.pt2, e.g. "
                        "model.pt2 -> model.sal.pt2; without an input: CLASS.sal.pt2)")
    c.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    config_args(c)

    i = sub.add_parser("inspect", formatter_class=_Formatter, epilog=EPILOG,
                       help="print the plan of a model file (a converted archive shows its own "
                            "plan; other files the plan convert would follow)",
                       description="Print what convert does (or did) to a model: each layer, "
                                   "its feedback, the SAL regions, layers left on backprop.")
    source_args(i)
    config_args(i)

    e = sub.add_parser("export", formatter_class=_Formatter, epilog=EPILOG,
                       help="export a converted archive (.pt2 from convert/save) to another "
                            "runtime")
    e.add_argument("input", help="an archive written by `convert` or salcompile.save")
    e.add_argument("--to", choices=["onnx", "ort-training", "train-step"], default="onnx",
                   help="onnx: an inference graph for onnxruntime (gates and areas included); "
                        "ort-training: a directory of ONNX Runtime training artifacts "
                        "(onnxruntime-training 1.19.2) whose gradients are the module's FA/DFA; "
                        "train-step: one self-contained ONNX graph (parameters, optimizer state, "
                        "batch -> loss, updated parameters and state) for any onnxruntime")
    e.add_argument("-o", "--output",
                   help="output file (onnx, train-step) or directory (ort-training) (default: "
                        "the input's name: X.sal.pt2 -> X.onnx, X.step.onnx, X.ort-training/)")
    e.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    input_args(e)
    e.add_argument("--opset", type=_positive_int, help="onnx: ONNX opset (default: the "
                                                        "exporter's)")
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
    common(e)

    t = sub.add_parser(
        "train", formatter_class=_Formatter, epilog=EPILOG,
        help="train a zoo model or your own on a dataset with SAL/FA/DFA/BP",
        description="Train a model on an offline dataset, one run per seed; print the plan and "
                    "one line per epoch, write metrics (--out) and the trained model (-o).\n"
                    "Examples:\n"
                    "  python -m salcompile train --model mlp --data digits --feedback fa "
                    "--areas 16 --epochs 25 --seeds 3 --out runs/digits-sal16\n"
                    "  python -m salcompile train --model net.py:Net --model-args "
                    "'{\"num_classes\": 10}' --data digits --flatten -o net.sal.pt2\n"
                    "  python -m salcompile train --resume net.sal.pt2 --data digits --flatten "
                    "--epochs 5 -o net2.sal.pt2")
    model_args(t, "; needed unless --resume")
    t.add_argument("--weights", metavar="FILE",
                   help="a state_dict (torch.save(model.state_dict(), FILE)) loaded into "
                        "--model before it is converted")
    t.add_argument("--resume", metavar="ARCHIVE",
                   help="continue training an archive written by train -o / convert (its plan "
                        "and weights; the optimizer starts afresh, SAL options are ignored)")
    t.add_argument("--data", required=True, metavar="NAME|FILE",
                   help=f"a bundled dataset ({_dataset_names()}; tokens: a synthetic LM set for "
                        f"gpt) or your own file or folder: {_data_formats()}")
    t.add_argument("--data-dir", help="directory holding MNIST IDX / CIFAR binary files")
    t.add_argument("--grayscale", action="store_true", help="turn colour images to grayscale")
    t.add_argument("--flatten", action="store_true",
                   help="flatten inputs to [batch, features] (the paper's MLP setup; zoo MLPs "
                        "flatten on their own)")
    t.add_argument("--limit", type=_positive_int, help="use only the first N training samples")
    t.add_argument("--optimizer", choices=sorted(OPTIMIZER_NAMES),
                   default=RECIPE_DEFAULTS["optimizer"],
                   help="the optimizer")
    t.add_argument("--lr", type=float, default=RECIPE_DEFAULTS["lr"], help="learning rate")
    t.add_argument("--momentum", type=float, default=RECIPE_DEFAULTS["momentum"],
                   help="sgd: momentum")
    t.add_argument("--weight-decay", type=float, default=RECIPE_DEFAULTS["weight_decay"],
                   help="weight decay")
    t.add_argument("--batch", type=_positive_int, default=RECIPE_DEFAULTS["batch"],
                   help="samples per step")
    t.add_argument("--epochs", type=_positive_int, default=RECIPE_DEFAULTS["epochs"],
                   help="passes over the training set")
    t.add_argument("--seeds", type=_positive_int, default=1,
                   help="independent runs (seed 0, 1, ...): weights, feedback and routing")
    t.add_argument("--no-alignment", action="store_true",
                   help="skip logging the angle between the SAL update and the true backprop "
                        "gradient (measured on 256 training samples each epoch)")
    t.add_argument("--out", metavar="DIR",
                   help="directory for metrics.json, metrics.csv, learning_curve.png and the "
                        "trained model (model.sal.pt2; model.seedN.sal.pt2 for several seeds)")
    t.add_argument("-o", "--output", metavar="ARCHIVE",
                   help="save the trained model as an archive here (salcompile.load reloads "
                        "it; --resume continues it); one seed only")
    t.add_argument("--force", action="store_true", help="overwrite -o if it exists")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--device", choices=DEVICE_NAMES, default="cpu",
                   help="where to train: cpu, cuda (an error without a GPU), auto (cuda when "
                        "torch sees one); the saved archive is always written on the CPU")
    t.add_argument("--precision", choices=list(PRECISION_NAMES), default="fp32",
                   help="bf16 / fp16: torch.autocast(bfloat16 / float16) around the forward "
                        "and the loss (parameters, gradients and optimizer state stay float32); "
                        "fp16 adds loss scaling (torch.amp.GradScaler: a step whose gradients "
                        "overflow is skipped, the epoch line counts them); on a CPU fp16 is "
                        "emulated and much slower than fp32 (use bf16 there)")
    common(t)
    config_args(t)
    return ap


def config_args(p: argparse.ArgumentParser) -> None:
    """One option per SALConfig field, defaulting to SALConfig's own defaults."""
    d = argparse.Namespace(**CONFIG_DEFAULTS)
    c = CONFIG_CHOICES
    g = p.add_argument_group("SAL options (salcompile.SALConfig)")
    g.add_argument("--feedback", choices=c["feedback"], default=d.feedback,
                   help="the learning rule: " + "; ".join(
                       f"{n} ({FEEDBACK_SUMMARIES[n]})" for n in c["feedback"]))
    g.add_argument("--feedback-init", choices=c["feedback_init"], default=d.feedback_init,
                   help="how B is drawn: kaiming_uniform (like nn.Linear's init) or weights "
                        "(B = W: FA then equals backprop, a check)")
    g.add_argument("--feedback-scale", choices=c["feedback_scale"], default=d.feedback_scale,
                   help="match: rescale B to the norm of W at every step; none: B as drawn")
    g.add_argument("--feedback-seed", type=int, default=d.feedback_seed,
                   help="seed of the feedback matrices B / D")
    g.add_argument("--areas", type=int, default=d.areas,
                   help="number of parameter areas K (1 = dense, no gates)")
    g.add_argument("--area-mode", choices=c["area_mode"], default=d.area_mode,
                   help="partition: a gated layer's outputs split into K blocks, a sample uses "
                        "one; replicate: K full copies of the layer")
    g.add_argument("--route-by", choices=c["route_by"], default=d.route_by,
                   help="what a gate routes: auto (tokens of [batch, seq, features] "
                        "activations, else samples), sample, token")
    g.add_argument("--route-dim", type=int, default=d.route_dim,
                   help="width of the space a gate projects into")
    g.add_argument("--gate-layers", default=None, metavar="PATTERNS",
                   help="comma-separated fnmatch patterns of the layers to gate, e.g. 'fc*' "
                        "(default: every layer but the head; the FFN blocks of sequence models)")
    g.add_argument("--routing-seed", type=int, default=d.routing_seed,
                   help="seed of the gates' prototypes and projections")
    g.add_argument("--balance-weight", type=float, default=d.balance_weight,
                   help="weight of the load-balance term in the gates' local rule")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help="softmax temperature of the gates' local rule")
    g.add_argument("--area-impl", choices=c["area_impl"], default=d.area_impl,
                   help="fast: rows sorted by area, each area's block on its rows; reference: "
                        "masked dense (the oracle)")
    g.add_argument("--no-fuse-regions", dest="fuse_regions", action="store_false",
                   help="keep one self-contained area op per layer instead of running each "
                        "region's layers in area-sorted compact form")
    g.add_argument("--input-block-gain", choices=c["input_block_gain"], default=d.input_block_gain,
                   help="fan_in: scale layers that read an area block by sqrt(K) (keeps "
                        "activations from shrinking with depth)")
    g.add_argument("--check-finite", action="store_true",
                   help="raise at the first NaN/inf in a layer's output or gradient, naming it")
    g.add_argument("--route-top-k", type=int, default=d.route_top_k,
                   help="areas each row uses and updates (1: the paper's mutually exclusive "
                        "areas; more: our top-k extension)")
    g.add_argument("--shared-fraction", type=float, default=d.shared_fraction,
                   help="share of each gated partition layer's outputs that every row computes "
                        "(a shared dense path beside the areas; 0: pure partition)")
    g.add_argument("--on-backprop", choices=c["on_backprop"], default=d.on_backprop,
                   help="a layer salcompile cannot rewrite stays on backprop with a warning (warn) "
                        "or makes the conversion fail (error)")


_CONFIG_DESTS = ("feedback", "feedback_init", "feedback_scale", "feedback_seed", "areas",
                 "area_mode", "route_by", "route_dim", "gate_layers", "routing_seed",
                 "balance_weight", "temperature", "area_impl", "fuse_regions",
                 "input_block_gain", "check_finite", "route_top_k", "shared_fraction",
                 "on_backprop")


def config_from(args) -> SALConfig:
    from .config import SALConfig
    gate_layers = None if args.gate_layers is None else \
        [s.strip() for s in args.gate_layers.split(",") if s.strip()]
    try:
        return SALConfig(feedback=args.feedback, feedback_init=args.feedback_init,
                         feedback_scale=args.feedback_scale, feedback_seed=args.feedback_seed,
                         areas=args.areas, area_mode=args.area_mode, route_by=args.route_by,
                         route_dim=args.route_dim, gate_layers=gate_layers,
                         routing_seed=args.routing_seed, balance_weight=args.balance_weight,
                         temperature=args.temperature, area_impl=args.area_impl,
                         fuse_regions=args.fuse_regions, input_block_gain=args.input_block_gain,
                         check_finite=args.check_finite, route_top_k=args.route_top_k,
                         shared_fraction=args.shared_fraction, on_backprop=args.on_backprop)
    except SalcompileError as exc:
        raise SalcompileError(cli_wording(str(exc))) from exc


def cli_wording(msg: str) -> str:
    """A Python-API message in command-line terms: `SALConfig: areas (K) must ...` ->
    `--areas (K) must ...`, `gate_layers=[...]` -> `--gate-layers [...]`."""
    fields = _CONFIG_DESTS + ("lr", "batch", "epochs", "momentum", "weight_decay", "optimizer",
                              "device", "precision")
    flag = {f: "--" + f.replace("_", "-") for f in fields}
    msg = re.sub(r"^(?:SALConfig|Recipe): (\w+)",
                 lambda m: flag.get(m.group(1), m.group(0)), msg)
    msg = re.sub(r"\b(" + "|".join(fields) + r")=(?!=)",
                 lambda m: flag[m.group(1)] + " ", msg)
    msg = msg.replace(" (trust_pickle=True)", "").replace(" (force=True)", "")
    msg = msg.replace("SALConfig(--", "(--")
    msg = msg.replace("example_inputs=(x,) to transform()", "--input-shape")
    return msg


def _note(text: str) -> None:
    print(f"salcompile: warning: {text}", file=sys.stderr)


# what the exports take on a 2-core CPU: a few seconds for an MLP, the upper end for a CNN or
# a small transformer (issue 15's MNIST CNN / token classifier)
_TAKES = {"onnx": "5-40 s", "ort-training": "10-60 s", "train-step": "20-100 s"}


@contextlib.contextmanager
def _progress(what: str, kind: str):
    """`salcompile: exporting ... (this takes ~N s)` on stderr before a long step, and the time
    it took after (the CLI only; the Python API stays quiet)."""
    print(f"salcompile: {what} (this takes {_TAKES[kind]})...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    print(f"salcompile: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _set_threads(args) -> None:
    import torch
    n = getattr(args, "threads", DEFAULT_THREADS)
    if n:
        torch.set_num_threads(n)
    inter = getattr(args, "interop_threads", 1)
    if inter and torch.get_num_interop_threads() != inter:
        try:   # only possible before torch's inter-op pool started (a second main() in-process)
            torch.set_num_interop_threads(inter)
        except RuntimeError:
            pass


# ------------------------------------------------------------------ sources
def _example_from_args(args, model) -> Optional[tuple]:
    from . import model_source as ms
    if not args.input_shape:
        return None   # the caller uses what the source knows (then _retype applies the dtype)
    shapes = [ms.parse_shape(s) for s in args.input_shape]
    return ms.example_inputs(shapes, args.input_dtype or (), high=args.vocab, model=model)


def _retype(example: tuple, args, model) -> tuple:
    """Known example inputs (an archive's, a zoo model's) with --input-dtype / --vocab applied."""
    from . import model_source as ms
    if not (args.input_dtype or args.vocab):
        return example
    shapes = [tuple(t.shape[1:]) for t in example]
    dtypes = args.input_dtype or ms.input_dtype_names(example)
    return ms.example_inputs(shapes, dtypes, high=args.vocab, model=model, batch=example[0].shape[0])


def _need_shape(what: str) -> SalcompileError:
    return SalcompileError(f"{what} gives no example input to capture the model with: pass "
                           "--input-shape (one sample "
                           "without the batch, e.g. --input-shape 1,28,28; repeat it for several "
                           "inputs; --input-dtype int64 for token ids).")


def _load_source(args):
    """(module, example_inputs, embedded plan text) from the input file and --model."""
    from . import files
    from . import model_source as ms
    if args.input is None:
        if not args.model:
            raise SalcompileError("give a model file (a torch.export archive, a state_dict with "
                                  "--model, or a pickled module with --trust-pickle), or "
                                  "--model alone for fresh weights.")
        return _model_from_spec(args, None), ""
    fmt = files.detect_format(args.input)
    if fmt == files.EXPORT:
        extra = {files.PLAN_FILE: ""}
        ep = files.load_export(args.input, extra_files=extra)
        if extra[files.PLAN_FILE]:   # converted by salcompile: its own graph and plan
            return (files.module_from_export(ep), ms.archive_inputs(ep)), extra[files.PLAN_FILE]
        if args.model:
            _note(f"--model {args.model} is ignored: {args.input} is a torch.export archive, "
                  "which carries its own architecture.")
        gm = files.module_from_export(ep)
        _mode(args, gm)
        example = _example_from_args(args, gm)
        if example is None:
            example = ms.archive_inputs(ep)
            if example is None:
                raise _need_shape(str(args.input))
            example = _retype(example, args, gm)
        _static_batch_of_archive(args, ep)
        return (gm, example), ""
    if fmt == files.STATE_DICT:
        if not args.model:
            raise SalcompileError(f"{args.input} is a state_dict (weights only): name the "
                                  "architecture with --model NAME (the zoo: "
                                  f"{_zoo_names()}) or --model path/to/file.py:ClassName "
                                  "(your class, constructor arguments in --model-args).")
        return _model_from_spec(args, args.input), ""
    model = ms.load_pickle(args.input, args.trust_pickle)
    if args.model:
        _note(f"--model {args.model} is ignored: {args.input} pickles the whole module.")
    example = _example_from_args(args, model)
    if example is None:
        raise _need_shape(f"{args.input} (a pickled module)")
    return (model, example), ""


def _model_from_spec(args, weights):
    from . import model_source as ms
    model = ms.build_model(args.model, args.model_args)
    if weights is not None:
        ms.load_weights(model, weights, f"--model {args.model}")
    example = _example_from_args(args, model)
    if example is None:
        if not ms.is_zoo_name(args.model):
            raise _need_shape(f"--model {args.model}")
        from .models import example_input
        kwargs = ms.parse_model_args(args.model_args)[1]
        example = _retype((example_input(args.model, **kwargs),), args, model)
    return model, example


def _mode(args, gm) -> None:
    """An archive exported in eval mode: warn, or switch it to training behaviour."""
    from . import model_source as ms
    if args.train_mode:
        names = ms.to_train_mode(gm)
        if names:
            print(f"switched {len(names)} op(s) recorded in eval mode to training behaviour: "
                  f"{', '.join(names)}")
        return
    names = ms.eval_mode_ops(gm)
    if names:
        _note(f"{args.input} was exported in eval mode (model.eval()): {', '.join(names)} "
              "recorded batch norm with its running statistics / dropout off, so the converted "
              "model trains with frozen batch-norm statistics and without dropout. Pass "
              "--train-mode to switch them to training behaviour (or export after model.train()).")


def _static_batch_of_archive(args, ep) -> None:
    import torch
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    dims = [vals[n].shape[0] for n in ep.graph_signature.user_inputs
            if isinstance(vals.get(n), torch.Tensor) and vals[n].dim() > 0]
    args._static_archive = bool(dims) and all(isinstance(d, int) for d in dims)


def _check_batch(args, sal, example) -> None:
    from . import model_source as ms
    fixed = ms.static_batch(sal)
    if fixed is None:
        return
    how = ("the archive was exported with a fixed batch (torch.export.export without "
           "dynamic_shapes) and its graph computes with that size (e.g. x.view(N, -1)); export "
           "with a dynamic batch, torch.export.export(model, (x,), dynamic_shapes="
           "({0: torch.export.Dim.AUTO},)), or convert the model's class instead: --model "
           "file.py:Class with a state_dict" if getattr(args, "_static_archive", False) else
           "the model's code fixes it (a reshape to a constant size, or an example batch of 1); "
           "use x.flatten(1) / x.view(x.size(0), -1) and --input-shape with a batch of 2 or more")
    _note(f"the converted model runs only at batch size {fixed}: {how}.")


def _default_output(args, suffix=".sal.pt2") -> Path:
    if args.input is not None:
        name = Path(args.input).name
        for ext in (".sal.pt2", ".pt2", ".pth", ".pt", ".pkl"):
            if name.endswith(ext):
                name = name[: -len(ext)]
                break
        return Path(args.input).with_name(name + suffix)
    stem = args.model.rpartition(":")[2] if args.model else "model"
    return Path(stem + suffix)


def _ignored_options(args, what: str) -> None:
    """Warn about SAL options that cannot apply (a converted archive's plan is fixed)."""
    defaults = _parser_defaults()
    given = [("--" + k.replace("_", "-")) for k in _CONFIG_DESTS
             if getattr(args, k, None) != defaults.get(k)]
    for k in ("train_mode", "input_dtype", "vocab"):
        if getattr(args, k, None):
            given.append("--" + k.replace("_", "-"))
    if given:
        _note(f"{', '.join(given)} ignored: {what}")


def _parser_defaults() -> dict:
    p = argparse.ArgumentParser()
    config_args(p)
    return vars(p.parse_args([]))


# ------------------------------------------------------------------ commands
def _convert(args) -> int:
    from . import files
    from .archive import save
    from .pipeline import transform
    out = files.check_output(args.output or _default_output(args), args.force)
    config = config_from(args)
    (model, example), embedded = _load_source(args)
    if embedded:
        raise SalcompileError(f"{args.input} was already converted by salcompile; convert the "
                              "original model (or train it: python -m salcompile train --resume "
                              f"{args.input} ...).")
    sal = transform(model, example, config)
    _check_batch(args, sal, example)
    save(sal, example, out, force=args.force)
    print(sal.sal_plan)
    print(f"wrote {out}  (reload: salcompile.load({str(out)!r}); it trains with "
          f"{config.feedback.upper()})")
    return 0


def _inspect(args) -> int:
    from .plan import Plan
    from .pipeline import plan
    (model, example), embedded = _load_source(args)
    if embedded:
        _ignored_options(args, f"{args.input} was converted already; its plan is fixed "
                               "(inspect the original model to see another configuration's "
                               "plan).")
        print(Plan.from_json(embedded))
    else:
        print(plan(model, example, config_from(args)))
    return 0


def _export(args) -> int:
    from . import files
    from . import model_source as ms
    from .archive import load
    from .module import SALModule
    defaults = {"onnx": ".onnx", "train-step": ".step.onnx", "ort-training": ".ort-training"}
    args.model = None
    if args.output is None:
        args.output = str(_default_output(args, defaults[args.to]))
    if args.to != "ort-training":   # a directory: export_ort_training checks its own contents
        files.check_output(args.output, args.force)
    if files.detect_format(args.input) != files.EXPORT:
        raise SalcompileError(f"{args.input} is not a torch.export archive; run `python -m "
                              "salcompile convert` on it first.")
    sal = load(args.input)
    if not isinstance(sal, SALModule):
        raise SalcompileError(f"{args.input} was not written by salcompile (no plan inside); "
                              "convert the model first: python -m salcompile convert ...")
    example = _example_from_args(args, sal)
    if example is None:
        example = ms.archive_inputs(files.load_export(args.input))
        if example is None:
            raise _need_shape(str(args.input))
        example = _retype(example, args, sal)
    if args.to == "onnx":
        from .onnx import export_onnx
        with _progress(f"exporting {args.input} to ONNX", "onnx"):
            export_onnx(sal, example, args.output, opset=args.opset, force=args.force)
        print(f"wrote {args.output}  (onnxruntime.InferenceSession({str(args.output)!r}))")
    elif args.to == "ort-training":
        from .onnx import export_ort_training
        with _progress(f"exporting {args.input} to ONNX Runtime training artifacts",
                       "ort-training"):
            export_ort_training(sal, example, args.output, loss=args.loss,
                                optimizer=args.optimizer, force=args.force)
        print(f"wrote ONNX Runtime training artifacts to {args.output}  "
              "(onnxruntime.training.api: CheckpointState, Module, Optimizer)")
    else:
        from .onnx import export_train_step
        with _progress(f"exporting {args.input} as one ONNX train-step graph "
                       "(forward, FA/DFA backward and the optimizer written out)", "train-step"):
            export_train_step(sal, example, args.output, loss=args.loss,
                              optimizer=args.optimizer, lr=args.lr,
                              weight_decay=args.weight_decay, momentum=args.momentum,
                              force=args.force)
        print(f"wrote {args.output}  (salcompile.TrainStepSession({str(args.output)!r}, ...) or "
              "any onnxruntime InferenceSession)")
    return 0


def _train(args) -> int:
    from dataclasses import asdict
    import torch
    from . import files
    from . import model_source as ms
    from . import data as datasets
    from .archive import load, save
    from .experiment import ExperimentResult, RunResult, with_model_defaults, write_results
    from .module import SALModule
    from .pipeline import transform
    from .training import Recipe, fit
    if not args.model and not args.resume:
        raise SalcompileError("name the model to train: --model NAME|file.py:Class, or "
                              "--resume ARCHIVE to continue a trained one.")
    try:
        recipe = Recipe(optimizer=args.optimizer, lr=args.lr, batch=args.batch,
                        epochs=args.epochs, momentum=args.momentum,
                        weight_decay=args.weight_decay)
    except SalcompileError as exc:
        raise SalcompileError(cli_wording(str(exc))) from exc
    config = config_from(args)
    if args.output and args.seeds > 1:
        raise SalcompileError("-o saves one trained model: give --seeds 1 (or --out DIR, which "
                              "keeps one archive per seed).")
    outputs = []
    if args.output:
        outputs = [files.check_output(args.output, args.force)]
    if args.out:
        files.check_output_dir(args.out)
        if not args.output:
            outputs = [Path(args.out) / ("model.sal.pt2" if args.seeds == 1
                                         else f"model.seed{s}.sal.pt2") for s in range(args.seeds)]
    from .training import resolve_device
    device = resolve_device(args.device)
    if args.precision == "fp16" and device.type == "cpu":
        from .training import FP16_ON_CPU
        _note(FP16_ON_CPU.replace("precision=", "--precision ").replace("'", ""))
        warnings.filterwarnings("ignore", message=re.escape(FP16_ON_CPU))  # said once, above
    model_kwargs = ms.parse_model_args(args.model_args)[1] if args.model else {}
    ds = datasets.load_any(args.data, data_dir=args.data_dir, grayscale=args.grayscale,
                           flatten=args.flatten, limit=args.limit,
                           seq_len=model_kwargs.get("seq_len", 64))
    zoo = bool(args.model) and ms.is_zoo_name(args.model) and not args.resume
    if zoo:
        config = with_model_defaults(args.model, config)
    if args.resume:
        if args.model or args.weights:
            _note("--model / --weights are ignored with --resume (the archive holds both).")
        _ignored_options(args, f"--resume {args.resume} keeps the archive's plan.")
    label = args.model or Path(args.resume).name
    result = ExperimentResult(label, args.data, config.to_dict(), asdict(recipe))
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        xtr, xte = ds.x_train, ds.x_test
        if args.resume:
            if files.detect_format(args.resume) != files.EXPORT:
                raise SalcompileError(f"--resume {args.resume}: not a torch.export archive; give "
                                      "an archive written by train -o or convert.")
            sal = load(args.resume)
            if not isinstance(sal, SALModule):
                raise SalcompileError(f"--resume {args.resume} was not written by salcompile; "
                                      "convert it first (python -m salcompile convert).")
            example = ms.archive_inputs(files.load_export(args.resume))
            if example and example[0].dim() == 2 and xtr.dim() > 2:
                xtr, xte = xtr.flatten(1), xte.flatten(1)
        else:
            if zoo:
                net, xtr, xte = _zoo_for_data(args.model, ds, model_kwargs)
            else:
                net = ms.build_model(args.model, args.model_args)
            if args.weights:
                ms.load_weights(net, args.weights, f"--model {args.model}")
            sal = transform(net, (xtr[:2],), config.replace(
                feedback_seed=config.feedback_seed + seed,
                routing_seed=config.routing_seed + seed))
        if seed == 0:
            print(sal.sal_plan)

        def on_epoch(rec, seed=seed):
            extra = "" if rec.routing_balance is None else \
                f"  areas {rec.active_areas} balance {rec.routing_balance:.3f}"
            align = "" if rec.alignment is None else f"  align {rec.alignment:5.1f}°"
            print(f"seed {seed} epoch {rec.epoch:3d}/{recipe.epochs}  loss {rec.train_loss:.4f}  "
                  f"train {rec.train_acc:5.1f}%  test {rec.test_acc:5.1f}%{extra}{align}"
                  + (f"  NONFINITE {rec.nonfinite}" if rec.nonfinite else "")
                  + (f"  skipped {rec.extra['skipped_steps']} step(s), loss scale "
                     f"{rec.extra['loss_scale']:g}" if rec.extra.get("skipped_steps") else ""),
                  flush=True)

        records = fit(sal, (xtr, ds.y_train), (xte, ds.y_test), recipe, seed=seed,
                      alignment=not args.no_alignment, progress=not args.no_progress,
                      desc=f"{label}/{args.data} seed {seed}", on_epoch=on_epoch,
                      device=device, precision=args.precision)
        sal.to("cpu")   # archives are written (and reload) on the CPU
        result.runs.append(RunResult(seed, records, sum(p.numel() for p in sal.parameters())))
        if outputs:
            save(sal, (xtr[:2],), outputs[seed], force=True)
            print(f"wrote {outputs[seed]}  (salcompile.load; python -m salcompile train "
                  f"--resume {outputs[seed]} ...)")
    print(f"{label} on {args.data}: test accuracy {result.mean:.2f} ± {result.std:.2f} % "
          f"over {args.seeds} seed(s)")
    if args.out:
        write_results(result, args.out)
        print(f"wrote {os.path.join(args.out, 'metrics.json')}, metrics.csv, learning_curve.png")
    return 0


def _zoo_for_data(name: str, ds, kwargs: dict):
    """(zoo model sized to the dataset, x_train, x_test): token data (an LM dataset) sizes a
    token model's vocabulary and context; feature/image data goes through fit_model_to_data."""
    from .experiment import fit_model_to_data
    from .models import REGISTRY, build
    tokens_in = not ds.x_train.is_floating_point()
    takes_tokens = not REGISTRY[name].input_dtype.is_floating_point
    if tokens_in != takes_tokens:
        have = "token ids" if tokens_in else f"features {tuple(ds.x_train.shape[1:])}"
        want = "token ids (a language model)" if takes_tokens else "float features or images"
        fix = "--data tokens or a .txt file" if takes_tokens else \
            "--model gpt, or your own class (--model file.py:Class)"
        raise SalcompileError(f"--model {name} takes {want}; --data {ds.name} holds {have}. "
                              f"Use {fix}.")
    if not tokens_in:
        return fit_model_to_data(name, ds, **kwargs)
    lm = ds.y_train.dim() == 2
    if not lm:
        raise SalcompileError(f"--model {name} is a language model (next-token targets); --data "
                              f"{ds.name} holds one class per sequence. Use your own sequence "
                              "classifier (--model file.py:Class).")
    kwargs = {"num_classes": ds.num_classes, "seq_len": ds.x_train.shape[1], **kwargs}
    if kwargs["seq_len"] < ds.x_train.shape[1]:
        raise SalcompileError(f"--model-args seq_len={kwargs['seq_len']} is shorter than the "
                              f"data's sequences ({ds.x_train.shape[1]} tokens).")
    return build(name, **kwargs), ds.x_train, ds.x_test


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)   # --help, --version and usage errors exit here: no torch
    import torch
    from . import ops  # noqa: F401  (the salcompile:: custom ops, before any archive is read)
    threads = torch.get_num_threads()
    _set_threads(args)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return {"convert": _convert, "inspect": _inspect, "train": _train,
                    "export": _export}[args.command](args)
    except SalcompileError as exc:
        print(f"salcompile: error: {cli_wording(str(exc))}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)   # an in-process caller keeps its own setting
