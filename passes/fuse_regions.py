"""Run each region's area layers in area-sorted compact form (DESIGN §2.5, "fuse sparse ops").

Before: every fast `area_linear` of a region sorts the rows by area on its own, gathers, runs its
per-area matmuls and scatters back to a full-width, zero-filled output in the original row order.
After: the rows are sorted once per gate (`region_sort`, on device, no host sync) and every value
between the region's layers stays compact (salcompile/ops/compact.py):

  * a partition layer's output, and whatever f(0)=0 elementwise ops (relu, gelu, dropout, detach,
    check_finite, scaling...) and same-layout, same-shape adds and products (a gated MLP's
    act(gate(x)) * up(x)) make of it, is held as [rows, width/K] in sorted row order (BLOCK);
    replicate layers and exits (dense output reading the input block) produce whole sorted rows
    (FULL). A product with an operand that is not compact (a dense tensor, a broadcast scale) is
    not: its compact operand is put back first (below) and the product runs as written;
  * each layer becomes one `compact_linear` (a grouped matmul over the sorted rows) reading the
    compact value directly; a layer whose input comes from outside the region gathers it first
    (`sort_rows`, or `gather_blocks` for an area-sparse input it reads by blocks);
  * a compact value that anything else reads (a norm, attention, the model output, DFA's
    dfa_output, a layer of another gate) is put back in original order, full width, once
    (`unsort_rows` / `scatter_blocks`), right after it is computed. A shape-free metadata check
    (torch.export's `_assert_tensor_metadata`: dtype, device, layout) reads the compact value.

Top-k routing (region_gate_topk, areas [..., k]): a layer is make_area_ops' k parts (one area op
per choice j, reading select(areas, -1, j)) and the adds that sum them. The sort is of the R*k
(row, choice) entries; each row of a compact value is one entry, [..., k, width/K] (BLOCK: the
entry's own area block; the k blocks of a row are distinct and the row's full value is their
scatter, so elementwise f(0)=0 ops, adds and products stay compact as above). A layer is one
compact_linear over the entries; its input comes in by `expand_rows` (each entry gets its row)
or `expand_blocks` (its area's block of the row). A full-width output (replicate, an exit) holds
k partial terms per row (PARTIAL): it is summed back (`sum_rows`, plus an exit's bias, which only
part 0 carries) before anything else reads it; BLOCK values go back by `sum_blocks`.

The shared dense path (split_shared_path: area ops on slices of W beside dense linears): the
area ops are fused as above; the dense pieces (fa_linear, a layer's `parts`) run on the sorted
rows too (FULL in, FULL out: a linear acts row by row), and cat([shared, routed], -1) of a FULL
and a BLOCK value is held as sorted rows [shared | own block] (MIXED), its slices [:n_s] and
[n_s:] FULL and BLOCK again: sorted once at the region's entry, restored once at its exit. Without
shapes (symbolic_trace) the dense pieces keep reading the restored values.

Only fast linear area ops whose gate routes exactly their rows (area shape == the input's leading
dims) are fused; convolutions, reference ops and anything else are left as they are. The pass
runs last (after the feedback passes and guard_finite), so the feedback buffers, match flags and
DFA taps are already in place and only need carrying over. `unfuse_regions` turns a fused graph
back into the area_linear form (the same values in the original order), for the exporters that
translate area_linear ops (a top-k layer back to its k parts, summed).
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.fx as fx

from salcompile.layers import bind, get_arg

from .analyse_sparsity import _is_add, is_product, tensor_operand, zero_preserving
from .context import PassContext
from .find_regions import operand_shape

ops = torch.ops.salcompile
BLOCK, FULL = "block", "full"
# top-k only: a layer's full-width output as k partial terms, one per entry, summed when it
# leaves the compact form (nothing elementwise applies to it); a layer's input as its row's
# copy in each of the row's k entries (only ever gathered from the original value)
PARTIAL, EXPANDED = "partial", "expanded"
# shared path (one area per row): a layer output [shared | routed] as sorted rows, the shared
# columns whole and then the row's own block of the routed ones, [..., n_s + routed/K]:
# MIXED + str(n_s)
MIXED = "mixed:"


def _stays(layout) -> bool:
    """Elementwise f(0)=0 ops, same-shape adds and products of values in this layout stay
    compact."""
    return layout in (BLOCK, FULL) or (isinstance(layout, str) and layout.startswith(MIXED))


def _val(n) -> Optional[torch.Tensor]:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _shape(n) -> Optional[list]:
    """The shape of a tensor node, from its meta["val"] (which the pipeline keeps true for the
    nodes passes insert: passes/_meta.py); None without one (a symbolic_trace capture)."""
    v = _val(n)
    return None if v is None else list(v.shape)


def _choices(area) -> int:
    """k of a top-k gate's areas [..., k] (getitem 0 of region_gate_topk); 1 for any other."""
    if isinstance(area, fx.Node) and area.op == "call_function" and \
            area.target is operator.getitem and area.args[1] == 0:
        gate = area.args[0]
        if isinstance(gate, fx.Node) and gate.target is ops.region_gate_topk.default:
            k = get_arg(gate, "k")
            return k if isinstance(k, int) else 0   # 0: not known, never fused
    return 1


