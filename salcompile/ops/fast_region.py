"""Eager fast path for a whole fused region at few rows (issue 13: the paper-scale step).

passes/fuse_regions.py turns a region into a chain in area-sorted compact form:

    region_sort(area) -> sort_rows(x) -> compact_linear / pointwise ... -> unsort_rows | scatter_blocks

That form wins when rows are many: each area's rows are one block of a grouped matmul. At the
paper's own size (16 rows, 16 areas, a 64-256-10 MLP) the step is bound by the number of ops, not
by arithmetic, and the sort, the gathers and one Python backward per layer cost more than the
whole network's FLOPs. There the same region runs *masked-dense* (the oracle form of DESIGN §2.4):
rows in their own order, every value full width, a partition layer's output zeroed outside the
row's own block; a plain matmul then multiplies the other blocks by exact zeros. One
autograd.Function runs the whole chain forward and one backward computes every gradient (FA's B,
`match_norm`'s per-area ‖W_k‖/‖B_k‖, Kolen-Pollack's B.grad): the compact ops' numbers up to
float rounding (the same products, summed in another order), checked against them in
tests/test_fast_region.py. Where only the region (and its routing counter) reads a region_gate,
the gate joins that Function too: its routing in the forward, its local rule in the backward.

Taken only on the eager fast path (ops/fast.py `eager_forward`: nothing observes the difference;
the graph that compile, export, save and ONNX read is unchanged), when every tensor is a plain
tensor and the masked arithmetic is small (rows x sum of the layers' N x I <= MASKED_MACS, so that
multiplying zeros costs less than the overhead it saves). Anything else runs the compact ops one
by one, exactly as before. Supported chains: partition and dense layers (replicate and top-k
regions always take the compact ops), pointwise activations from POINTWISE (between partition
layers only those with f(0) = 0, which keep the zeros outside a row's block).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor

from . import fast, gate
from .compact import _fixed_block_norms, _stack
from .fa import fixed_value, kp_grad
from .. import layers as L

ENABLED = True            # False: always the compact ops (tests compare the two)
MASKED_MACS = 1 << 22     # rows x sum(N x I) at most: about 0.2 ms of float32 matmul on one core
TAKEN = {"masked": 0, "compact": 0}   # how often each form ran (tests and benchmarks read it)

aten = torch.ops.aten
sal = torch.ops.salcompile


@dataclass(frozen=True)
class Pointwise:
    forward: Callable          # (x, *extra) -> y
    backward: Callable         # (grad, x, y, *extra) -> grad of x
    keeps_zero: bool           # f(0) == 0: allowed on a block-sparse value


POINTWISE: Dict[object, Pointwise] = {
    aten.relu.default: Pointwise(torch.relu, lambda g, x, y: aten.threshold_backward(g, y, 0),
                                 True),
    aten.gelu.default: Pointwise(
        lambda x, approximate="none": aten.gelu(x, approximate=approximate),
        lambda g, x, y, approximate="none": aten.gelu_backward(g, x, approximate=approximate),
        True),
    aten.silu.default: Pointwise(aten.silu, lambda g, x, y: aten.silu_backward(g, x), True),
    aten.tanh.default: Pointwise(torch.tanh, lambda g, x, y: aten.tanh_backward(g, y), True),
    aten.leaky_relu.default: Pointwise(
        lambda x, slope=0.01: aten.leaky_relu(x, slope),
        lambda g, x, y, slope=0.01: aten.leaky_relu_backward(g, x, slope, False), True),
    aten.sigmoid.default: Pointwise(torch.sigmoid,
                                    lambda g, x, y: aten.sigmoid_backward(g, y), False),
}


@dataclass(frozen=True)
class Layer:
    mode: str                  # "partition" or "dense"
    input_block: bool
    match_norm: bool
    has_bias: bool


@dataclass(frozen=True)
class Step:
    layer: Optional[Layer] = None              # a compact_linear ...
    pointwise: Optional[Pointwise] = None      # ... or an activation
    extra: tuple = ()                          # the activation's non-tensor arguments


# ---------------------------------------------------------------- finding regions in a graph
_FULL, _BLOCK = "full", "block"


def _single_user(n: fx.Node) -> Optional[fx.Node]:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _match(sort: fx.Node):
    """A region_sort node's chain, or None when the region is not one this path runs.
    Returns (sort_rows node, area node, anchor node, K, [(node, Step)], exit node)."""
    area_node, areas = sort.args[0], sort.args[1]
    getitems = {}
    for u in sort.users:
        if u.op != "call_function" or u.target is not operator.getitem:
            return None
        getitems[u.args[1]] = u
    order, sorted_area, offs = (getitems.get(i) for i in range(3))
    if order is None or sorted_area is None:
        return None
    entry = [u for u in order.users if u.target is sal.sort_rows.default]
    if len(entry) != 1:
        return None
    node, layout = entry[0], _FULL
    chain: List[Tuple[fx.Node, Step]] = []
    anchor = None
    allowed = {order, sorted_area, offs} - {None}
    while True:
        nxt = _single_user(node)
        if nxt is None or nxt.op != "call_function":
            return None
        if nxt.target is sal.compact_linear.default:
            a = L.bind(nxt)
            if a["x"] is not node or a["area"] is not sorted_area or a["offs"] is not offs \
                    or a["areas"] != areas or a["mode"] not in ("partition", "dense") \
                    or bool(a["input_block"]) != (layout == _BLOCK):
                return None
            if anchor is None:
                anchor = a["anchor"]
            elif a["anchor"] is not anchor:
                return None
            chain.append((nxt, Step(layer=Layer(a["mode"], bool(a["input_block"]),
                                                bool(a["match_norm"]), a["bias"] is not None))))
            layout = _BLOCK if a["mode"] == "partition" else _FULL
        elif nxt.target in POINTWISE and nxt.args and nxt.args[0] is node and \
                not nxt.kwargs and all(not isinstance(v, fx.Node) for v in nxt.args[1:]):
            pw = POINTWISE[nxt.target]
            if layout == _BLOCK and not pw.keeps_zero:
                return None
            chain.append((nxt, Step(pointwise=pw, extra=tuple(nxt.args[1:]))))
        elif nxt.target is sal.unsort_rows.default and layout == _FULL and \
                nxt.args[1] is order:
            exit_node = nxt
            break
        elif nxt.target is sal.scatter_blocks.default and layout == _BLOCK and \
                nxt.args[1:] == (order, sorted_area, areas):
            exit_node = nxt
            break
        else:
            return None
        node = nxt
    if not any(s.layer for _, s in chain):
        return None
    inside = {entry[0], exit_node} | {n for n, _ in chain}
    for g in allowed:   # the sort's outputs are read inside the chain only
        if any(u not in inside for u in g.users):
            return None
    return entry[0], area_node, anchor, areas, chain, exit_node


def rewrite(graph: fx.Graph) -> Tuple[fx.Graph, Dict[str, Callable]]:
    """A copy of `graph` in which every region this path runs is one call (see `_region`), and
    the callables it names; the graph itself when there is none."""
    if not ENABLED or not any(n.target is sal.region_sort.default for n in graph.nodes):
        return graph, {}
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    out, old_output = new.graph_copy(graph, {}, return_output_node=True)
    new.output(out, type_expr=old_output.type)
    new._codegen = graph._codegen   # shared, not changed (it writes the pytree in/out lines)
    fns: Dict[str, Callable] = {}
    for sort in [n for n in new.nodes if n.target is sal.region_sort.default]:
        m = _match(sort)
        if m is None:
            continue
        entry, area, anchor, areas, chain, exit_node = m
        x = entry.args[0]
        params = []
        for n, s in chain:
            if s.layer is not None:
                a = L.bind(n)
                params += [a["weight"], a["bias"], a["feedback"]]
        name = f"_sal_region_{len(fns)}"
        region = _region(name, areas, [s for _, s in chain], _fallback(sort, chain, exit_node))
        inside = {sort, entry, exit_node} | {n for n, _ in chain}
        gate = _foldable_gate(area, anchor, inside)
        fns[name] = region if gate is None else _gated(region, *gate.args[3:5])
        with new.inserting_before(exit_node):
            if gate is None:
                call = new.call_function(fns[name], (x, area, anchor, *params))
            else:   # (y, area): the area for the gate's other readers (count_routes)
                both = new.call_function(fns[name], (*gate.args[:3], x, *params))
                call = new.call_function(operator.getitem, (both, 0))
                gated_area = new.call_function(operator.getitem, (both, 1))
        exit_node.replace_all_uses_with(call)
        for n in reversed([*[n for n, _ in chain], exit_node]):
            new.erase_node(n)
        new.erase_node(entry)
        for g in list(sort.users):
            new.erase_node(g)
        new.erase_node(sort)
        if gate is not None:   # count_routes moves after the call; then the gate goes
            for user in list(area.users):
                with new.inserting_after(gated_area):
                    new.call_function(user.target, (gated_area, *user.args[1:]), user.kwargs)
                new.erase_node(user)
            for g in list(gate.users):
                new.erase_node(g)
            new.erase_node(gate)
    if not fns:
        return graph, {}
    new.lint()
    return new, fns


def _foldable_gate(area: fx.Node, anchor: fx.Node, inside) -> Optional[fx.Node]:
    """The region_gate node whose area and anchor only this region reads (and count_routes):
    its forward and local-rule backward can join the region's one Function."""
    if area.op != "call_function" or area.target is not operator.getitem or area.args[1] != 0:
        return None
    gate = area.args[0]
    if not isinstance(gate, fx.Node) or gate.target is not sal.region_gate.default or \
            len(gate.args) != 5 or gate.kwargs:
        return None
    if not (isinstance(anchor, fx.Node) and anchor.target is operator.getitem and
            anchor.args == (gate, 1) and set(anchor.users) <= inside):
        return None
    if set(gate.users) != {area, anchor} or any(
            u not in inside and u.target is not sal.count_routes.default for u in area.users):
        return None
    return gate


