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

import operator
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import SalcompileError
from ..files import atomic_write, check_output
from ..module import require_sal
from ..layers import get_arg
from ..ops.plain import plain_call
from .common import _require_onnx, export_graph, name_graph

aten = torch.ops.aten
_TINY = 1e-12


def _ops():
    from ..ops import areas
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
def _pick(node: fx.Node, *names: str) -> tuple:
    """The call's arguments `names`, by parameter name (positional or keyword)."""
    return tuple(get_arg(node, n) for n in names)


def _replace_value(node: fx.Node, value) -> None:
    """Replace every use of `node` by a plain Python value (e.g. False)."""
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)


def inference_graph(sal, routed_form: str = "masked") -> fx.GraphModule:
    """An eval-mode GraphModule equal to `sal`'s forward, built of aten ops only (shares `sal`'s
    parameters). What export_onnx exports. routed_form="compact" (export_ort_training): linear
    area layers become salcompile_onnx::routed_linear, exported in the sorted compact form
    (onnx/compact.py) by its custom translation."""
    s, area_ops = _ops()
    from ..passes.fuse_regions import unfuse_regions
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
        plain = plain_call(t, node.args, node.kwargs)   # salcompile/ops/plain.py
        if plain is not None:
            fn, args = plain
        elif t is s.fa_grouped_mm.default:
            fn, args = _onnx_grouped_mm, _pick(node, "x", "weight", "offs")
        elif t is s.region_gate.default:
            fn, args = _onnx_route, _pick(node, "features", "proj", "prototypes")
        elif t is s.region_gate_topk.default:
            fn, args = _onnx_route_topk, _pick(node, "features", "proj", "prototypes", "k")
        elif t in linear_targets:
            fn, args = _onnx_area_linear, _pick(node, "x", "area", "weight", "bias", "areas",
                                                "mode", "input_block")
            if routed_form == "compact":
                from .compact import routed_linear
                fn = routed_linear._opoverload
        elif t in conv_targets:
            fn, args = _onnx_area_conv, _pick(node, "x", "area", "weight", "bias", "stride",
                                              "padding", "dilation", "groups", "areas", "mode",
                                              "input_block")
        if fn is None:
            continue
        with g.inserting_before(node):
            new = g.call_function(fn, args)
            if t in (s.region_gate.default, s.region_gate_topk.default):
                # (area, anchor) -> area; the anchor is a zero
                anchor = g.call_function(_onnx_anchor, _pick(node, "proj"))
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
        from ..validate import integer
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



__all__ = ["export_onnx", "inference_graph"]
