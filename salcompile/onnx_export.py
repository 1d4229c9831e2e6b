"""Exporting a transformed module as an inference ONNX graph.

    salcompile.export_onnx(sal, (x,), "model.onnx")

The graph is the module's eval-mode forward. A copy of its FX graph is rewritten into ordinary
aten ops before the standard (dynamo) exporter runs:

  * FA ops (fa_linear / fa_conv / fa_matmul / fa_einsum) become their forward, the plain layer,
    and DFA's `dfa_output` and detached reads disappear; feedback buffers are dropped;
  * `count_routes` (routing statistics, a side effect) and the `check_finite` guards are dropped;
  * `region_gate` becomes its forward: argmax(normalize(features · Pᵀ) · Cᵀ), int64 areas;
  * area ops (area_linear / area_conv, fast or reference) become the masked-dense form: every
    area's block runs on every row, is multiplied by the 0/1 mask of the rows routed to it, and the
    blocks are assembled. K× the compute of the routed layer, exactly the routed result;
  * mode flags (batch norm, dropout) are fixed to eval, and the batch-norm counter update is
    dropped.

Parameter and buffer names are kept: the ONNX initializers carry the module's state_dict names.
Inputs carry the forward's argument names (`x`, `tokens`, `input_ids`); the output is `output`
(several: `output_0`, `output_1`, ...; a dict or ModelOutput: its keys, e.g. `logits`); the
dynamic dimensions are `batch` and `sequence` (dimension 1 of an input, where it is dynamic).
"""
from __future__ import annotations

import logging
import operator
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from .errors import SalcompileError
from .files import atomic_write, check_output
from .module import require_sal

aten = torch.ops.aten
_TINY = 1e-12


def _ops():
    from .ops import areas
    s = torch.ops.salcompile
    return s, areas


# ---------------------------------------------------------------- traceable replacements
def _onnx_route(features, proj, prototypes):
    """The gate's forward (ops/gate.py `route`), written with ops every exporter translates."""
    u = features.to(proj.dtype).matmul(proj.t())
    z = u / u.norm(dim=-1, keepdim=True).clamp_min(_TINY)   # F.normalize, same eps
    return z.matmul(prototypes.t()).argmax(-1)


def _onnx_route_topk(features, proj, prototypes, k):
    """region_gate_topk's forward: each row's k best areas, best first (ONNX TopK)."""
    u = features.to(proj.dtype).matmul(proj.t())
    z = u / u.norm(dim=-1, keepdim=True).clamp_min(_TINY)
    return z.matmul(prototypes.t()).topk(k, dim=-1).indices


def _onnx_grouped_mm(x, weight, offs):
    """fa_grouped_mm's forward without host reads: every expert's matmul on every row, kept
    where the row lies in that expert's offsets (E is static; masked-dense, as the area ops)."""
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(-1)
    ends = offs.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    mask = ((rows >= starts) & (rows < ends)).to(x.dtype)          # [rows, E]
    return torch.einsum("re,reo->ro", mask, torch.einsum("ri,eio->reo", x, weight))


def _onnx_area_linear(x, area, weight, bias, areas: int, mode: str, input_block: bool):
    _, area_ops = _ops()
    n_out, blocks = area_ops._blocks(weight, bias, None, x.shape[-1], areas, mode, input_block)
    rows = area.reshape(area.shape + (1,) * (x.dim() - area.dim()))   # broadcasts over x[..., :]
    parts = []
    for k, blk in enumerate(blocks):
        y = F.linear(x[..., blk.x_in], weight[blk.w], None if bias is None else bias[blk.b])
        parts.append(y * (rows == k).to(y.dtype))
    return torch.cat(parts, -1) if mode == "partition" else sum(parts)


def _onnx_area_conv(x, area, weight, bias, stride, padding, dilation, groups: int, areas: int,
                    mode: str, input_block: bool):
    _, area_ops = _ops()
    n_out, blocks = area_ops._blocks(weight, bias, None, x.shape[1], areas, mode, input_block,
                                     groups)
    rows = area.reshape((-1,) + (1,) * (x.dim() - 1))
    parts = []
    for k, blk in enumerate(blocks):
        y = aten.convolution(x[:, blk.x_in], weight[blk.w],
                             None if bias is None else bias[blk.b], stride, padding, dilation,
                             False, [0] * len(stride), blk.groups)
        parts.append(y * (rows == k).to(y.dtype))
    return torch.cat(parts, 1) if mode == "partition" else sum(parts)


def _onnx_anchor(proj):
    return proj.new_zeros(())


# ---------------------------------------------------------------- the rewrite
def _replace_value(node: fx.Node, value) -> None:
    """Replace every use of `node` by a plain Python value (e.g. False)."""
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)


