"""Turn each gated layer into an area op (DESIGN §1 "Areas").

partition: `area_linear/area_conv(..., mode="partition")` on the layer's own weight;
replicate: the weight (and bias) become K stacked copies of the original, mode "replicate";
exit: a layer reading an area-sparse input keeps a dense output and reads only the input's area
block (mode "dense", input_block=True). Layers reading an input block get their weights scaled by
sqrt(K) (SALConfig.input_block_gain="fan_in").
The feedback argument is left empty (backprop); attach_fa fills it. With
`SALConfig.area_impl="reference"` the masked-dense reference implementation is used instead.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from salcompile.errors import SalcompileError
from salcompile.layers import LayerSpec, WeightTracer, arg_names
from salcompile.validate import check_memory
from salcompile.ops import areas as area_ops

from .split_shared_path import shared_widths
from .context import PassContext

MODES = {"partition": "partition", "replicate": "replicate", "exit": "dense"}


def _replace_param(gm: fx.GraphModule, tracer: WeightTracer, name: str, fn) -> torch.Tensor:
    """Swap parameter `name` for a new one holding fn(old) (never edits the old tensor, which
    may be shared with the caller's ExportedProgram). Every other name of the same parameter (a
    tied embedding and head) gets the new one too, so the tie holds."""
    owner_path, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, leaf)
    new = nn.Parameter(fn(old.detach()), requires_grad=old.requires_grad)
    for alias, t in list(gm.named_parameters(remove_duplicate=False)):
        if t is old:
            path, _, attr = alias.rpartition(".")
            setattr(gm.get_submodule(path) if path else gm, attr, new)
            tracer.params[alias] = new
    setattr(owner, leaf, new)
    tracer.params[name] = new
    return new


def _other_uses(gm: fx.GraphModule, spec: LayerSpec, tracer: WeightTracer):
    """(uses, layers): the (node, user) edges through which something other than this layer
    reads spec.param (an embedding tied to the head, an elementwise use of the weight), and
    whether one of them is the weight of another layer."""
    old = tracer.params[spec.param]
    names = {n for n, t in tracer.params.items() if t is old}
    ours = set(tracer.chain(spec.weight)) | {spec.weight, spec.node}
    sources = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in names]
    uses = [(n, u) for n in sources + [c for c in ours if c is not spec.node]
            for u in n.users if u not in ours]
    return uses


def _apply_block_gain(gm, spec: LayerSpec, entry, plan, specs, tracer: WeightTracer,
                      k: int, first_col: int = 0) -> None:
    """Scale the layer's weight by sqrt(K) without changing what any other use of the parameter
    computes: the parameter is scaled, and every other read of it is scaled back by 1/sqrt(K)
    (a mul node in the graph). A parameter that is also another layer's weight keeps its scale
    (a plan note says so): scaling it back there would change that layer's form."""
    old = tracer.params[spec.param]
    shared = [s.name for s, e in ((s, e) for s, e in zip(specs, plan.layers)) if s is not spec
              and any(tracer.params.get(c) is old for c in [s.param] + list(s.constituents))]
    if shared:
        plan.notes.append(f"input_block_gain: {entry.name} keeps its weight's scale "
                          f"({spec.param} is also the weight of {', '.join(shared)}).")
        return
    uses = _other_uses(gm, spec, tracer)
    gain = math.sqrt(k)
    if first_col:   # a shared path: only the routed input columns read a block
        if uses:
            plan.notes.append(f"input_block_gain: {entry.name} keeps its weight's scale (its "
                              "parameter has other uses, and only its routed columns would scale).")
            return
        _replace_param(gm, tracer, spec.param, lambda w: torch.cat(
            [w[:, :first_col], w[:, first_col:] * gain], 1))
        return
    _replace_param(gm, tracer, spec.param, lambda w: w * gain)
    g = gm.graph
    for node, user in uses:
        with g.inserting_after(node):
            back = g.call_function(torch.ops.aten.mul.Tensor, (node, 1.0 / gain))
        if "val" in node.meta:
            back.meta["val"] = node.meta["val"]
        user.replace_input_with(node, back)


def _top_k(g: fx.Graph, spec: LayerSpec, target, args, mode: str, k: int) -> fx.Node:
    """Top-k routing: the layer once per choice (area = the row's j-th best), summed. In
    partition mode each call writes its own area's block (bias included); in dense mode (an
    exit) the k blocks read add up, with the bias once; in replicate mode the k copies add up.
    The calls are `spec.parts`; attach_fa fills each one's feedback slot. fuse_regions turns the
    k calls and their adds into one compact_linear over the rows' (row, choice) entries."""
    names = arg_names(target)
    area, bias = names.index("area"), names.index("bias")
    parts = []
    for j in range(k):
        a = list(args)
        a[area] = g.call_function(torch.ops.aten.select.int, (args[area], -1, j))
        if j and mode == "dense":
            a[bias] = None   # an exit's bias, once
        parts.append(g.call_function(target, tuple(a)))
    out = parts[0]
    for p in parts[1:]:
        out = g.call_function(torch.ops.aten.add.Tensor, (out, p))
    spec.parts = parts
    return out


