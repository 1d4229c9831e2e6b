"""Split the bias-fused matmuls (addmm, baddbmm, addbmm) into a layer plus an add.

`torch.addmm(b, x, W)` is how Hugging Face's `Conv1D` (GPT-2, its 8 of 9 weight layers) and many
hand-written layers compute `x @ W + b`; `baddbmm`/`addbmm` are the batched forms. The layer finder
knows linear and matmul layers, so:

  addmm(b, x, W)           ->  linear(x, t(W), b)           (W a weight, b 1-D, beta = alpha = 1)
  addmm(b, x, W, β, α)     ->  β·b + α·linear(x, t(W))       (W a weight; any other bias)
  addmm(b, A, B, β, α)     ->  β·b + α·mm(A, B)              (otherwise: e.g. W @ x)
  baddbmm(b, A, B, β, α)   ->  β·b + α·bmm(A, B)
  addbmm(b, A, B, β, α)    ->  β·b + α·sum(bmm(A, B), 0)

β = 0 drops the bias term (torch ignores `b` then, NaN included). When `x` is `view(h, [-1, in])`
of an N-D `h` and every reader views the result back to `h`'s leading dims (GPT-2:
`addmm(b, h.view(-1, in), W).view(*h.shape[:-1], out)`), the linear reads `h` directly: the
layer then has the per-token rows of its neighbours, so SAL regions route it like any FFN layer.
Nodes this pass inserts carry `meta["val"]` when the capture has shapes. torch-level calls of a
symbolic_trace graph (`torch.addmm`, `x.addmm(...)`) are handled too.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.fx as fx

from salcompile.layers import WeightTracer, bind
from ._meta import fake_val as _fake_val
from .context import PassContext

aten = torch.ops.aten

_ATEN = {aten.addmm.default: "addmm", aten.baddbmm.default: "baddbmm",
         aten.addbmm.default: "addbmm"}
_TORCH = {torch.addmm: "addmm", torch.baddbmm: "baddbmm", torch.addbmm: "addbmm"}
_METHODS = {"addmm", "baddbmm", "addbmm"}
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _call(g: fx.Graph, target, args, like: fx.Node) -> fx.Node:
    n = g.call_function(target, tuple(args))
    v = _fake_val(target, args)
    n.meta = {k: like.meta[k] for k in ("nn_module_stack", "stack_trace") if k in like.meta}
    if v is not None:
        n.meta["val"] = v
    return n


def _arguments(node: fx.Node) -> Optional[Dict[str, Any]]:
    if node.op == "call_function" and node.target in _ATEN:
        a = bind(node)
        names = [x.name for x in node.target._schema.arguments]
        return dict(kind=_ATEN[node.target], b=a[names[0]], m1=a[names[1]], m2=a[names[2]],
                    beta=a.get("beta", 1), alpha=a.get("alpha", 1))
    if (node.op == "call_function" and node.target in _TORCH) or (
            node.op == "call_method" and node.target in _METHODS):
        kind = _TORCH.get(node.target, node.target)
        if len(node.args) < 3:
            return None
        b, m1, m2 = node.args[:3]
        return dict(kind=kind, b=b, m1=m1, m2=m2, beta=node.kwargs.get("beta", 1),
                    alpha=node.kwargs.get("alpha", 1))
    return None


def _is_vector(n) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    if v is not None:
        return v.dim() == 1
    if isinstance(n, fx.Node) and n.op == "get_attr":
        try:
            return n.graph.owning_module.get_parameter(n.target).dim() == 1
        except AttributeError:
            return False
    return False


def decompose_addmm(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    """Rewrite every addmm / baddbmm / addbmm (aten or torch-level) as described above."""
    g = gm.graph
    todo = [(n, a) for n in g.nodes if (a := _arguments(n)) is not None]
    if not todo:
        return gm
    tracer = WeightTracer(gm)
    for node, a in todo:
        b, m1, m2, beta, alpha, kind = a["b"], a["m1"], a["m2"], a["beta"], a["alpha"], a["kind"]
        weight_x = kind == "addmm" and tracer.weight_of(m2) is not None \
            and tracer.weight_of(m1) is None
        with g.inserting_before(node):
            if weight_x:
                wt = _call(g, aten.t.default, (m2,), node)
                fused_bias = beta == 1 and alpha == 1 and _is_vector(b)
                prod = _call(g, aten.linear.default, (m1, wt, b if fused_bias else None), node)
                if fused_bias:
                    if not _readers_on_rows(g, node, prod, m1, wt, b):
                        _replace(g, node, prod)
                    continue
            elif kind == "addmm":
                prod = _call(g, aten.mm.default, (m1, m2), node)
            else:
                prod = _call(g, aten.bmm.default, (m1, m2), node)
                if kind == "addbmm":
                    prod = _call(g, aten.sum.dim_IntList, (prod, [0]), node)
            if alpha != 1:
                prod = _call(g, aten.mul.Tensor, (prod, alpha), node)
            out = prod
            if beta != 0:
                bias = b if beta == 1 else _call(g, aten.mul.Tensor, (b, beta), node)
                out = _call(g, aten.add.Tensor, (prod, bias), node)
        _replace(g, node, out)
    g.lint()
    gm.recompile()
    return gm


def _replace(g: fx.Graph, old: fx.Node, new: fx.Node) -> None:
    if "val" not in new.meta and "val" in old.meta:
        new.meta["val"] = old.meta["val"]
    old.replace_all_uses_with(new)
    g.erase_node(old)


def _readers_on_rows(g: fx.Graph, node: fx.Node, prod: fx.Node, m1: fx.Node, wt: fx.Node,
                     b) -> bool:
    """GPT-2's Conv1D: view(addmm(b, view(h, [-1, in]), W), [*h.shape[:-1], out]). Readers that
    view the result back to h's rows read linear(h, Wᵀ, b) instead."""
    if not (isinstance(m1, fx.Node) and m1.op == "call_function" and m1.target in _VIEWS):
        return False
    h = m1.args[0]
    hv, mv = (h.meta.get("val") if isinstance(h, fx.Node) else None), m1.meta.get("val")
    ov = node.meta.get("val")
    if hv is None or mv is None or ov is None or hv.dim() < 3 or mv.dim() != 2:
        return False
    want = [str(d) for d in hv.shape[:-1]] + [str(ov.shape[-1])]
    rows = [u for u in node.users if u.op == "call_function" and u.target in _VIEWS
            and (uv := u.meta.get("val")) is not None and [str(d) for d in uv.shape] == want]
    if not rows:
        return False
    with g.inserting_after(prod):
        full = _call(g, aten.linear.default, (h, wt, b), node)
    for u in rows:
        u.replace_all_uses_with(full)
        g.erase_node(u)
    if not node.users:   # every reader went to the N-D form: drop the 2-D one and its view
        node.replace_all_uses_with(prod)
        for n in (node, prod, m1):
            if not n.users:
                g.erase_node(n)
        return True
    return False