def _fallback(sort: fx.Node, chain, exit_node) -> Callable:
    """The region's own ops, one by one through the fast path: (x, area, anchor, *params) -> y."""
    areas = sort.args[1]
    steps = []
    for n, s in chain:
        if s.layer is not None:
            a = L.bind(n)
            steps.append((fast.op(n.target), a["mode"], a["input_block"], a["match_norm"]))
        else:
            steps.append((n.target, s.extra))
    blocks = exit_node.target is sal.scatter_blocks.default
    sort_op, rows_op = fast.op(sal.region_sort.default), fast.op(sal.sort_rows.default)
    exit_op = fast.op(exit_node.target)

    def run(x, area, anchor, *params):
        order, sorted_area, offs = sort_op(area, areas)
        v = rows_op(x, order)
        p = iter(params)
        for st in steps:
            if len(st) == 4:
                op, mode, input_block, match_norm = st
                w, b, f = next(p), next(p), next(p)
                v = op(v, sorted_area, anchor, w, b, f, offs, areas, mode, input_block,
                       match_norm)
            else:
                v = st[0](v, *st[1])
        return exit_op(v, order, sorted_area, areas) if blocks else exit_op(v, order)
    return run


# ---------------------------------------------------------------- the masked-dense form
_MASKS: Dict[tuple, Tensor] = {}


