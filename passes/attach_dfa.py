"""Direct feedback alignment in graph form (DESIGN §1).

Every layer input that carries an error signal (it depends on a parameter) becomes a *tap*: all its
consumers read `tap.detach()`, and the head's output goes through `dfa_output(y, taps, D)`, whose
backward hands each tap e·D. The error then flows from the tap through the parameter-free ops
(activation derivative, norms, pooling) into the layer that produced it, and stops at that layer's
own detached input: each layer learns from e·D alone, as in Nøkland (2016).

The rule that pairs the error with a tap: the output is `(*lead, n_out)` and e·D reaches a tap
only when the tap is `(*lead, *rest)` (the same leading dimensions, position by position: the
batch, and for per-token outputs the sequence), with D of shape `n_out × prod(rest)`. Any other
tap is refused, with a SalcompileError that says so and points to feedback='fa'. Refused, because
no position of the output corresponds to a position of such a tap:
- encoder-decoder models (T5, Whisper, BART): the encoder's states are `[batch, source_len, d]`,
  the error `[batch, target_len, vocab]`;
- tokens flattened to rows (Mixtral and other MoE routers/experts: `[batch·seq, d]`, or expert
  rows gathered in routing order);
- channels-first feature maps under a per-position output (wav2vec2's feature extractor,
  `[batch, channels, frames]` under `[batch, frames, vocab]`).
Pooling or broadcasting the error over positions would train these layers on an error that is
not theirs; FA has no such constraint and covers every one of these models.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from salcompile.errors import SalcompileError
from salcompile.feedback_init import draw_uniform

from ._buffers import register_beside
from .context import PassContext

aten = torch.ops.aten


def attach_dfa(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    specs, plan, tracer, config, head = ctx.specs, ctx.plan, ctx.tracer, ctx.config, ctx.head
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
            raise SalcompileError(refusal(entry.name, list(out_val.shape), shape))
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


def _dims(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def refusal(layer: str, out_shape, tap_shape) -> str:
    """The SalcompileError message for a tap whose leading dimensions are not the output's."""
    lead = [str(d) for d in out_shape[:-1]]
    tap = [str(d) for d in tap_shape]
    if not tap or tap[0] != lead[0]:
        why = (f"its rows ({tap[0] if tap else '?'}) are not the output's {lead[0]} samples: "
               "tokens flattened or regrouped into rows, as in a mixture-of-experts router or "
               "expert")
    else:
        why = (f"it shares the batch dimension but not the positions {_dims(lead[1:])}: an "
               "encoder-decoder's encoder states against the decoder's tokens, or a "
               "channels-first feature map under a per-position output")
    return (f"feedback='dfa' is refused for this model: the input of layer {layer} has shape "
            f"{_dims(tap)}, whose leading dimensions do not line up with the output's "
            f"{_dims(lead)} (output shape {_dims(out_shape)}); {why}. DFA delivers the output "
            f"error only to layer inputs shaped [{', '.join(lead)}, features...]. Use "
            "feedback='fa' (feedback alignment covers encoder-decoder and mixture-of-experts "
            "models) or feedback='bp'.")
