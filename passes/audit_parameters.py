"""The coverage guarantee (DESIGN §1): every parameter is accounted for, no weight silently trains
by backprop.

Runs last, on the finished graph, and changes nothing in it. It fills `plan.roles` (every
parameter → "layer" | "local" | "backprop" | "frozen") and then checks the graph itself: every
matmul-like op (mm, addmm, bmm, linear, conv*, einsum, grouped_mm, ..., a salcompile layer op, or
another library's custom op) that reads input data and has an operand computed from parameters
must be a layer of the plan (its node in `plan.layers`) or be listed in `plan.backprop` with a
reason. Anything else is a weight the layer finder missed: a salcompile bug, which would train
that weight's input gradient by backprop without a word. Such uses are added to `plan.backprop`
and warned about; with the environment variable SALCOMPILE_STRICT_AUDIT=1 (the test suite sets
it) they raise instead.
"""
from __future__ import annotations

import os
import warnings
from typing import List

import torch
import torch.fx as fx

from salcompile.errors import SalcompileError
from salcompile.layers import MATMUL_LIKE, WeightTracer, _is_size, _leaf_module, op_name
from .context import PassContext

ops = torch.ops.salcompile
# salcompile's own ops that are not layers: gates, routing counters, layout, DFA, guards.
_HELPER_OPS = {"region_gate", "region_gate_topk", "count_routes", "dfa_output", "check_finite", "region_sort",
               "sort_rows", "unsort_rows", "gather_blocks", "scatter_blocks",
               "fa_grouped_mm_backward"}


def _layer_like(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Could this node transport a weight in its backward?"""
    if n.op == "call_module":   # symbolic_trace leaves: the layer finder's own rule for them
        return _leaf_module(n, gm) is not None
    if n.op not in ("call_function", "call_method"):
        return False
    t = n.target
    if isinstance(t, torch._ops.OpOverload) and t.namespace not in ("aten", "prims"):
        return t._opname not in _HELPER_OPS   # a salcompile layer op, or another library's op
    if getattr(t, "__module__", "") == "salcompile.ops.areas":   # the masked-dense references
        return True
    return op_name(n).rstrip("_") in MATMUL_LIKE


def _reads_data(tracer: WeightTracer, n: fx.Node) -> bool:
    return any(tracer.reads_input.get(i, False) and not _is_size(i) for i in n.all_input_nodes)


def unaccounted_uses(gm: fx.GraphModule, plan) -> List[tuple]:
    """[(node, op, parameters)] for every weight use in `gm` that the plan does not account for."""
    tracer = WeightTracer(gm)
    known = {e.node for e in plan.layers} | {p for e in plan.layers for p in e.parts} | \
        {b.node for b in plan.backprop}
    out = []
    for n in gm.graph.nodes:
        if n.name in known or not _layer_like(gm, n) or not _reads_data(tracer, n):
            continue
        if n.op == "call_module":
            ps = [f"{n.target}.{p}" for p, _ in gm.get_submodule(n.target).named_parameters()]
        else:
            ps = sorted({p for i in n.all_input_nodes
                         for p in (tracer.weight_params(i) or tracer.gathered_params(i) or [])})
        if ps:
            out.append((n, op_name(n), ps))
    return out


def audit_parameters(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    plan, config = ctx.plan, ctx.config
    from salcompile.plan import FallbackEntry, layer_name

    missed = unaccounted_uses(gm, plan)
    if missed:
        text = "; ".join(f"{n.name} ({op}: {', '.join(ps)})" for n, op, ps in missed)
        message = (f"salcompile: the layer finder missed weight uses that would train by backprop: "
                   f"{text}. This is a salcompile bug: please report it with the model.")
        if os.environ.get("SALCOMPILE_STRICT_AUDIT") == "1":
            raise SalcompileError(message)
        warnings.warn(message, stacklevel=3)
        for n, op, ps in missed:
            plan.backprop.append(FallbackEntry(
                name=layer_name(n, ps[0]), op=op, weights=ps, node=n.name,
                reason="not recognised by the layer finder (found by the parameter audit)"))
    on_backprop = {p for b in plan.backprop for p in b.weights}
    on_layer = {p for e in plan.layers for p in [e.weight, *e.constituents]}
    feedback = {e.feedback_buffer for e in plan.layers if e.feedback_buffer}   # Kolen-Pollack's B
    roles = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        roles[name] = ("frozen" if not p.requires_grad else "backprop" if name in on_backprop
                       else "layer" if name in on_layer else "feedback" if name in feedback
                       else "local")
    # a tied parameter has one role under all its names
    by_tensor = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    rank = {"backprop": 0, "layer": 1, "feedback": 2, "local": 3, "frozen": 4}
    for names in by_tensor.values():
        role = min((roles[n] for n in names), key=rank.__getitem__)
        for n in names:
            roles[n] = role
    plan.roles = roles
    if plan.backprop and config.on_backprop == "error":
        listed = "; ".join(f"{b.name} ({b.op}: {b.reason})" for b in plan.backprop)
        raise SalcompileError(
            f"on_backprop='error': {len(plan.backprop)} layer(s) would train by backprop: {listed}. "
            "Rewrite them with ops salcompile covers (linear, conv, matmul, einsum, grouped_mm), "
            "freeze their parameters (requires_grad=False), or allow them with "
            "on_backprop='warn'.")
    return gm