def _route(area):
    """(the gate's areas, choice j) of a top-k part's area argument select(areas, -1, j);
    (area, None) for any other."""
    if isinstance(area, fx.Node) and area.op == "call_function" and \
            area.target is torch.ops.aten.select.int and len(area.args) == 3 and \
            area.args[1] == -1 and isinstance(area.args[2], int) and _choices(area.args[0]) > 1:
        return area.args[0], area.args[2]
    return area, None


def _candidate(n: fx.Node) -> bool:
    """A fast linear area op (the only kind fused)."""
    return n.target is ops.area_linear.default and \
        get_arg(n, "mode") in ("partition", "replicate", "dense")


def _gate_input(area: fx.Node) -> Optional[fx.Node]:
    """h when the gate routes h's rows one by one (φ = identity: region_gate(detach(h))): its
    areas then have exactly h's leading dims."""
    if area.op != "call_function" or area.target is not operator.getitem or area.args[1] != 0:
        return None
    gate = area.args[0]
    if not isinstance(gate, fx.Node) or \
            gate.target not in (ops.region_gate.default, ops.region_gate_topk.default):
        return None
    feats = get_arg(gate, "features")
    if isinstance(feats, fx.Node) and feats.target is torch.ops.aten.detach.default:
        return feats.args[0]
    return None


class _Layer(NamedTuple):
    """One layer of a region as the fused form sees it."""
    out: fx.Node       # the node holding its output: the area op; under top-k, the sum of its parts
    args: dict         # area_linear's arguments by name (part 0's under top-k; a top-k exit's
    #                    bias: None)
    nodes: List[fx.Node]   # the nodes it replaces, `out` last
    choices: int       # k of top-k routing (1: one area per row)
    bias_after: Optional[fx.Node] = None   # a top-k exit's bias: added once to the summed parts


def _rows_proven(layer: _Layer, area: fx.Node, aligned) -> bool:
    """The gate's areas line up with the rows of the layer's input: its input is derived row by
    row from rows that do (`aligned`: compact values, the gate's own input, what row-wise ops
    make of them), or the shapes say so. (A top-k gate's areas have one more dim, the k
    choices.)"""
    x = layer.args["x"]
    if x in aligned:
        return True
    xv, a = _val(x), _shape(area)
    if a is not None and layer.choices > 1:
        a = a[:-1]
    if xv is not None and a is not None:
        return xv.dim() >= 2 and xv.is_floating_point() and \
            [str(d) for d in a] == [str(d) for d in xv.shape[:-1]]
    return False


def _row_wise(gm: fx.GraphModule, n: fx.Node, aligned) -> bool:
    """n keeps the leading (row) dims of values that line up with the gate's rows: an
    elementwise op, a slice or cat of the features (the shared path's), a dense linear (the
    shared path's dense pieces). Graphs without shapes (symbolic_trace) prove rows this way."""
    t = n.target if n.op == "call_function" else None
    if t is torch.ops.aten.slice.Tensor:
        return n.args[0] in aligned and len(n.args) > 1 and n.args[1] == -1
    if t is torch.ops.aten.cat.default:
        return isinstance(n.args[0], (list, tuple)) and len(n.args) > 1 and n.args[1] == -1 \
            and all(a in aligned for a in n.args[0])
    if t in (ops.fa_linear.default, torch.ops.aten.linear.default):
        return n.args[0] in aligned
    if _is_add(n) or is_product(n):   # [rows, F] and [rows, F']: broadcasting keeps the rows
        return all(isinstance(a, fx.Node) and a in aligned for a in n.args[:2])
    return _passthrough(gm, n) and tensor_operand(n) in aligned


_END = 2 ** 63 - 1   # slice to the end, whatever the width (the compact one, or after unfusing)


