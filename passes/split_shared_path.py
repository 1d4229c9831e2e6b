"""A shared dense path beside the routed areas (SALConfig(shared_fraction=f); our reading of the
paper's unspecified "dual-path architecture", not the paper's own design).

In every gated partition linear layer the first `shared` outputs form a dense path that every
row computes and updates; the other outputs split into K areas as before. A layer reading such
an activation reads its shared columns densely and only its area's block of the routed ones.
Runs after make_area_ops and rewrites each such area op into existing, tested ops on slices of
the same weight (so FA, the feedback rules, the exporters and the references need nothing new):

    W = [[W_ss, W_sr],      rows: shared outputs | routed outputs (K blocks)
         [W_rs, W_rr]]      cols: shared inputs  | routed inputs (the area's block)

    shared out = linear(x_s, W_ss, b_s) + area(x_r, W_sr, mode="dense", input_block)
    routed out = area(x_s, W_rs, b_r, "partition") + area(x_r, W_rr, "partition", input_block)

A first layer (dense input) has no routed input columns; an exit layer (dense output) no
routed outputs. The pieces are `LayerEntry.parts`; attach_fa gives each the matching slice of
the layer's feedback. `input_block_gain` scales only the routed input columns (make_area_ops):
those sum K times fewer inputs than the initialisation assumed, the shared ones do not.
Convolutions and replicate mode keep the pure partition (a plan note says so).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.fx as fx

from salcompile.config import SALConfig
from salcompile.layers import LayerSpec

from ._meta import fake_val as _fake_val
from .context import PassContext

aten = torch.ops.aten


def shared_width(n: int, k: int, fraction: float) -> int:
    """Columns of an n-wide partition activation that are shared: the rest, a multiple of K
    (n - K·round((1-f)·n/K)); 0 for f=0 (pure partition), n for f=1 (dense)."""
    if fraction <= 0 or k <= 1:
        return 0
    routed = k * int(round((1.0 - fraction) * n / k))
    return n - min(n, max(0, routed))


def shared_widths(spec: LayerSpec, entry, config: SALConfig):
    """(shared outputs, shared input columns) of a gated layer; (0, 0) where the shared path
    does not apply (convolutions, replicate mode, a weight read through views)."""
    if config.shared_fraction <= 0 or spec.kind != "linear" or spec.weight.op != "get_attr" \
            or entry.area_mode not in ("partition", "exit"):
        return 0, 0
    n_out, m_in = _weight_shape(spec, entry)
    k, f = config.areas, config.shared_fraction
    return (shared_width(n_out, k, f) if entry.area_mode == "partition" else 0,
            shared_width(m_in, k, f) if entry.input_block else 0)


def _node(g: fx.Graph, target, args) -> fx.Node:
    n = g.call_function(target, tuple(args))
    val = _fake_val(target, args)
    if val is not None:
        n.meta["val"] = val
    return n


def _slice(g, t, dim, start, end):
    return _node(g, aten.slice.Tensor, (t, dim, start, end))


def split_shared_path(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    specs, plan, config = ctx.specs, ctx.plan, ctx.config
    f = config.shared_fraction
    if f <= 0:
        return gm
    g = gm.graph
    k = config.areas
    skipped = []
    for spec, entry in zip(specs, plan.layers):
        if not spec.area:
            continue
        n_s, m_s = shared_widths(spec, entry, config)
        if not (n_s or m_s) and entry.area_mode != "exit":
            skipped.append(entry.name)
        entry.shared, entry.shared_in = n_s, m_s
        if not n_s and not m_s:
            continue
        n_out, m_in = _weight_shape(spec, entry)
        node = spec.node
        x, area, anchor, w, b = node.args[:5]
        with g.inserting_before(node):
            out, parts = _rewrite(g, node.target, x, area, anchor, w, b, n_out, m_in, n_s, m_s,
                                  k, entry.area_mode, entry.input_block)
        out.meta.setdefault("val", node.meta.get("val"))
        node.replace_all_uses_with(out)
        g.erase_node(node)
        spec.node, spec.parts = out, parts
        entry.node, entry.parts = out.name, [p.name for p in parts]
    if skipped:
        plan.notes.append(f"shared_fraction={f}: {', '.join(skipped)} keep the pure partition "
                          "(the shared path covers linear layers in partition mode).")
    g.lint()
    gm.recompile()
    return gm


def _weight_shape(spec: LayerSpec, entry):
    val = spec.weight.meta.get("val")
    shape = list(val.shape) if val is not None else list(entry.shape)
    return int(shape[0]), int(shape[1])


def _rewrite(g, target, x, area, anchor, w, b, n_out, m_in, n_s, m_s, k, area_mode,
             input_block):
    """(the layer's output, [its part nodes]) for one gated linear layer."""
    parts: List[fx.Node] = []

    def area_op(xi, wi, bi, mode, block):
        n = _node(g, target, (xi, area, anchor, wi, bi, None, k, mode, block, False))
        parts.append(n)
        return n

    def dense(xi, wi, bi):
        n = _node(g, aten.linear.default, (xi, wi, bi))
        parts.append(n)
        return n

    def add(a, c):
        return _node(g, aten.add.Tensor, (a, c))

    def rows(t, lo, hi):
        return _slice(g, t, 0, lo, hi)

    if m_s == m_in:   # every input column shared (f=1): the layer reads its input densely
        m_s, input_block = 0, False
        if area_mode == "exit":
            return dense(x, w, b), parts
    xs = xr = None
    if m_s:
        xs, xr = _slice(g, x, -1, 0, m_s), _slice(g, x, -1, m_s, m_in)

    def cols(t, lo, hi):
        return _slice(g, t, 1, lo, hi)

    def bias(lo, hi) -> Optional[fx.Node]:
        return None if b is None else rows(b, lo, hi)

    if area_mode == "exit":   # dense output, shared + block-read routed input
        return add(dense(xs, cols(w, 0, m_s), b), area_op(xr, cols(w, m_s, m_in), None,
                                                          "dense", True)), parts
    blocks = []
    for lo, hi, mode in ((0, n_s, "dense"), (n_s, n_out, "partition")):
        if hi <= lo:
            continue
        wr, br = rows(w, lo, hi), bias(lo, hi)
        if m_s:   # shared input columns densely, routed ones by the row's area block
            a = dense(xs, cols(wr, 0, m_s), br) if mode == "dense" else \
                area_op(xs, cols(wr, 0, m_s), br, "partition", False)
            blocks.append(add(a, area_op(xr, cols(wr, m_s, m_in), None, mode, True)))
        elif input_block:   # routed input only (the layer before has no shared path)
            blocks.append(area_op(x, wr, br, mode, True))
        else:               # dense input (the region's first layer)
            blocks.append(dense(x, wr, br) if mode == "dense" else
                          area_op(x, wr, br, "partition", False))
    out = blocks[0] if len(blocks) == 1 else _node(g, aten.cat.default, (blocks, -1))
    return out, parts


__all__ = ["split_shared_path", "shared_width", "shared_widths"]