def _replicate(gm, tracer, name: str, k: int) -> torch.Tensor:
    return _replace_param(gm, tracer, name, lambda w: w.unsqueeze(0).repeat(k, *([1] * w.dim())))


def _check_rows(entry, x: fx.Node, area: fx.Node, top_k: int = 1) -> None:
    xv, av = x.meta.get("val"), area.meta.get("val")
    if xv is None or av is None:
        return
    shape = av.shape[:-1] if top_k > 1 else av.shape   # top-k: areas [..., k]
    lead, rows = [str(d) for d in shape], [str(d) for d in xv.shape[:-1]]
    if rows[:len(lead)] != lead:
        raise SalcompileError(
            f"layer {entry.name} reads rows {list(xv.shape)}, but its gate routes {list(av.shape)} "
            "rows: the layer's input does not line up with the gate's. Give it its own region "
            "with SALConfig(gate_layers=[...]) or leave it un-gated.")


def _check_replicate_memory(gm, specs, plan, tracer: WeightTracer, k: int) -> None:
    """replicate holds K copies of each gated layer's weight, bias and feedback matrix: check
    their total (with the float64 draw of B) against the device's free memory before copying."""
    nbytes, device = 0, None
    for spec, entry in zip(specs, plan.layers):
        if entry.area_mode != "replicate":
            continue
        for name in [spec.param] + ([spec.bias.target] if spec.bias is not None else []):
            t = tracer.params.get(name)
            if t is not None:
                nbytes += k * t.numel() * t.element_size()
                device = t.device
    if nbytes:
        # the copies, their feedback matrices B (same shape) and B's float64 draw
        check_memory(4 * nbytes, f"area_mode='replicate' with areas={k} ({k} copies of every "
                     "gated layer's weight, bias and feedback)", device, fix="choose fewer areas, area_mode='partition', or build "
                     "the model under torch.device('meta') to inspect it")


def make_area_ops(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    specs, plan, tracer, routes, config = ctx.specs, ctx.plan, ctx.tracer, ctx.routes, ctx.config
    g = gm.graph
    k = config.areas
    reference = config.area_impl == "reference"
    _check_replicate_memory(gm, specs, plan, tracer, k)
    replaced = {}
    for spec, entry in zip(specs, plan.layers):
        spec.x = replaced.get(spec.x, spec.x)
        if spec.bias is not None:
            spec.bias = replaced.get(spec.bias, spec.bias)
        if not entry.area_mode:
            continue
        area, anchor = routes[entry.gate]
        if spec.kind == "linear":
            _check_rows(entry, spec.x, area, config.route_top_k)
        mode = MODES[entry.area_mode]
        if mode == "replicate":
            entry.shape = list(_replicate(gm, tracer, spec.param, k).shape)
            if spec.bias is not None:
                _replicate(gm, tracer, spec.bias.target, k)
        if entry.input_block and config.input_block_gain == "fan_in" and k > 1:
            # The layer sums K times fewer inputs than its init assumed: restore the output scale
            # (and only its own: other uses of the parameter read it scaled back).
            # an exit under top-k routing sums k blocks of K: it reads k/K of its inputs
            gain_k = k / config.route_top_k if mode == "dense" else k
            _apply_block_gain(gm, spec, entry, plan, specs, tracer, gain_k,
                              shared_widths(spec, entry, config)[1])
        common = (spec.x, area, anchor, spec.weight, spec.bias, None)
        flags = (k, mode, bool(entry.input_block), False)
        if spec.kind == "linear":
            target = area_ops.area_linear_reference if reference else \
                torch.ops.salcompile.area_linear.default
            args = common + flags
        else:
            c = spec.conv
            target = area_ops.area_conv_reference if reference else \
                torch.ops.salcompile.area_conv.default
            args = common + (c["stride"], c["padding"], c["dilation"], c["groups"]) + flags
        node = spec.node
        with g.inserting_before(node):
            if config.route_top_k > 1:
                new = _top_k(g, spec, target, args, mode, config.route_top_k)
            else:
                new = g.call_function(target, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        replaced[node] = spec.node = new
        entry.node = new.name
        spec.area = True
        for p in spec.parts:
            p.meta = dict(node.meta)
        entry.parts = [p.name for p in spec.parts]
    g.lint()
    gm.recompile()
    return gm