def _last_dim(n: fx.Node, dim) -> bool:
    v = _val(n)
    return dim == -1 or (v is not None and dim == v.dim() - 1)


def _mixed_cat(n: fx.Node, layout) -> Optional[str]:
    """cat([shared, routed], -1) of a FULL value (n_s columns) and a BLOCK one: MIXED(n_s)."""
    if n.op != "call_function" or n.target is not torch.ops.aten.cat.default or n.kwargs or \
            len(n.args) != 2 or not isinstance(n.args[0], (list, tuple)) or len(n.args[0]) != 2:
        return None
    a, b = n.args[0]
    va = _val(a)
    if layout.get(a) != FULL or layout.get(b) != BLOCK or va is None or \
            not isinstance(va.shape[-1], int) or not _last_dim(n, n.args[1]):
        return None
    return MIXED + str(va.shape[-1])


def _mixed_slice(n: fx.Node, layout) -> Optional[str]:
    """A MIXED(n_s) value's shared columns [0, n_s) (FULL) or routed ones [n_s, end) (BLOCK)."""
    if n.op != "call_function" or n.target is not torch.ops.aten.slice.Tensor or n.kwargs or \
            not 3 <= len(n.args) <= 5 or (len(n.args) == 5 and n.args[4] != 1):
        return None
    v = n.args[0]
    lay = layout.get(v)
    if not (isinstance(lay, str) and lay.startswith(MIXED)) or not _last_dim(v, n.args[1]):
        return None
    n_s, (start, end) = int(lay[len(MIXED):]), (list(n.args[2:4]) + [None])[:2]
    width = _val(v).shape[-1] if _val(v) is not None else None
    if start in (0, None) and end == n_s:
        return FULL
    if start == n_s and isinstance(end, int) and (end >= _END or end == width):
        return BLOCK
    return None


def _need(layer: _Layer) -> str:
    """The layout a fused layer reads its input in."""
    if layer.args["input_block"]:
        return BLOCK
    return FULL if layer.choices == 1 else EXPANDED


def _out_layout(layer: _Layer) -> str:
    if layer.args["mode"] == "partition":
        return BLOCK
    return FULL if layer.choices == 1 else PARTIAL


def _same_layer(a: fx.Node, b: fx.Node) -> bool:
    """Two top-k parts of one layer: the same input, weight, feedback and flags (a part after
    the first of an exit has no bias)."""
    p, q = bind(a), bind(b)
    same = all(p[k] is q[k] for k in ("x", "anchor", "weight", "feedback")) and \
        all(p[k] == q[k] for k in ("areas", "mode", "input_block", "match_norm"))
    return same and (q["bias"] is p["bias"] or (p["mode"] == "dense" and q["bias"] is None))


def _top_k_layers(area: fx.Node, candidates: List[fx.Node], k: int) -> List[_Layer]:
    """The layers of a top-k region: make_area_ops' k parts area_linear(x, select(area, -1, j))
    and the chain of adds that sums them (parts[0] + parts[1] + ...), each read only there.
    A layer of any other shape is left unfused."""
    cset = set(candidates)
    layers = []
    for p0 in candidates:
        if _route(get_arg(p0, "area"))[1] != 0:
            continue
        parts, adds, s = [p0], [], p0
        for j in range(1, k):
            u = next(iter(s.users)) if len(s.users) == 1 else None
            if u is None or u.target is not torch.ops.aten.add.Tensor or len(u.args) != 2 \
                    or u.kwargs or s not in u.args:
                break
            other = u.args[1] if u.args[0] is s else u.args[0]
            if other is s or other not in cset or _route(get_arg(other, "area")) != (area, j) or \
                    len(other.users) != 1 or not _same_layer(p0, other):
                break
            parts.append(other)
            adds.append(u)
            s = u
        else:
            if len(parts) != k:
                continue
            args = bind(p0)
            bias = args["bias"] if args["mode"] == "dense" else None
            if bias is not None:
                args["bias"] = None
            layers.append(_Layer(s, args, parts + adds, k, bias))
    return layers


# Zero-preserving ops that act on whole feature maps/channels, not element by element.
_CHANNELWISE = ("dropout1d", "dropout2d", "dropout3d", "feature_dropout", "feature_alpha_dropout")


