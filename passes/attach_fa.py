"""Swap every FA layer for its salcompile op, which carries B in its backward.

One feedback buffer per parameter (a tied weight used by two layers shares it), registered beside
the parameter as `<name>_feedback`. When the layer reads the weight through ops (W.t(), chunk,
slicing), the same ops are applied to B, so B always lines up with the operand the layer uses.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from salcompile.config import SALConfig
from salcompile.feedback_init import draw_uniform, fan_in
from salcompile.layers import LayerSpec, WeightTracer

from ._buffers import register_beside

ops = torch.ops.salcompile


def attach_fa(gm: fx.GraphModule, specs, plan, tracer: WeightTracer, config: SALConfig) -> fx.GraphModule:
    g = gm.graph
    match = config.feedback_scale == "match"
    buffers = {}
    params = tracer.params
    replaced = {}  # old layer node -> its FA op, for specs that read an earlier layer's output
    for spec, entry in zip(specs, plan.layers):
        spec.x = replaced.get(spec.x, spec.x)
        if spec.bias is not None:
            spec.bias = replaced.get(spec.bias, spec.bias)
        p = spec.param
        if p not in buffers:
            w = params[p]
            if config.feedback_init == "weights":
                b = w.detach().clone()
            else:
                per_copy = w.shape[1:] if entry.area_mode == "replicate" else w.shape
                b = draw_uniform(tuple(w.shape), fan_in(spec.kind, per_copy, spec.weight_first),
                                 config.feedback_seed, p, w)
            buffers[p] = register_beside(gm, p, "feedback", b)
        entry.feedback_buffer = buffers[p]
        node = spec.node
        with g.inserting_before(node):
            b_node = g.get_attr(buffers[p])
            b_operand = _mirror_chain(g, tracer, spec, b_node)
            if spec.area:  # an area op: fill its feedback slot and per-area norm matching
                args = list(node.args)
                args[5], args[-1] = b_operand, match
                node.args = tuple(args)
                continue
            if spec.kind == "linear":
                new = g.call_function(ops.fa_linear.default, (spec.x, spec.weight, spec.bias,
                                                              b_operand, match))
            elif spec.kind == "conv":
                c = spec.conv
                new = g.call_function(ops.fa_conv.default, (
                    spec.x, spec.weight, spec.bias, b_operand, c["stride"], c["padding"],
                    c["dilation"], c["transposed"], c["output_padding"], c["groups"], match))
            elif spec.kind == "matmul":
                new = g.call_function(ops.fa_matmul.default, (spec.x, spec.weight, b_operand,
                                                              spec.weight_first, match))
            else:
                new = g.call_function(ops.fa_einsum.default, (spec.equation, spec.x, spec.weight,
                                                              b_operand, spec.weight_first, match))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        replaced[node] = spec.node = new
        entry.node = new.name
    g.lint()
    gm.recompile()
    return gm


def _mirror_chain(g: fx.Graph, tracer: WeightTracer, spec: LayerSpec, b_node: fx.Node) -> fx.Node:
    """Apply to B the ops that lead from the parameter to the weight operand."""
    env = {}

    def sub(a):
        if a in env:
            return env[a]
        if a.op == "get_attr" and a.target == spec.param:
            return b_node
        return a

    for c in tracer.chain(spec.weight):
        env[c] = g.node_copy(c, sub)
    return sub(spec.weight)