def _block_of(width: int, areas: int, device) -> Tensor:
    """[width] int64: the area owning each column (cached; a constant)."""
    key = (width, areas, device)
    t = _MASKS.get(key)
    if t is None:
        t = torch.arange(width, device=device).div_(width // areas, rounding_mode="floor")
        if len(_MASKS) > 256:
            _MASKS.clear()
        _MASKS[key] = t
    return t


def _rows(t: Tensor) -> Tensor:
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _off_block(masks: dict, width: int, areas: int, area: Tensor) -> Tensor:
    """[rows, width] bool: True outside each row's own block (one per width and call)."""
    off = masks.get(width)
    if off is None:
        off = masks[width] = _block_of(width, areas, area.device).ne(area.unsqueeze(1))
    return off


def _scaled_feedback(f: Tensor, w: Tensor, areas: int, layer: Layer) -> Tensor:
    """B with each area's block times ‖W_k‖/‖B_k‖ (match_norm, per area as in the compact ops).
    Scaling B's blocks before one matmul is 2 ops where scaling the rows of dX after it is 4;
    the blocks of another area that this scales too only ever meet zeros (masked)."""
    n, i = f.shape
    if layer.mode == "dense":   # area k: columns block k
        shape, keep = (n, areas, i // areas), (1, areas, 1)
    else:                       # area k: rows block k
        shape, keep = (areas, n // areas, i), (areas, 1, 1)
    wk = _stack(w, areas, layer.mode, layer.input_block)
    # W's block norms reduced in place where W is small (a contiguous copy first costs more than
    # it saves there); B as blocks and its blocks' norms once per version of B
    w_norms = torch.linalg.vector_norm(wk if w.numel() <= _STRIDED_NORM_MAX else wk.contiguous(),
                                       dim=(1, 2))
    fb, b_norms = fixed_value(f, ("masked-scale", shape, layer.input_block), lambda: (
        f.view(shape), _fixed_block_norms(f, _stack(f, areas, layer.mode, layer.input_block))))
    return (fb * (w_norms / b_norms).to(f.dtype).view(keep)).view(n, i)


_STRIDED_NORM_MAX = 1 << 16   # elements of W up to which its block norms reduce in place


def _forward(x: Tensor, area: Tensor, steps, params, areas: int, saved: list,
             masks: dict) -> Tensor:
    """Masked-dense forward; `saved` gets what the backward needs, per step."""
    v = _rows(x)
    p = 0
    for st in steps:
        if st.layer is not None:
            w, b = params[p], params[p + 1]
            p += 3
            y = torch.addmm(b, v, w.t()) if b is not None else v.mm(w.t())
            off = None
            if st.layer.mode == "partition":
                off = _off_block(masks, w.shape[0], areas, area)
                y.masked_fill_(off, 0)
            saved.append((v, off))
            v = y
        else:
            y = st.pointwise.forward(v, *st.extra)
            saved.append((v, y))
            v = y
    return v


def _backward(g: Tensor, x_shape, area: Tensor, steps, params, areas: int, saved, needs,
              masks: dict):
    """Gradients of (x, *params) for the masked forward (None where not needed)."""
    grads: List[Optional[Tensor]] = [None] * len(params)
    p = len(params)
    need_x = needs[0]
    for i in range(len(steps) - 1, -1, -1):
        st = steps[i]
        if st.layer is None:
            v, y = saved[i]
            g = st.pointwise.backward(g, v, y, *st.extra)
            continue
        p -= 3
        w, b, f = params[p:p + 3]
        nw, nb, nf = needs[3 + p:6 + p]
        v, off = saved[i]
        if off is not None:
            g = g.masked_fill(off, 0)   # outside the row's block the output is a constant 0
        if nw or nf:
            gw = g.t().mm(v)
            grads[p] = gw if nw else None
            grads[p + 2] = kp_grad(nf, gw)
        if nb and b is not None:
            grads[p + 1] = g.sum(0)
        if i == 0 and not need_x:
            break
        lay = st.layer
        if f is None:
            fb = w   # backprop inside the area
        else:
            fb = _scaled_feedback(f, w, areas, lay) if lay.match_norm else f
        gx = g.mm(fb)
        if lay.input_block:
            gx.masked_fill_(_off_block(masks, w.shape[1], areas, area), 0)
        g = gx
    gx = g.reshape(x_shape) if need_x else None
    return gx, grads


class _MaskedRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, area, anchor, steps, areas, *params):
        saved: list = []
        masks: dict = {}
        y = _forward(x, area, steps, params, areas, saved, masks)
        # save_for_backward: the version checks of an in-place change, and no reference cycle
        # where the region's last value (a saved activation output) is this output
        ctx.save_for_backward(area, *params, *(t for pair in saved for t in pair))
        ctx.steps, ctx.areas, ctx.masks, ctx.n_params = steps, areas, masks, len(params)
        ctx.x_shape, ctx.anchor_like = x.shape, anchor
        return y

    @staticmethod
    def backward(ctx, g):
        needs = ctx.needs_input_grad
        needs = (needs[0], needs[1], needs[2]) + tuple(needs[5:])
        area, *rest = ctx.saved_tensors
        params, flat = rest[:ctx.n_params], rest[ctx.n_params:]
        saved = list(zip(flat[0::2], flat[1::2]))
        gx, grads = _backward(_rows(g), ctx.x_shape, area, ctx.steps, params, ctx.areas,
                              saved, needs, ctx.masks)
        ctx.masks = None
        # the anchor's zero gradient runs the region gate's local rule (ops/gate.py)
        return (gx, None, torch.zeros_like(ctx.anchor_like), None, None, *grads)


class _GatedMaskedRegion(torch.autograd.Function):
    """The gate and the masked region in one Function: the gate's routing logits (ops/gate.py
    _logits) give the area, and the backward adds the gate's local-rule gradient of P (no
    anchor: nothing of the network's loss reaches P either way)."""

    @staticmethod
    def forward(ctx, features, proj, prototypes, x, steps, areas, temperature, balance,
                *params):
        logits = gate._logits(features, proj, prototypes)
        area = logits[2].argmax(-1)
        saved: list = []
        masks: dict = {}
        y = _forward(x, area, steps, params, areas, saved, masks)
        ctx.mark_non_differentiable(area)
        ctx.save_for_backward(features, proj, prototypes, area, *logits, *params,
                              *(t for pair in saved for t in pair))
        ctx.steps, ctx.areas, ctx.masks, ctx.n_params = steps, areas, masks, len(params)
        ctx.x_shape, ctx.rule = x.shape, (temperature, balance)
        return y, area

    @staticmethod
    def backward(ctx, g, _):
        needs = ctx.needs_input_grad
        features, proj, prototypes, area, z, n, s, *rest = ctx.saved_tensors
        params, flat = rest[:ctx.n_params], rest[ctx.n_params:]
        gx, grads = _backward(_rows(g), ctx.x_shape, area, ctx.steps, params, ctx.areas,
                              list(zip(flat[0::2], flat[1::2])),
                              (needs[3], False, False) + tuple(needs[8:]), ctx.masks)
        ctx.masks = None
        gp = gate.local_rule_grad(features, proj, prototypes, area, *ctx.rule, (z, n, s)) \
            if needs[1] else None
        return (None, gp, None, gx, None, None, None, None, *grads)


def _gated(region: Callable, temperature: float, balance: float) -> Callable:
    """(features, proj, prototypes, x, *params) -> (y, area): the gate folded into `region`
    where the masked path runs; the gate's own fast op and then `region` otherwise."""
    gate_op = fast.op(sal.region_gate.default)

    def gated(features, proj, prototypes, x, *params):
        rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
        if not (rows and features.dim() == 2 and features.shape[0] == rows and
                features.dtype == proj.dtype == prototypes.dtype and
                fast._plain((features, proj, prototypes, x, *params)) and
                _macs(rows, params) <= MASKED_MACS):
            area, anchor = gate_op(features, proj, prototypes, temperature, balance)
            return region(x, area, anchor, *params), area
        TAKEN["masked"] += 1
        if torch.is_grad_enabled() and torch._C._any_requires_grad(proj, x, *params):
            y, area = _GatedMaskedRegion.apply(features, proj, prototypes, x, region.steps,
                                               region.areas, temperature, balance, *params)
        else:
            area = gate.route(features, proj, prototypes)
            y = _forward(x, area, region.steps, params, region.areas, [], {})
        return _shaped_like(y, x), area

    gated.__name__ = gated.__qualname__ = region.__name__
    return gated


def _shaped_like(y: Tensor, x: Tensor) -> Tensor:
    """The region's flat [rows, o] output in x's leading shape."""
    return y if x.dim() == 2 else y.reshape(x.shape[:-1] + (y.shape[-1],))


def _macs(rows: int, params) -> int:
    return rows * sum(w.shape[0] * w.shape[1] for w in params[0::3])


def _region(name: str, areas: int, steps, fallback: Callable) -> Callable:
    """(x, area, anchor, *params) -> y: the masked path where it applies, `fallback` (the
    compact ops) otherwise."""
    steps = tuple(steps)

    def region(x, area, anchor, *params):
        rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
        if not (rows and area.numel() == rows and fast._plain((x, area, anchor, *params))
                and _macs(rows, params) <= MASKED_MACS):
            TAKEN["compact"] += 1
            return fallback(x, area, anchor, *params)
        TAKEN["masked"] += 1
        flat = area if area.dim() == 1 else area.reshape(-1)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(x, *params):
            y = _MaskedRegion.apply(x, flat, anchor, steps, areas, *params)
        else:
            y = _forward(x, flat, steps, params, areas, [], {})
        return _shaped_like(y, x)

    region.__name__ = region.__qualname__ = name
    region.steps, region.areas = steps, areas
    return region