def _op_name(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__.lower()
    t = n.target
    return str(getattr(t, "__name__", t)).lower()


def _is_training_flag(a: fx.Node) -> bool:
    """The module's `self.training`, read by dropout (see passes/follow_training_mode.py)."""
    return a.op == "get_attr" and a.target == "training"


def _passthrough(gm: fx.GraphModule, n: fx.Node) -> bool:
    """An op of one tensor applied elementwise with f(0)=0: valid on a compact value (the tensor
    is tensor_operand(n): the first node argument)."""
    if n.op not in ("call_function", "call_method", "call_module") or not n.args:
        return False
    x = tensor_operand(n)
    if x is None or any(isinstance(a, fx.Node) and a is not x and not _is_training_flag(a)
                        for a in list(n.args) + list(n.kwargs.values())):
        return False
    if n.target is ops.check_finite.default:
        return True
    if not zero_preserving(gm, n) or any(c in _op_name(gm, n) for c in _CHANNELWISE):
        return False
    x, v = _val(x), _val(n)
    if x is not None or v is not None:   # shapes known: a same-shape map (not a tuple output)
        return x is not None and v is not None and tuple(v.shape) == tuple(x.shape)
    return True   # no shapes at all (symbolic_trace): an elementwise op by its identity


def _same_shape_binary(gm: fx.GraphModule, n: fx.Node, layout, layers) -> bool:
    """a + b or a * b of two compact values of one layout and one shape (no broadcasting): the
    op on the compact values is the op on the full ones, restricted to the stored blocks (both
    are zero elsewhere, and so are 0 + 0 and 0 * 0)."""
    if not (_is_add(n) or is_product(n)):
        return False
    a, b = n.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in layout and b in layout
            and layout[a] == layout[b] and _stays(layout[a])):
        return False
    vals = [_val(a), _val(b), _val(n)]
    if all(v is None for v in vals):   # symbolic_trace: compare the widths of the source layers
        wa, wb = _width(gm, a, layout, layers), _width(gm, b, layout, layers)
        return wa is not None and wa == wb
    return all(v is not None for v in vals) and \
        tuple(vals[0].shape) == tuple(vals[1].shape) == tuple(vals[2].shape)


def _width(gm: fx.GraphModule, n: fx.Node, layout, layers) -> Optional[int]:
    """Full output width of the fused layer a compact value comes from (through elementwise ops,
    adds and products, which keep it): from its weight operand (t(W), W[:n]... as used)."""
    while n in layout and n not in layers and n.target is not ops.fa_linear.default:
        n = tensor_operand(n)
    if n not in layout:
        return None
    if n.target is ops.fa_linear.default:   # a shared path's dense piece
        shape = operand_shape(gm, get_arg(n, "weight"))
        return None if shape is None else shape[0]
    args = layers[n].args
    shape = operand_shape(gm, args["weight"])
    if shape is None:
        return None
    return shape[1] if args["mode"] == "replicate" else shape[0]


