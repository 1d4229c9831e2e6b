"""Where the command line gets a model from: a zoo name, `path/to/file.py:ClassName`,
`package.module:ClassName`, a pickled module; and the example inputs it is captured with.

    model = build_model("net.py:Net", '{"hidden": 64}')          # --model / --model-args
    x = example_inputs([(1, 28, 28)], ["float32"], model=model)   # --input-shape / --input-dtype

Every failure is a SalcompileError that names the option and says what to do.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import SalcompileError

DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# ops whose training flag torch.export records as a constant (the argument index of the flag)
_aten = torch.ops.aten
_MODE_FLAG = {_aten.batch_norm.default: 5, _aten.dropout.default: 2,
              _aten.feature_dropout.default: 2, _aten.alpha_dropout.default: 2,
              _aten.feature_alpha_dropout.default: 2, _aten.native_dropout.default: 2}


# ------------------------------------------------------------------ --model
def is_zoo_name(spec: str) -> bool:
    return ":" not in spec and not spec.endswith(".py")


def split_spec(spec: str) -> Tuple[str, str]:
    """('path/to/file.py' or 'package.module', 'ClassName') from `--model`."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise SalcompileError(
            f"--model {spec!r}: expected a zoo name, path/to/file.py:ClassName or "
            "package.module:ClassName (e.g. --model net.py:Net).")
    return where, name


@contextlib.contextmanager
def on_import_path(*dirs):
    """`dirs` first on sys.path while the block runs (the installed `salcompile` script, unlike
    `python -m`, does not have the working directory there)."""
    added = [str(Path(d).resolve()) for d in dirs]
    sys.path[:0] = added
    try:
        yield
    finally:
        for d in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(d)


def _import_file(path: str, spec: str):
    p = Path(path)
    if not p.is_file():
        raise SalcompileError(f"--model {spec!r}: no such file {p}. Give the path of the Python "
                              "file that defines the model class (relative to the working "
                              "directory), e.g. --model models/net.py:Net.")
    resolved = p.resolve()
    for mod in list(sys.modules.values()):   # already imported (a second call, or a package)
        if getattr(mod, "__file__", None) and Path(mod.__file__).resolve() == resolved:
            return mod
    name = p.stem if p.stem.isidentifier() and p.stem not in sys.modules else \
        f"salcompile_user_{abs(hash(str(resolved)))}"
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module   # pickling, dataclasses and deepcopy look classes up here
    try:
        with on_import_path(resolved.parent, os.getcwd()):
            loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise SalcompileError(f"--model {spec!r}: running {p} failed: {type(exc).__name__}: "
                              f"{_first_line(exc)}. Fix the file (it must import on its own: "
                              f"python {p}).") from exc
    return module


def _import_module(name: str, spec: str):
    try:
        with on_import_path(os.getcwd()):
            return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise SalcompileError(
            f"--model {spec!r}: no module named {exc.name!r} (looked in the working directory "
            "and the installed packages). Run from the directory that holds it, install it, or "
            "give the file's path: --model path/to/file.py:ClassName.") from exc
    except Exception as exc:
        raise SalcompileError(f"--model {spec!r}: importing {name} failed: "
                              f"{type(exc).__name__}: {_first_line(exc)}.") from exc


