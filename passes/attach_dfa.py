"""Direct feedback alignment in graph form (DESIGN §1).

Every layer input that carries an error signal (it depends on a parameter) becomes a *tap*: all its
consumers read `tap.detach()`, and the head's output goes through `dfa_output(y, taps, D)`, whose
backward hands each tap e·D. The error then flows from the tap through the parameter-free ops
(activation derivative, norms, pooling) into the layer that produced it, and stops at that layer's
own detached input: each layer learns from e·D alone, as in Nøkland (2016).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from salcompile.config import SALConfig
from salcompile.errors import SalcompileError
from salcompile.feedback_init import draw_uniform
from salcompile.layers import WeightTracer

from ._buffers import register_beside

aten = torch.ops.aten


def attach_dfa(gm: fx.GraphModule, specs, plan, tracer: WeightTracer, config: SALConfig,
               head) -> fx.GraphModule:
    if head is None:
        raise SalcompileError("feedback='dfa' needs a layer whose output reaches the model output "
                              "(the head); none was found. Use feedback='fa'.")
    g = gm.graph
    out_val = head.node.meta.get("val")
    if out_val is None:
        raise SalcompileError("feedback='dfa' needs tensor shapes to size its D matrices: pass "
                              "example_inputs=(x,) to transform().")
    lead, n_out = list(out_val.shape[:-1]), int(out_val.shape[-1])
    taps, d_names = [], []
    for spec, entry in zip(specs, plan.layers):
        x = spec.x
        if not tracer.sources.get(x):  # reads only inputs/constants: no error to deliver
            continue
        if x in taps:
            entry.feedback_buffer = d_names[taps.index(x)]
            continue
        val = x.meta.get("val")
        if val is None:
            raise SalcompileError("feedback='dfa' needs tensor shapes: pass example_inputs.")
        shape = list(val.shape)
        if [str(s) for s in shape[:len(lead)]] != [str(s) for s in lead]:
            raise SalcompileError(
                f"DFA cannot deliver the output error (shape {list(out_val.shape)}) to the input of "
                f"layer {entry.name} (shape {shape}): their leading dimensions differ. "
                "Use feedback='fa' for this model.")
        rest = shape[len(lead):]
        if not all(isinstance(s, int) for s in rest):
            raise SalcompileError(f"DFA needs static feature sizes at layer {entry.name}, got {rest}; "
                                  "only the batch dimension may vary. Use feedback='fa'.")
        width = math.prod(rest)
        d = draw_uniform((n_out, width), n_out, config.feedback_seed, f"dfa:{spec.param}",
                         tracer.params[spec.param])
        d_names.append(register_beside(gm, spec.param, "dfa", d))
        taps.append(x)
        entry.feedback_buffer = d_names[-1]
    plan.dfa_taps = [t.name for t in taps]
    if not taps:
        return gm
    y = head.node
    with g.inserting_before(y.next):  # (inserting_after would reverse the order)
        d_nodes = [g.get_attr(name) for name in d_names]
        dfa = g.call_function(torch.ops.salcompile.dfa_output.default, (y, list(taps), d_nodes))
    dfa.meta = dict(y.meta)
    y.replace_all_uses_with(dfa, delete_user_cb=lambda u: u is not dfa)
    for t in taps:
        with g.inserting_after(t):
            det = g.call_function(aten.detach.default, (t,))
        det.meta = dict(t.meta)
        t.replace_all_uses_with(det, delete_user_cb=lambda u: u is not dfa and u is not det)
    g.lint()
    gm.recompile()
    return gm
