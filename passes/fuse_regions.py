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

Only fast linear area ops whose gate routes exactly their rows (area shape == the input's leading
dims) are fused; convolutions, reference ops and anything else are left as they are. The pass
runs last (after the feedback passes and guard_finite), so the feedback buffers, match flags and
DFA taps are already in place and only need carrying over. `unfuse_regions` turns a fused graph
back into the area_linear form (the same values in the original order), for the exporters that
translate area_linear ops.
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import Dict, List, Optional

import torch
import torch.fx as fx

from salcompile.config import SALConfig

from .analyse_sparsity import _is_add, is_product, tensor_operand, zero_preserving
from .find_regions import operand_shape
from .context import PassContext

ops = torch.ops.salcompile
BLOCK, FULL = "block", "full"


def _val(n) -> Optional[torch.Tensor]:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _shape(n) -> Optional[list]:
    """The shape of a tensor node, from its meta or (for nodes passes inserted without meta)
    from the few ops between an activation and a gate's areas: detach, adaptive average pooling,
    flatten(x, 1), getitem 0 of region_gate (areas: the features' leading dims)."""
    v = _val(n)
    if v is not None:
        return list(v.shape)
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None
    t = n.target
    if t is torch.ops.aten.detach.default:
        return _shape(n.args[0])
    if t in (torch.ops.aten.adaptive_avg_pool1d.default, torch.ops.aten.adaptive_avg_pool2d.default,
             torch.ops.aten.adaptive_avg_pool3d.default):   # φ of a gate before a convolution
        s = _shape(n.args[0])
        return None if s is None else s[:2] + list(n.args[1])
    if t is torch.ops.aten.flatten.using_ints and tuple(n.args[1:]) == (1,):
        s = _shape(n.args[0])
        return None if s is None or len(s) < 2 else [s[0], None]
    if t is operator.getitem and n.args[1] == 0 and isinstance(n.args[0], fx.Node) \
            and n.args[0].target is ops.region_gate.default:
        s = _shape(n.args[0].args[0])
        return None if s is None else s[:-1]
    return None


def _candidate(n: fx.Node) -> bool:
    """A fast linear area op (the only kind fused)."""
    return n.target is ops.area_linear.default and not n.kwargs and len(n.args) == 10 \
        and n.args[7] in ("partition", "replicate", "dense")


def _gate_input(area: fx.Node) -> Optional[fx.Node]:
    """h when the gate routes h's rows one by one (φ = identity: region_gate(detach(h))): its
    areas then have exactly h's leading dims."""
    if area.op != "call_function" or area.target is not operator.getitem or area.args[1] != 0:
        return None
    gate = area.args[0]
    if not isinstance(gate, fx.Node) or gate.target is not ops.region_gate.default:
        return None
    feats = gate.args[0]
    if isinstance(feats, fx.Node) and feats.target is torch.ops.aten.detach.default:
        return feats.args[0]
    return None


def _rows_proven(n: fx.Node, area: fx.Node, layout) -> bool:
    """The gate's areas line up with the rows of n's input: its input is compact already (derived
    from rows that do), or the shapes say so, or it is the very activation the gate routes."""
    x = n.args[0]
    if x in layout:
        return True
    xv, a = _val(x), _shape(area)
    if xv is not None and a is not None:
        return xv.dim() >= 2 and xv.is_floating_point() and \
            [str(d) for d in a] == [str(d) for d in xv.shape[:-1]]
    return xv is None and x is _gate_input(area)


def _need(n: fx.Node) -> str:
    """The layout a fused layer reads its input in."""
    return BLOCK if n.args[8] else FULL


def _out_layout(n: fx.Node) -> str:
    return BLOCK if n.args[7] == "partition" else FULL


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


def _same_shape_binary(gm: fx.GraphModule, n: fx.Node, layout) -> bool:
    """a + b or a * b of two compact values of one layout and one shape (no broadcasting): the
    op on the compact values is the op on the full ones, restricted to the stored blocks (both
    are zero elsewhere, and so are 0 + 0 and 0 * 0)."""
    if not (_is_add(n) or is_product(n)):
        return False
    a, b = n.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in layout and b in layout
            and layout[a] == layout[b]):
        return False
    vals = [_val(a), _val(b), _val(n)]
    if all(v is None for v in vals):   # symbolic_trace: compare the widths of the source layers
        wa, wb = _width(gm, a, layout), _width(gm, b, layout)
        return wa is not None and wa == wb
    return all(v is not None for v in vals) and \
        tuple(vals[0].shape) == tuple(vals[1].shape) == tuple(vals[2].shape)


def _width(gm: fx.GraphModule, n: fx.Node, layout) -> Optional[int]:
    """Full output width of the fused layer a compact value comes from (through elementwise ops,
    adds and products, which keep it): from its weight operand (t(W), W[:n]... as used)."""
    while n in layout and not _candidate(n):
        n = tensor_operand(n)
    if n not in layout:
        return None
    shape = operand_shape(gm, n.args[3])
    if shape is None:
        return None
    return shape[1] if n.args[7] == "replicate" else shape[0]


