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
from typing import Dict, List, Tuple

import torch
import torch.fx as fx
from torch import nn

from salcompile.config import SALConfig
from salcompile.errors import SalcompileError
from salcompile.layers import LayerSpec, WeightTracer
from salcompile.ops import areas as area_ops

MODES = {"partition": "partition", "replicate": "replicate", "exit": "dense"}


def _replace_param(gm: fx.GraphModule, tracer: WeightTracer, name: str, fn) -> torch.Tensor:
    """Swap parameter `name` for a new one holding fn(old) (never edits the old tensor, which
    may be shared with the caller's ExportedProgram)."""
    owner_path, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, leaf)
    new = nn.Parameter(fn(old.detach()), requires_grad=old.requires_grad)
    setattr(owner, leaf, new)
    tracer.params[name] = new
    return new


def _replicate(gm, tracer, name: str, k: int) -> torch.Tensor:
    return _replace_param(gm, tracer, name, lambda w: w.unsqueeze(0).repeat(k, *([1] * w.dim())))


def _check_rows(entry, x: fx.Node, area: fx.Node) -> None:
    xv, av = x.meta.get("val"), area.meta.get("val")
    if xv is None or av is None:
        return
    lead, rows = [str(d) for d in av.shape], [str(d) for d in xv.shape[:-1]]
    if rows[:len(lead)] != lead:
        raise SalcompileError(
            f"layer {entry.name} reads rows {list(xv.shape)}, but its gate routes {list(av.shape)} "
            "rows: the layer's input does not line up with the gate's. Give it its own region "
            "with SALConfig(gate_layers=[...]) or leave it un-gated.")


def make_area_ops(gm: fx.GraphModule, specs: List[LayerSpec], plan, tracer: WeightTracer,
                  routes: Dict[str, Tuple[fx.Node, fx.Node]], config: SALConfig) -> fx.GraphModule:
    g = gm.graph
    k = config.areas
    reference = config.area_impl == "reference"
    replaced = {}
    for spec, entry in zip(specs, plan.layers):
        spec.x = replaced.get(spec.x, spec.x)
        if spec.bias is not None:
            spec.bias = replaced.get(spec.bias, spec.bias)
        if not entry.area_mode:
            continue
        area, anchor = routes[entry.gate]
        if spec.kind == "linear":
            _check_rows(entry, spec.x, area)
        mode = MODES[entry.area_mode]
        if mode == "replicate":
            entry.shape = list(_replicate(gm, tracer, spec.param, k).shape)
            if spec.bias is not None:
                _replicate(gm, tracer, spec.bias.target, k)
        if entry.input_block and config.input_block_gain == "fan_in" and k > 1:
            # The layer sums K times fewer inputs than its init assumed: restore the output scale.
            _replace_param(gm, tracer, spec.param, lambda w: w * math.sqrt(k))
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
            new = g.call_function(target, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        replaced[node] = spec.node = new
        entry.node = new.name
        spec.area = True
    g.lint()
    gm.recompile()
    return gm
