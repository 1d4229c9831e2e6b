"""The inverse of the feedback passes: the same graph trained by plain backprop.

Used as the reference for alignment metrics: built on the same module, it shares its parameters.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx

from salcompile.layers import get_arg, set_args
from salcompile.ops.plain import plain_call

aten = torch.ops.aten
ops = torch.ops.salcompile


def _is_area_op(target) -> bool:
    from salcompile.ops import areas
    return target in (ops.area_linear.default, ops.area_conv.default, areas.area_linear_reference,
                      areas.area_conv_reference, ops.compact_linear.default)


def strip_feedback(graph: fx.Graph) -> fx.Graph:
    """Return a copy of `graph` with FA ops turned back into aten ops and DFA taps removed."""
    with warnings.catch_warnings():  # torch's own pytree deprecation noise on deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        g = copy.deepcopy(graph)
    feedback_nodes = []
    for node in list(g.nodes):
        t = node.target
        new = None
        if _is_area_op(t) and get_arg(node, "feedback") is not None:   # empty the feedback slot
            feedback_nodes.append(get_arg(node, "feedback"))
            set_args(node, feedback=None, match_norm=False)
            continue
        plain = plain_call(t, node.args, node.kwargs)   # salcompile/ops/plain.py
        with g.inserting_before(node):
            if plain is not None:
                new = g.call_function(*plain)
            elif t is ops.fa_grouped_mm.default:   # B = W: the op's own backward is backprop's
                feedback_nodes.append(get_arg(node, "feedback"))
                set_args(node, feedback=get_arg(node, "weight"), match_norm=False)
                continue
            elif t is ops.dfa_output.default:
                y, taps, ds = (get_arg(node, n) for n in ("output", "taps", "feedback"))
                feedback_nodes.extend(ds)
                for tap in taps:
                    for user in list(tap.users):
                        if user.target is aten.detach.default:
                            user.replace_all_uses_with(tap)
                            g.erase_node(user)
                node.replace_all_uses_with(y)
                g.erase_node(node)
                continue
        if new is not None:
            feedback_nodes.append(get_arg(node, "feedback"))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
    _erase_unused(feedback_nodes)
    g.lint()
    return g


def _erase_unused(nodes) -> None:
    """Erase the feedback reads (and the view chains mirrored onto B) nothing uses any more."""
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if getattr(n, "_erased", False) or n.users or n.op not in ("get_attr", "call_function"):
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        stack.extend(inputs)
