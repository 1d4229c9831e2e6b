"""What the three ONNX exporters share: the opset and IR version the training exports pin, the
torch.onnx (dynamo) call with its errors made readable, and the names of an exported graph."""
from __future__ import annotations

import logging
import re
import warnings
from typing import Optional

import torch
import torch.fx as fx

from ..errors import SalcompileError

# The training exports (ORT artifacts, train-step graph) pin what onnxruntime(-training) 1.19 reads.
TRAINING_OPSET = 20
TRAINING_IR_VERSION = 10
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("adamw", "sgd")


def check_training_choices(who: str, loss: str, optimizer: str) -> None:
    if loss not in LOSSES:
        raise SalcompileError(f"{who}: loss must be one of {', '.join(LOSSES)}, not {loss!r}.")
    if optimizer not in OPTIMIZERS:
        raise SalcompileError(f"{who}: optimizer must be one of {', '.join(OPTIMIZERS)}, not "
                              f"{optimizer!r}.")


def _require_onnx(who: str = "export_onnx"):
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SalcompileError(f"{who} needs {' and '.join(missing)}: "
                              f"pip install {' '.join(missing)}")


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _dynamic_shapes(example_inputs, dynamic_batch: bool, gm: Optional[fx.GraphModule] = None):
    """Dimension 0 of every tensor input; with `gm`, also every dimension its capture left
    dynamic (the sequence of a language model: capture.dynamic_dims), read from its placeholders.
    Not Dim.AUTO on every dimension 1: the exporter would leave an MLP's features or an image's
    channels nominally dynamic (a symbol with range [8, 8])."""
    if not dynamic_batch:
        return None
    from torch.export import Dim
    from ..capture import batch_dynamic
    spec = batch_dynamic(tuple(example_inputs))
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"] if gm is not None else []
    if len(phs) != len(spec):
        return spec
    out = []
    for n, x, dims in zip(phs, example_inputs, spec):
        v = n.meta.get("val")
        if isinstance(x, torch.Tensor) and isinstance(v, torch.Tensor) and v.dim() == x.dim() \
                and isinstance(dims, dict):
            dims = {**dims, **{d: Dim.AUTO for d, size in enumerate(v.shape)
                               if isinstance(size, torch.SymInt) and size.node.expr.free_symbols}}
        out.append(dims)
    return tuple(out)


def _beyond_batch(spec) -> bool:
    return bool(spec) and any(isinstance(d, dict) and set(d) - {0} for d in spec)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _causes(exc: BaseException):
    """exc, then what it was raised from (or during), innermost last."""
    seen = []
    while exc is not None and exc not in seen and len(seen) < 12:
        seen.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return seen


def _lines(exc: BaseException):
    return [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]


def failure_cause(exc: BaseException, max_lines: int = 2) -> str:
    """'Type: first line(s)' of the innermost cause of `exc` (the exporters wrap the real error,
    e.g. a DispatchError naming an op without an ONNX function, in generic ones), with the
    node being translated when a wrapper names it."""
    chain = _causes(exc)
    root = chain[-1]
    text = " ".join(_lines(root)[:max_lines]) or "(no message)"
    if len(text) > 600:
        text = text[:600] + "..."
    out = f"{type(root).__name__}: {text}"
    where = next((ln for e in chain[1:-1] for ln in _lines(e)[:1]
                  if "node" in ln.lower() and ln not in text), None)
    if where:
        out += f" [{where}]"
    return out


def exporter_error(who: str, exc: Exception) -> SalcompileError:
    """The exporter's failure with its real cause: the exporter's own message is generic (its
    ConversionError says 'Refer to the full stack trace above'), the cause is in __cause__."""
    chain = _causes(exc)
    if len(chain) > 1:
        cause = failure_cause(exc)
    else:
        lines = _lines(exc)
        why = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
        cause = f"{type(exc).__name__}: {(why or lines or [''])[-1]}"
    hint = ""
    if "No ONNX function found" in cause or "no onnx function" in cause.lower():
        hint = (" An op of the model has no ONNX translation: replace it in the model with "
                "standard torch ops, or give it one (an onnxscript function in torch.onnx.export's "
                "custom_translation_table; salcompile.onnx.common.export_graph passes one on).")
    via = f" (reported as {type(exc).__name__})" if len(chain) > 1 else ""
    return SalcompileError(f"{who}: the ONNX exporter failed: {cause}{via}.{hint}")


