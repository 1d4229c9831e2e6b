"""Swap every FA layer for its salcompile op, which carries B in its backward.

One feedback buffer per parameter (a tied weight used by two layers shares it), registered beside
the parameter as `<name>_feedback`. When the layer reads the weight through view ops (W.t(), chunk,
slicing, expand), the same ops are applied to B, so B always lines up with the operand the layer
uses. A *composed* weight (LoRA's W + A@B, weight_norm, a learnt scale times W: LayerSpec.composed)
gets one B per weight operand, shaped like the effective weight and registered beside its largest
parameter as `<name>_effective_feedback`; the layer's dW flows to every constituent through its
own chain (their true local gradients). With feedback_init="weights", B is the effective weight's
value at transform time.

The rule (salcompile/feedback/) decides what is stored and what the backward reads: "fa" keeps the
fixed B; "frsf" keeps |B|; "usf"/"brsf" store nothing; "kp" keeps B as a parameter the layer ops
hand W's gradient. A rule with an `operand` gets one graph node before the layer that derives the
backward operand from the weight operand (detached: nothing flows back into W through it) at
every step.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from salcompile import feedback as rules
from salcompile.config import SALConfig
from salcompile.errors import SalcompileError
from salcompile.families import family
from salcompile.feedback_init import draw_uniform, fan_in
from salcompile.layers import LayerSpec, WeightTracer, get_arg, set_args

from ._buffers import register_beside
from .context import PassContext

ops = torch.ops.salcompile


def attach_fa(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    specs, plan, tracer, config = ctx.specs, ctx.plan, ctx.tracer, ctx.config
    g = gm.graph
    match = config.feedback_scale == "match"
    rule = rules.get(config.feedback)
    buffers = {}
    params = tracer.params
    replaced = {}  # old layer node -> its FA op, for specs that read an earlier layer's output
    for spec, entry in zip(specs, plan.layers):
        spec.x = replaced.get(spec.x, spec.x)
        if spec.bias is not None:
            spec.bias = replaced.get(spec.bias, spec.bias)
        p = spec.param
        key = spec.weight if spec.composed else p
        if key not in buffers:
            buffers[key] = None
            if rule.stored is not None:
                if spec.composed:
                    b = _effective_feedback(gm, tracer, spec, entry, config)
                else:
                    w = params[p]
                    if config.feedback_init == "weights":
                        b = w.detach().clone()
                    else:
                        b = draw_uniform(tuple(w.shape), _fan_in(spec, entry, w.shape),
                                         config.feedback_seed, p, w)
                if rule.stored == "abs":
                    b = b.abs()
                suffix = "effective_feedback" if spec.composed else "feedback"
                buffers[key] = register_beside(gm, p, suffix, b, parameter=rule.trainable)
        entry.feedback_buffer = buffers[key] or ""
        node = spec.node
        # a shared path's parts precede its output node: B goes right after the weight
        with g.inserting_before(spec.weight.next if spec.parts else node):
            b_operand = None
            if buffers[key] is not None:
                b_node = g.get_attr(buffers[key])
                b_operand = b_node if spec.composed else _mirror_chain(g, tracer, spec, b_node)
            if rule.operand is not None:
                b_operand = _derived_operand(g, rule, spec, entry, b_operand)
            if spec.parts:   # a shared path: each part reads a slice of W, and of B
                _attach_parts(g, spec, b_operand, match)
                entry.parts = [p.name for p in spec.parts]
                continue
            if spec.area:  # an area op: fill its feedback slot and per-area norm matching
                set_args(node, feedback=b_operand, match_norm=match)
                continue
            fam = family(spec.kind)   # salcompile/families.py: the FA op of this layer family
            new = g.call_function(fam.op, fam.fa_args(spec, b_operand, match))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        replaced[node] = spec.node = new
        entry.node = new.name
    g.lint()
    gm.recompile()
    return gm


def _attach_parts(g: fx.Graph, spec: LayerSpec, b_operand: fx.Node, match: bool) -> None:
    """The pieces passes/split_shared_path.py made of one layer: area ops get their feedback
    slot filled, plain linears become fa_linear; each with B sliced as its W is."""
    for i, part in enumerate(spec.parts):
        w = get_arg(part, "weight")
        with g.inserting_before(part):
            b = _mirror_slices(g, spec.weight, w, b_operand)
            if part.target is torch.ops.aten.linear.default:
                x, _, bias = (list(part.args) + [None])[:3]
                new = g.call_function(ops.fa_linear.default, (x, w, bias, b, match))
                new.meta = dict(part.meta)
                part.replace_all_uses_with(new)
                g.erase_node(part)
                spec.parts[i] = new
            else:
                set_args(part, feedback=b, match_norm=match)


def _mirror_slices(g: fx.Graph, root: fx.Node, w: fx.Node, b: fx.Node) -> fx.Node:
    """Apply to b the slice ops that lead from root to w."""
    chain = []
    while w is not root:
        chain.append(w)
        w = w.args[0]
    for s in reversed(chain):
        b = g.call_function(s.target, (b,) + tuple(s.args[1:]))
    return b


def _fan_in(spec: LayerSpec, entry, shape) -> int:
    per_copy = shape[1:] if entry.area_mode == "replicate" and not spec.composed else shape
    return fan_in(spec.kind, tuple(per_copy), spec.weight_first)


def _derived_operand(g: fx.Graph, rule, spec: LayerSpec, entry, stored) -> fx.Node:
    """rule.operand(W.detach(), stored, 1/sqrt(fan_in)) as graph nodes: recomputed every step,
    and detached, so W trains by the layer's own dW only, never through its feedback."""
    val = spec.weight.meta.get("val")
    shape = tuple(val.shape) if val is not None else tuple(entry.shape)
    scale = entry.feedback_bound = 1.0 / math.sqrt(max(1, _fan_in(spec, entry, shape)))
    w = g.call_function(torch.ops.aten.detach.default, (spec.weight,))
    node = g.call_function(rule.operand, (w, stored, scale))
    if val is not None:   # same shape, dtype and device as the weight operand
        w.meta["val"] = node.meta["val"] = val
    return node


def _effective_feedback(gm, tracer: WeightTracer, spec: LayerSpec, entry, config: SALConfig):
    """B for a composed weight: shaped like the effective weight the layer uses."""
    try:
        w = tracer.evaluate(gm, spec.weight)
    except Exception as exc:   # the chain needs input data (sizes) or fails on its own
        val = spec.weight.meta.get("val")
        if val is None or config.feedback_init == "weights":
            raise SalcompileError(
                f"layer {entry.name}: its composed weight ({', '.join(spec.constituents)}) cannot be "
                f"computed from the parameters alone ({type(exc).__name__}: {exc}), so its feedback "
                "matrix cannot be sized or copied. Pass example_inputs=(x,) to transform(), or use "
                "feedback_init='kaiming_uniform'.") from exc
        w = torch.empty(tuple(int(d) for d in val.shape), dtype=val.dtype,
                        device=tracer.params[spec.param].device)
    if config.feedback_init == "weights":
        return w.detach().clone()
    return draw_uniform(tuple(w.shape), fan_in(spec.kind, tuple(w.shape), spec.weight_first),
                        config.feedback_seed, f"{spec.param}:effective:{entry.name}", w)


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