def inference_graph(sal) -> fx.GraphModule:
    """An eval-mode GraphModule equal to `sal`'s forward, built of aten ops only (shares `sal`'s
    parameters). What export_onnx exports."""
    s, area_ops = _ops()
    from .passes.fuse_regions import unfuse_regions
    g = unfuse_regions(sal.graph)   # a copy; fused regions back to one area op per layer
    linear_targets = (s.area_linear.default, area_ops.area_linear_reference)
    conv_targets = (s.area_conv.default, area_ops.area_conv_reference)
    for node in list(g.nodes):
        t = node.target
        if node.op == "call_module" and t == "_guards_fn":
            g.erase_node(node)
            continue
        if node.op == "get_attr" and t == "training":
            _replace_value(node, False)
            continue
        if node.op != "call_function":
            continue
        a = list(node.args)
        new = fn = None
        if t is s.count_routes.default:
            g.erase_node(node)
            continue
        if t is aten.add_.Tensor and a[1] is False and not node.users:
            g.erase_node(node)   # num_batches_tracked += training (0 in eval mode)
            continue
        if t in (s.check_finite.default, s.dfa_output.default):
            node.replace_all_uses_with(a[0])
            g.erase_node(node)
            continue
        if t is aten.detach.default:   # DFA's detached reads, the gates' detached inputs
            node.replace_all_uses_with(a[0])
            g.erase_node(node)
            continue
        if t is s.fa_linear.default:
            fn, args = aten.linear.default, tuple(a[:3])
        elif t is s.fa_conv.default:
            fn, args = aten.convolution.default, tuple(a[:3] + a[4:10])
        elif t is s.fa_matmul.default:
            fn, args = aten.matmul.default, (a[1], a[0]) if a[3] else (a[0], a[1])
        elif t is s.fa_einsum.default:
            fn, args = aten.einsum.default, (a[0], [a[2], a[1]] if a[4] else [a[1], a[2]])
        elif t is s.fa_grouped_mm.default:
            fn, args = _onnx_grouped_mm, tuple(a[:3])
        elif t is s.region_gate.default:
            fn, args = _onnx_route, tuple(a[:3])
        elif t is s.region_gate_topk.default:
            fn, args = _onnx_route_topk, tuple(a[:3]) + (a[5],)
        elif t in linear_targets:
            x, area, _, w, b, _, areas, mode, input_block = a[:9]
            fn, args = _onnx_area_linear, (x, area, w, b, areas, mode, input_block)
        elif t in conv_targets:
            x, area, _, w, b, _, stride, padding, dilation, groups, areas, mode, input_block = a[:13]
            fn, args = _onnx_area_conv, (x, area, w, b, stride, padding, dilation, groups, areas,
                                         mode, input_block)
        if fn is None:
            continue
        if node.kwargs:
            raise SalcompileError(f"export_onnx: unexpected keyword arguments on {node.name}.")
        with g.inserting_before(node):
            new = g.call_function(fn, args)
            if t in (s.region_gate.default, s.region_gate_topk.default):
                # (area, anchor) -> area; the anchor is a zero
                anchor = g.call_function(_onnx_anchor, (a[1],))
                for user in list(node.users):
                    if user.target is not operator.getitem:
                        raise SalcompileError(f"export_onnx: unexpected use of region gate "
                                              f"{node.name} by {user.name}.")
                    user.replace_all_uses_with(new if user.args[1] == 0 else anchor)
                    g.erase_node(user)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
    left = sorted({str(n.target) for n in g.nodes if n.op == "call_function"
                   and str(n.target).startswith("salcompile.")})
    if left:
        raise SalcompileError(f"export_onnx: no ONNX form for {', '.join(left)}.")
    gm = fx.GraphModule(sal, g, class_name="SALInference")
    # feedback reads and their view chains, counts, unused anchors; on the GraphModule: the
    # purity check of call_module nodes (symbolic_trace captures) needs the owning module
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    return gm


# ---------------------------------------------------------------- export
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
    from .capture import batch_dynamic
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
                "custom_translation_table; salcompile.onnx_export.export_graph passes one on).")
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


def export_onnx(module, example_inputs: Tuple[Any, ...], path, dynamic_batch: bool = True,
                opset: Optional[int] = None, force: bool = False) -> None:
    """Write the eval-mode forward of a transformed module to `path` as an ONNX model.

    `module`: a module returned by salcompile.transform (or its torch.compile wrapper).
    `example_inputs`: a tuple of inputs (a batch of 2 or more when `dynamic_batch`, which makes
    dimension 0 of every tensor input dynamic, and dimension 1 of every input of 2 or more dims
    (the sequence) where the module allows it: a language model's ONNX graph then takes any
    sequence length the module takes; dimensions the model fixes, such as an MLP's features or an
    image's channels, stay static). `opset`: the ONNX opset (None: the exporter's
    default). An existing `path` is an error unless `force`. The file is written atomically.
    FA/DFA feedback, routing statistics and finite checks are training-only and left out; routed
    (area) layers are exported in masked-dense form (every area's block on every row, masked).
    """
    sal = require_sal(module)
    out = check_output(path, force)
    _require_onnx()
    if opset is not None:   # torch's dynamo exporter writes opset 18 and newer
        import onnx
        from .validate import integer
        integer("opset", opset, "export_onnx", lo=18, hi=onnx.defs.onnx_opset_version(),
                hint="the ONNX opset, e.g. 18 (None: the exporter's default)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    proto, out_value = export_graph(inference_graph(sal), example_inputs, dynamic_batch,
                                    "export_onnx", opset, sequence=True)
    name_graph(proto, out_value)
    import onnx
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise SalcompileError(f"export_onnx: the exported model fails onnx.checker: {exc}") \
            from exc
    data = proto.SerializeToString()
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))


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
    top_k = sal.sal_plan.config.get("route_top_k", 1)
    if top_k > 1 and who == "export_ort_training":
        raise SalcompileError(
            f"{who}: route_top_k={top_k} (top-k routing) is not supported by the ONNX Runtime "
            "training artifacts yet. Use export_train_step (one graph: forward, gradients and "
            "update), or train in torch; export_onnx gives the inference graph.")
    if odd:
        raise SalcompileError(
            f"{who}: layers {', '.join(odd)} are not supported by the ONNX Runtime training "
            "exporters yet (their FA backward would not survive the export). Train them in torch "
            "(eager or salcompile.compile); export_onnx gives their inference graph.")


__all__ = ["export_onnx", "inference_graph"]

