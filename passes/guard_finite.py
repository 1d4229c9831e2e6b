"""Guard every layer output (and every floating-point model input) with `check_finite`.

`SALConfig(check_finite=True)` runs this pass last. After each layer node it inserts
`check_finite(node, "<layer name>")`, and every other consumer of the node reads the guard instead:
the forward raises a SalcompileError naming the first layer whose output holds NaN/inf, and the
guard's backward does the same for the gradient reaching that layer. Each floating-point input gets
one guard named "input <placeholder>", so bad data is reported as bad input, not as a bad layer.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from salcompile.ops.finite import check_finite_input
from .context import PassContext

guard_op = torch.ops.salcompile.check_finite.default


def guard_finite(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    specs, plan = ctx.specs, ctx.plan
    g = gm.graph
    inputs = [n for n in g.nodes if n.op == "placeholder"]
    after_inputs = inputs[-1].next if inputs else None  # guards go after the last input
    for node in inputs:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            if val.is_floating_point():
                _guard(g, node, guard_op, f"input {node.name}", after_inputs)
        elif "val" not in node.meta:  # symbolic_trace: the input's type is known only at run time
            _guard(g, node, check_finite_input, f"input {node.name}", after_inputs)
    seen = set()
    for spec, entry in zip(specs, plan.layers):
        node = spec.node
        if node in seen:
            continue
        seen.add(node)
        _guard(g, node, guard_op, entry.name, node.next)
    g.lint()
    gm.recompile()
    return gm


def _guard(g: fx.Graph, node: fx.Node, target, name: str, before: fx.Node) -> fx.Node:
    # before=node.next: right after `node` (inserting_after would reverse the order of insertions)
    with g.inserting_before(before):
        guard = g.call_function(target, (node, name))
    guard.meta = dict(node.meta)
    node.replace_all_uses_with(guard, delete_user_cb=lambda u: u is not guard)
    return guard