def fuse_regions(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    plan, config = ctx.plan, ctx.config
    if config.areas < 2:   # one area: nothing to sort, and K=1 must stay bit-equal to dense
        return gm
    g = gm.graph
    groups: Dict[fx.Node, List[fx.Node]] = {}
    for n in g.nodes:
        if _candidate(n):   # by the gate's areas (a top-k part's select(areas, -1, j): areas)
            groups.setdefault(_route(get_arg(n, "area"))[0], []).append(n)
    # a shared path's dense pieces (fa_linear on slices of W): run on the sorted rows too
    names = {p for entry in plan.layers if entry.shared or entry.shared_in for p in entry.parts}
    dense = {n for n in g.nodes if n.name in names and n.target is ops.fa_linear.default}
    renamed = {}
    for area, candidates in groups.items():
        k = _choices(area)
        layers = [_Layer(n, bind(n), [n], 1) for n in candidates] if k == 1 else \
            _top_k_layers(area, candidates, k) if k > 1 else []
        if layers:
            renamed.update(_fuse(gm, area, layers, config.areas, k, dense if k == 1 else set()))
    if not renamed:
        return gm
    for entry in plan.layers:
        entry.node = renamed.get(entry.node, entry.node)
        entry.parts = list(dict.fromkeys(renamed.get(p, p) for p in entry.parts))
    g.lint()
    gm.recompile()
    return gm


def _fuse(gm: fx.GraphModule, area: fx.Node, layers: List[_Layer], k: int,
          choices: int, dense=frozenset()) -> Dict[str, str]:
    g = gm.graph
    pos = {n: i for i, n in enumerate(g.nodes)}
    by_out = {layer.out: layer for layer in layers}
    # 1. Which layers are fused (their rows are the gate's rows), which values become compact
    #    and in which layout (graph order is topological).
    layout: Dict[fx.Node, str] = {}
    fused: List[_Layer] = []
    aligned = {_gate_input(area)} - {None}   # values with the gate's rows, compact or not
    start = pos[area]   # from the gate on: a shared path's dense piece may come first
    for n in list(g.nodes)[start:]:
        if n in by_out:
            if _rows_proven(by_out[n], area, aligned):
                layout[n] = _out_layout(by_out[n])
                fused.append(by_out[n])
        elif n in dense and n.args[0] in aligned and layout.get(n.args[0], FULL) == FULL and \
                _val(n) is not None and \
                not any(a in layout for a in n.all_input_nodes if a is not n.args[0]):
            layout[n] = FULL   # a dense piece on the sorted rows gives the sorted rows
        elif _same_shape_binary(gm, n, layout, by_out):
            layout[n] = layout[n.args[0]]
        elif _passthrough(gm, n) and _stays(layout.get(tensor_operand(n))):
            layout[n] = layout[tensor_operand(n)]
        elif _mixed_cat(n, layout) is not None:
            layout[n] = _mixed_cat(n, layout)
        elif _mixed_slice(n, layout) is not None:
            layout[n] = _mixed_slice(n, layout)
        elif _row_wise(gm, n, aligned):
            aligned.add(n)
        if n in layout:
            aligned.add(n)
    if not fused:
        return {}
    fused_out = {layer.out for layer in fused}

    # 2. The sort, once, before the region's first layer. Top-k: of the (row, choice) entries.
    first = [layer.nodes[0] for layer in fused] + [n for n in layout if n in dense]
    with g.inserting_before(min(first, key=pos.get)):
        rs = g.call_function(ops.region_sort.default, (area, k))
        order = g.call_function(operator.getitem, (rs, 0))
        sarea = g.call_function(operator.getitem, (rs, 1))
        offs = g.call_function(operator.getitem, (rs, 2))

    compact: Dict[fx.Node, fx.Node] = {}
    restored: Dict[fx.Node, fx.Node] = {}

    def restore(v, c):
        if choices == 1 and layout[v].startswith(MIXED):   # [shared | own block]
            n_s = int(layout[v][len(MIXED):])
            shared = g.call_function(torch.ops.aten.slice.Tensor, (c, -1, 0, n_s))
            routed = g.call_function(torch.ops.aten.slice.Tensor, (c, -1, n_s, _END))
            return g.call_function(torch.ops.aten.cat.default, ([
                g.call_function(ops.unsort_rows.default, (shared, order)),
                g.call_function(ops.scatter_blocks.default, (routed, order, sarea, k))], -1))
        if choices == 1:
            return g.call_function(ops.scatter_blocks.default, (c, order, sarea, k)) \
                if layout[v] == BLOCK else g.call_function(ops.unsort_rows.default, (c, order))
        if layout[v] == BLOCK:
            return g.call_function(ops.sum_blocks.default, (c, order, sarea, k, choices))
        r = g.call_function(ops.sum_rows.default, (c, order, choices))   # PARTIAL: a layer's
        bias = by_out[v].bias_after
        return r if bias is None else g.call_function(torch.ops.aten.add.Tensor, (r, bias))

    def original(v):
        """The value of v in original order, full width (v itself unless it is compact)."""
        if not isinstance(v, fx.Node) or v not in layout:
            return v
        if v not in restored:
            c = compact[v]
            with g.inserting_before(c.next):
                restored[v] = restore(v, c)
            restored[v].meta = {key: val for key, val in v.meta.items()
                                if key in ("val", "nn_module_stack", "stack_trace")}
        return restored[v]

    def gather(xo, need):
        if choices == 1:
            return g.call_function(ops.gather_blocks.default, (xo, order, sarea, k)) \
                if need == BLOCK else g.call_function(ops.sort_rows.default, (xo, order))
        return g.call_function(ops.expand_blocks.default, (xo, order, sarea, k, choices)) \
            if need == BLOCK else g.call_function(ops.expand_rows.default, (xo, order, choices))

    renamed = {}
    gathered: Dict[tuple, fx.Node] = {}   # (input, layout): its sorted copy, shared by its readers
    # 3. Compact copies of the region's nodes.
    for n in list(layout):
        with g.inserting_before(n):
            if n in fused_out:
                layer = by_out[n]
                x, need = layer.args["x"], _need(layer)
                if x in layout and layout[x] == need:
                    xc = compact[x]
                elif (x, need) in gathered:   # gate_proj and up_proj read the same x
                    xc = gathered[(x, need)]
                else:
                    xc = gathered[(x, need)] = gather(original(x), need)
                a = layer.args
                new = g.call_function(ops.compact_linear.default, (
                    xc, sarea, a["anchor"], a["weight"], a["bias"], a["feedback"], offs,
                    a["areas"], a["mode"], a["input_block"], a["match_norm"]))
                for m in layer.nodes:
                    renamed[m.name] = new.name
            elif n in dense:   # the same op on the sorted rows
                x = get_arg(n, "x")
                if x in layout:
                    xc = compact[x]
                elif (x, FULL) in gathered:
                    xc = gathered[(x, FULL)]
                else:
                    xc = gathered[(x, FULL)] = gather(original(x), FULL)
                new = g.node_copy(n, lambda a: xc if a is x else a)
                renamed[n.name] = new.name
            else:   # a slice of a mixed value reads the same columns of the compact one
                new = g.node_copy(n, lambda a: compact.get(a, a))
                renamed[n.name] = new.name   # a shared path's layer output (its cat)
        new.meta = {key: val for key, val in n.meta.items()
                    if key in ("nn_module_stack", "stack_trace")}
        compact[n] = new

    # 4. Readers outside the compact world get the original-order value.
    replaced = {m for layer in fused for m in layer.nodes}   # a top-k layer's parts and adds
    for n in layout:
        for user in list(n.users):
            if user in layout or user in replaced:   # compacted: its copy reads compact[n]
                continue                             # (or original(n), step 3)
            if _metadata_check(user):
                user.args = (compact[n],) + tuple(user.args[1:])
                continue
            restored_n = original(n)
            user.args = fx.node.map_arg(user.args, lambda a: restored_n if a is n else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: restored_n if a is n else a)
    # 5. The replaced nodes (a top-k layer's parts and their adds too, and then their selects).
    dead = set(layout) | replaced
    selects = {get_arg(m, "area") for layer in fused if layer.choices > 1 for m in layer.nodes
               if _candidate(m)}
    for n in sorted(dead, key=pos.get, reverse=True):
        g.erase_node(n)
    for s in selects:
        if not s.users:
            g.erase_node(s)
    return renamed


def _metadata_check(n: fx.Node) -> bool:
    """torch.export's aten._assert_tensor_metadata(x, dtype=, device=, layout=) without a size or
    stride: true of the compact value as of the full one."""
    return n.target is torch.ops.aten._assert_tensor_metadata.default and len(n.args) == 1 and \
        set(n.kwargs) <= {"dtype", "device", "layout"}


# ---------------------------------------------------------------- the inverse, for exporters
def unfuse_regions(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph` with every fused region turned back into area_linear ops (the same values,
    in original row order, full width). Graphs without fused regions come back as plain copies."""
    with warnings.catch_warnings():  # torch's own pytree deprecation noise on deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        g = copy.deepcopy(graph)
    sorts = {}
    for n in list(g.nodes):
        t = n.target
        if t is ops.region_sort.default:
            sorts[n] = n.args[0]
        elif t in (ops.sort_rows.default, ops.unsort_rows.default, ops.gather_blocks.default,
                   ops.scatter_blocks.default, ops.expand_rows.default, ops.sum_rows.default,
                   ops.expand_blocks.default, ops.sum_blocks.default):
            # gather_blocks reads a value only its block-reading layers use: it stays as it was.
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
        elif t is ops.compact_linear.default:
            x, sarea, anchor, w, b, fb, offs, areas, mode, input_block, match = n.args
            area = sorts[sarea.args[0]]
            choices = _choices(area)
            with g.inserting_before(n):
                if choices == 1:
                    new = g.call_function(ops.area_linear.default, (
                        x, area, anchor, w, b, fb, areas, mode, input_block, match))
                else:   # top-k: make_area_ops' form, one area op per choice, summed
                    for j in range(choices):
                        a = g.call_function(torch.ops.aten.select.int, (area, -1, j))
                        part = g.call_function(ops.area_linear.default, (
                            x, a, anchor, w, b, fb, areas, mode, input_block, match))
                        part.meta = dict(n.meta)
                        new = part if not j else \
                            g.call_function(torch.ops.aten.add.Tensor, (new, part))
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            g.erase_node(n)
    for rs in sorts:
        for user in list(rs.users):
            if not user.users:
                g.erase_node(user)
        if not rs.users:
            g.erase_node(rs)
    g.lint()
    return g