def load_model_class(spec: str):
    """The class (or factory) named by `path/to/file.py:ClassName` or `package.module:Name`."""
    where, name = split_spec(spec)
    looks_like_file = where.endswith(".py") or os.sep in where or "/" in where
    module = _import_file(where, spec) if looks_like_file else _import_module(where, spec)
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            found = sorted(k for k, v in vars(module).items()
                           if isinstance(v, type) and issubclass(v, nn.Module)
                           and getattr(v, "__module__", None) == module.__name__)
            listed = f"its nn.Module classes: {', '.join(found)}" if found else \
                "it defines no nn.Module class"
            raise SalcompileError(f"--model {spec!r}: {where} has no {name!r} ({listed}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SalcompileError(f"--model {spec!r}: {name} is a {type(obj).__name__}, not a class.")
    return obj


def parse_model_args(text: Optional[str]) -> Tuple[list, dict]:
    """(positional, keyword) constructor arguments from `--model-args` JSON (an object gives
    keywords, a list positional arguments)."""
    if text is None or not text.strip():
        return [], {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SalcompileError(
            f"--model-args {text!r} is not valid JSON ({exc.msg} at character {exc.pos}); "
            "write an object of the constructor's keywords, in single quotes for the shell: "
            "--model-args '{\"hidden\": 64, \"num_classes\": 10}'.") from None
    if isinstance(value, dict):
        return [], value
    if isinstance(value, list):
        return value, {}
    raise SalcompileError(f"--model-args {text!r}: expected a JSON object of keywords "
                          f"(or a list of positional arguments), got a {type(value).__name__}.")


def build_model(spec: str, model_args: Optional[str] = None) -> nn.Module:
    """A fresh model from `--model` (zoo name, file.py:Class, package.module:Class) and
    `--model-args` (JSON)."""
    args, kwargs = parse_model_args(model_args)
    if is_zoo_name(spec):
        from .models import build
        if args:
            raise SalcompileError(f"--model-args for zoo model {spec!r} must be a JSON object "
                                  "of keywords, e.g. '{\"hidden\": 64}'.")
        return build(spec, **kwargs)
    cls = load_model_class(spec)
    try:
        model = cls(*args, **kwargs)
    except Exception as exc:
        sig = _signature(cls)
        given = f" with --model-args {model_args}" if model_args else ""
        raise SalcompileError(
            f"--model {spec!r}: constructing {getattr(cls, '__name__', spec)}{given} failed: "
            f"{type(exc).__name__}: {_first_line(exc)}." +
            (f" Its constructor takes {sig}; pass them as --model-args "
             "'{\"name\": value, ...}'." if sig else "")) from exc
    if not isinstance(model, nn.Module):
        raise SalcompileError(f"--model {spec!r} built a {type(model).__name__}, not a "
                              "torch.nn.Module.")
    return model


def load_weights(model: nn.Module, path, what: str) -> None:
    """Load a state_dict file (read with weights_only=True) into `model`."""
    from . import files
    fmt = files.detect_format(path)
    if fmt != files.STATE_DICT:
        raise SalcompileError(f"{path} is a {fmt}, not a state_dict; save the weights with "
                              "torch.save(model.state_dict(), path).")
    try:
        model.load_state_dict(files.load_state_dict(path))
    except RuntimeError as exc:
        raise SalcompileError(f"{path} does not fit {what}: {_first_line(exc)} (build it with "
                              "the --model-args the weights were trained with).") from exc


def _signature(cls) -> str:
    try:
        return str(inspect.signature(cls))
    except (TypeError, ValueError):
        return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ------------------------------------------------------------------ pickles
def load_pickle(path, trust_pickle: bool) -> nn.Module:
    """A fully pickled module (`--trust-pickle`), with the working directory on the import path;
    a class that cannot be found becomes a SalcompileError that says what to do."""
    from . import files
    try:
        with on_import_path(os.getcwd()):
            return files.load_pickled_module(path, trust_pickle)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        where = _missing_class(exc)
        raise SalcompileError(
            f"{path}: the pickle refers to {where}, which cannot be imported here "
            f"({type(exc).__name__}: {_first_line(exc)}). A pickled module stores only the "
            "class's name, not its code. Either save the weights instead "
            "(torch.save(model.state_dict(), 'weights.pt')) and pass the class: "
            "--model path/to/file.py:ClassName weights.pt, or run this command with "
            "--trust-pickle from the directory holding the module that defines the class (the "
            "working directory is on the import path). A class defined in the script that saved "
            "the file (module __main__) can only be reached the first way.") from exc


def _missing_class(exc: BaseException) -> str:
    m = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", str(exc))
    if m:
        module = m.group(2)
        if module == "__main__" or module.endswith(".__main__"):
            module = "__main__ (the script that saved it)"
        return f"class {m.group(1)} of module {module}"
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"module {exc.name}"
    return "a class"


# ------------------------------------------------------------------ example inputs
def parse_shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise SalcompileError(f"--input-shape {text!r}: expected positive integers separated by "
                              "commas (one sample, without the batch), e.g. 64 or 1,28,28.")
    return shape


def default_high(model) -> int:
    """The exclusive upper bound of example integer inputs: the smallest embedding table of the
    model (token ids must index every table they reach), else 2."""
    sizes = []
    if isinstance(model, nn.Module):
        sizes += [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
        graph = getattr(model, "graph", None)
        if graph is not None:
            for n in graph.nodes:
                if n.op == "call_function" and n.target is _aten.embedding.default:
                    w = n.args[0]
                    if getattr(w, "op", None) == "get_attr":
                        with contextlib.suppress(AttributeError):
                            sizes.append(int(_getattr_path(model, w.target).shape[0]))
    return min(sizes) if sizes else 2


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def example_inputs(shapes: Sequence[Tuple[int, ...]], dtypes: Sequence[str] = (), *,
                   high: Optional[int] = None, model=None, batch: int = 2) -> tuple:
    """One random batch per input: `shapes` without the batch; `dtypes` one per input, or one for
    all (default float32); integer inputs drawn from [0, high) (default: default_high(model))."""
    dtypes = list(dtypes) or ["float32"]
    if len(dtypes) == 1:
        dtypes = dtypes * len(shapes)
    if len(dtypes) != len(shapes):
        raise SalcompileError(f"{len(shapes)} --input-shape but {len(dtypes)} --input-dtype: "
                              "give one --input-dtype for all inputs, or one per --input-shape.")
    out = []
    for shape, name in zip(shapes, dtypes):
        dt = DTYPES[name]
        if dt.is_floating_point:
            out.append(torch.randn(batch, *shape, dtype=dt))
        elif dt is torch.bool:
            out.append(torch.randint(0, 2, (batch, *shape)).bool())
        else:
            top = high if high is not None else default_high(model)
            if top < 1:
                raise SalcompileError(f"--vocab {top}: must be >= 1.")
            out.append(torch.randint(0, top, (batch, *shape), dtype=dt))
    return tuple(out)


def archive_inputs(ep) -> Optional[tuple]:
    """Example inputs an exported program carries, else ones built from its input signature
    (symbolic dimensions at 2); None when neither is there."""
    if ep.example_inputs:
        args, kwargs = ep.example_inputs
        if not kwargs:
            return tuple(args)
    try:
        names = list(ep.graph_signature.user_inputs)
        vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
        out = []
        for name in names:
            v = vals.get(name)
            if not isinstance(v, torch.Tensor):
                return None
            shape = [d if isinstance(d, int) else 2 for d in v.shape]
            if v.dtype.is_floating_point:
                out.append(torch.randn(shape, dtype=v.dtype))
            else:
                out.append(torch.zeros(shape, dtype=v.dtype))
        return tuple(out) or None
    except Exception:   # an older or unusual archive: fall back to --input-shape
        return None


def input_dtype_names(example: tuple) -> List[str]:
    return [DTYPE_NAMES.get(t.dtype, "float32") for t in example if isinstance(t, torch.Tensor)]


# ------------------------------------------------------------------ training mode of archives
def eval_mode_ops(gm) -> List[str]:
    """Names of the batch-norm / dropout nodes a torch.export archive recorded in eval mode."""
    return [n.name for n in gm.graph.nodes if n.op == "call_function"
            and n.target in _MODE_FLAG and len(n.args) > _MODE_FLAG[n.target]
            and n.args[_MODE_FLAG[n.target]] is False]


def to_train_mode(gm) -> List[str]:
    """Switch the nodes of eval_mode_ops to training behaviour (batch statistics, dropout on);
    transform() then ties them to .train()/.eval(). Returns their names."""
    names = eval_mode_ops(gm)
    for n in gm.graph.nodes:
        if n.name in names:
            args = list(n.args)
            args[_MODE_FLAG[n.target]] = True
            n.args = tuple(args)
    if names:
        gm.recompile()
    return names


def static_batch(module) -> Optional[int]:
    """The batch size a captured module is fixed at (dimension 0 of its first tensor input is a
    constant in the graph, not a symbol), or None when it is dynamic or unknown."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            d = v.shape[0]
            if isinstance(d, torch.SymInt):   # a symbol torch.export specialised to a number
                d = d.node.maybe_as_int()
            return int(d) if isinstance(d, int) else None
    return None