def export_graph(gm: fx.GraphModule, example_inputs: tuple, dynamic_batch: bool, who: str,
                 opset: Optional[int] = None, custom_translation_table: Optional[dict] = None,
                 sequence: bool = False):
    """(ONNX ModelProto, the eager output) of an inference graph: a trial run first (clear errors
    for wrong inputs), then the dynamo exporter (dynamo_export).
    `custom_translation_table`: {op overload: onnxscript function}, passed to the exporter.
    `sequence` (with dynamic_batch): the dimensions beyond the batch that `gm`'s capture left
    dynamic (the sequence: capture.dynamic_dims) are dynamic in the ONNX graph too; when the
    export fails with them, it is retried with the batch alone dynamic, with a warning."""
    try:
        with torch.no_grad():
            out = gm(*example_inputs)
    except Exception as exc:
        raise SalcompileError(f"{who}: the module does not run on example_inputs "
                              f"({type(exc).__name__}: {_first_line(exc)}).") from exc
    spec = _dynamic_shapes(example_inputs, dynamic_batch, gm if sequence else None)
    if _beyond_batch(spec):
        try:
            return dynamo_export(gm, example_inputs, spec, who, opset,
                                 custom_translation_table), out
        except SalcompileError as exc:
            first = exc
        proto = dynamo_export(gm, example_inputs, _dynamic_shapes(example_inputs, True), who,
                              opset, custom_translation_table)
        warnings.warn(f"{who}: the export with dimension 1 (the sequence) dynamic failed "
                      f"({str(first).split(': ', 1)[-1]}); exported with the batch alone dynamic, "
                      "so the ONNX model takes only the example's sequence length.",
                      stacklevel=3)
        return proto, out
    proto = dynamo_export(gm, example_inputs, spec, who, opset, custom_translation_table)
    return proto, out


def dynamo_export(gm: fx.GraphModule, args: tuple, dynamic_shapes, who: str,
                  opset: Optional[int] = None, custom_translation_table: Optional[dict] = None):
    """torch.onnx.export (dynamo) with parameter names kept (optimize=False: onnxscript's
    optimizer also folds small constants such as an eps of 1e-8 to 0), its logs quieted; the
    exporter's failure as a SalcompileError."""
    kw = {} if opset is None else {"opset_version": int(opset)}
    if custom_translation_table:
        kw["custom_translation_table"] = dict(custom_translation_table)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)   # "torchvision is not installed" notices
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(gm, args, dynamo=True, optimize=False,
                                        dynamic_shapes=dynamic_shapes, verbose=False,
                                        report=False, **kw)
        return program.model_proto
    except Exception as exc:
        raise exporter_error(who, exc) from exc
    finally:
        onnx_log.setLevel(level)


def _output_names(value) -> Optional[list]:
    """`output` for one tensor, `output_i` for a tuple/list, the keys of a dict (ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return ["output"]
    if isinstance(value, dict):
        names = [str(k) for k, v in value.items() if isinstance(v, torch.Tensor)]
        return names if len(names) == len(value) else None
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return [f"output_{i}" for i in range(len(value))]
    return None


def name_graph(proto, out_value=None) -> None:
    """Readable names in an exported inference graph, in place: the outputs `output` (see
    _output_names), the dynamic dimensions `batch` (dimension 0 of the inputs) and `sequence`
    (dimension 1) instead of the exporter's `s77`, also inside derived sizes (`Min(8, s27)`)."""
    g = proto.graph
    names = _output_names(out_value) if out_value is not None else None
    taken = {v.name for v in g.input} | {i.name for i in g.initializer}
    if names and len(names) == len(g.output) and len(set(names)) == len(names) \
            and not set(names) & taken:
        rename = {o.name: n for o, n in zip(g.output, names) if o.name not in taken}
        if not set(rename.values()) & {v for node in g.node for v in node.output}:
            for node in g.node:
                node.output[:] = [rename.get(v, v) for v in node.output]
                node.input[:] = [rename.get(v, v) for v in node.input]
            for v in list(g.output) + list(g.value_info):
                v.name = rename.get(v.name, v.name)
    dims = {}
    for v in g.input:
        shape = v.type.tensor_type.shape.dim
        for axis, label in ((0, "batch"), (1, "sequence")):
            if len(shape) > axis and shape[axis].dim_param and \
                    shape[axis].dim_param not in dims and label not in dims.values():
                dims[shape[axis].dim_param] = label
    dims = {k: v for k, v in dims.items() if re.fullmatch(r"\w+", k)}
    if not dims:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, dims)) + r")\b")
    for v in list(g.input) + list(g.output) + list(g.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: dims[m.group(1)], d.dim_param)


def refuse_training_export(sal, who: str) -> None:
    """The training exporters edit or trace a layer's backward by its weight parameter: composed
    weights (LoRA, parametrizations), grouped_mm experts and weights gathered by indices
    (W[expert_ids]) are not covered yet. Refuse them rather than export a graph whose backward
    would be backprop's."""
    def why(l):
        if l.constituents:
            return "composed weight"
        if l.op == "grouped_mm":
            return "grouped_mm"
        if {"index", "index_select"} & set(l.via.split(".")):
            return "weight gathered by indices"
        return None
    odd = [f"{l.name} ({why(l)})" for l in sal.sal_plan.layers if why(l)]
    if odd:
        raise SalcompileError(
            f"{who}: layers {', '.join(odd)} are not supported by the ONNX Runtime training "
            "exporters yet (their FA backward would not survive the export). Train them in torch "
            "(eager or salcompile.compile); export_onnx gives their inference graph.")