def fuse_regions(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    plan, config = ctx.plan, ctx.config
    if config.areas < 2:   # one area: nothing to sort, and K=1 must stay bit-equal to dense
        return gm
    g = gm.graph
    groups: Dict[fx.Node, List[fx.Node]] = {}
    for n in g.nodes:
        if _candidate(n):
            groups.setdefault(n.args[1], []).append(n)
    renamed = {}
    for area, layers in groups.items():
        renamed.update(_fuse(gm, area, layers, config.areas))
    if not renamed:
        return gm
    for entry in plan.layers:
        entry.node = renamed.get(entry.node, entry.node)
    g.lint()
    gm.recompile()
    return gm


def _fuse(gm: fx.GraphModule, area: fx.Node, candidates: List[fx.Node],
          k: int) -> Dict[str, str]:
    g = gm.graph
    # 1. Which layers are fused (their rows are the gate's rows), which values become compact
    #    and in which layout (graph order is topological).
    candidate_set = set(candidates)
    layout: Dict[fx.Node, str] = {}
    layers: List[fx.Node] = []
    started = False
    for n in g.nodes:
        if n is candidates[0]:
            started = True
        if not started:
            continue
        if n in candidate_set:
            if _rows_proven(n, area, layout):
                layout[n] = _out_layout(n)
                layers.append(n)
        elif _same_shape_binary(gm, n, layout):
            layout[n] = layout[n.args[0]]
        elif _passthrough(gm, n) and tensor_operand(n) in layout:
            layout[n] = layout[tensor_operand(n)]
    if not layers:
        return {}
    layer_set = set(layers)

    # 2. The sort, once, before the region's first layer.
    with g.inserting_before(layers[0]):
        rs = g.call_function(ops.region_sort.default, (area, k))
        order = g.call_function(operator.getitem, (rs, 0))
        sarea = g.call_function(operator.getitem, (rs, 1))
        offs = g.call_function(operator.getitem, (rs, 2))

    compact: Dict[fx.Node, fx.Node] = {}
    restored: Dict[fx.Node, fx.Node] = {}

    def original(v):
        """The value of v in original order, full width (v itself unless it is compact)."""
        if not isinstance(v, fx.Node) or v not in layout:
            return v
        if v not in restored:
            c = compact[v]
            with g.inserting_before(c.next):
                restored[v] = g.call_function(
                    ops.scatter_blocks.default, (c, order, sarea, k)) if layout[v] == BLOCK \
                    else g.call_function(ops.unsort_rows.default, (c, order))
            restored[v].meta = {key: val for key, val in v.meta.items()
                                if key in ("val", "nn_module_stack", "stack_trace")}
        return restored[v]

    renamed = {}
    gathered: Dict[tuple, fx.Node] = {}   # (input, layout): its sorted copy, shared by its readers
    # 3. Compact copies of the region's nodes.
    for n in list(layout):
        with g.inserting_before(n):
            if n in layer_set:
                x = n.args[0]
                if x in layout and layout[x] == _need(n):
                    xc = compact[x]
                elif (x, _need(n)) in gathered:   # gate_proj and up_proj read the same x
                    xc = gathered[(x, _need(n))]
                else:
                    xo = original(x)
                    xc = g.call_function(ops.gather_blocks.default, (xo, order, sarea, k)) \
                        if _need(n) == BLOCK else \
                        g.call_function(ops.sort_rows.default, (xo, order))
                    gathered[(x, _need(n))] = xc
                _, _, anchor, w, b, fb, areas, mode, input_block, match = n.args
                new = g.call_function(ops.compact_linear.default, (
                    xc, sarea, anchor, w, b, fb, offs, areas, mode, input_block, match))
                renamed[n.name] = new.name
            else:
                new = g.node_copy(n, lambda a: compact.get(a, a))
        new.meta = {key: val for key, val in n.meta.items()
                    if key in ("nn_module_stack", "stack_trace")}
        compact[n] = new

    # 4. Readers outside the compact world get the original-order value.
    for n in layout:
        for user in list(n.users):
            if user in layout:   # compacted: its copy reads compact[n] (or original(n), step 3)
                continue
            if _metadata_check(user):
                user.args = (compact[n],) + tuple(user.args[1:])
                continue
            restored_n = original(n)
            user.args = fx.node.map_arg(user.args, lambda a: restored_n if a is n else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: restored_n if a is n else a)
    for n in reversed(list(layout)):
        g.erase_node(n)
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
                   ops.scatter_blocks.default):
            # gather_blocks reads a value only its block-reading layers use: it stays as it was.
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
        elif t is ops.compact_linear.default:
            x, sarea, anchor, w, b, fb, offs, areas, mode, input_block, match = n.args
            rs = sarea.args[0]
            with g.inserting_before(n):
                new = g.call_function(ops.area_linear.default, (
                    x, sorts[rs], anchor, w, b, fb, areas, mode, input_block, match))
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
