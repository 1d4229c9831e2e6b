"""Alignment figures FA researchers track, per layer.

- weight_alignment: the angle between W and its feedback B (0° = symmetric, 90° = unrelated).
- gradient_alignment: the angle between the update FA/DFA computes for each weight and the true
  backprop gradient on the same batch (the reference shares the module's parameters).
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.fx as fx

from .module import feedback_tensor, require_sal
from .routing import routing_counts_kept


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    den = a.norm() * b.norm()
    if den == 0:
        return float("nan")
    return math.degrees(math.acos(float((a @ b / den).clamp(-1.0, 1.0))))


def weight_alignment(module) -> Dict[str, float]:
    """{weight name: angle(W, B) in degrees} for every layer of an FA-family rule (fa, usf, brsf,
    frsf, kp: salcompile/feedback/), B being the operand the rule's backward uses now (brsf: one
    fresh draw). 0° = symmetric (backprop), 90° = unrelated. DFA's D has no W to compare with."""
    from . import feedback
    sal = require_sal(module)
    params = _all_parameters(sal)
    out = {}
    for l in sal.sal_plan.layers:
        rule = feedback.get(l.feedback)
        if rule.family != "fa" or (rule.stored is not None and not l.feedback_buffer):
            continue
        w = params[l.weight].detach()
        stored = feedback_tensor(sal, l.feedback_buffer).detach() if l.feedback_buffer else None
        if stored is not None and stored.shape != w.shape:   # a composed weight's effective B
            w = _effective_weight(sal, l)
            if w is None:
                continue
        with torch.no_grad():
            out[l.weight] = angle_degrees(w, rule.backward_operand(w, stored, 1.0))
    return out


def _effective_weight(sal, layer):
    """The value of a composed layer's weight operand (W + A@B, g·V/‖V‖, ...) now, or None."""
    from .layers import WeightTracer
    node = next((n for n in sal.graph.nodes if n.name == layer.node), None)
    if node is None or not isinstance(node.target, torch._ops.OpOverload):
        return None
    names = [a.name for a in node.target._schema.arguments]
    if "weight" not in names:
        return None
    try:
        return WeightTracer(sal).evaluate(sal, node.args[names.index("weight")])
    except KeyError:
        return None


def backprop_reference(module) -> fx.GraphModule:
    """The same graph with plain backprop, sharing `module`'s parameters and buffers."""
    from .passes import strip_feedback
    sal = require_sal(module)
    ref = fx.GraphModule(sal, strip_feedback(sal.graph))
    ref.train(sal.training)
    return ref


def _all_parameters(module) -> Dict[str, torch.nn.Parameter]:
    """{name: parameter} under every name: a tied parameter (GPT-2's lm_head.weight and
    transformer.wte.weight) appears under each of its names, as the plan may use either;
    `named_parameters()` alone keeps only the first."""
    return dict(module.named_parameters(remove_duplicate=False))


def _grads(module, loss_fn, inputs, names):
    params = _all_parameters(module)
    wanted = [params[n] for n in names]
    loss = loss_fn(module(*inputs))
    return dict(zip(names, torch.autograd.grad(loss, wanted, allow_unused=True)))


def _scalar_loss(loss_fn: Callable) -> Callable:
    """`loss_fn`, checked: callable, and returning one differentiable number."""
    from .errors import SalcompileError
    if not callable(loss_fn):
        raise SalcompileError(f"gradient_alignment: loss_fn must be a function of the output, got "
                              f"{type(loss_fn).__name__}; e.g. lambda out: F.cross_entropy(out, y).")

    def checked(out):
        loss = loss_fn(out)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise SalcompileError(
                f"gradient_alignment: loss_fn must return a scalar tensor, got {shape}; reduce "
                "it (.mean() or .sum(), or reduction='mean' in the loss).")
        if not loss.requires_grad:
            raise SalcompileError("gradient_alignment: loss_fn's result does not depend on the "
                                  "output (no gradient); compute it from the output it is given.")
        return loss.reshape(())
    return checked


def gradient_alignment(module, loss_fn: Callable, *inputs) -> Dict[str, float]:
    """{weight name: angle(SAL update, backprop gradient) in degrees} on one batch.

    Unit: degrees, in [0, 180]. 0° = the update is the true gradient's direction (backprop);
    below 90° it still descends the loss; 90° = orthogonal (no first-order progress); above 90°
    it ascends. NaN for a weight that received no gradient on this batch (e.g. no row routed to
    it). Feedback alignment typically starts near 90° and falls as W aligns with B.
    `loss_fn(output) -> scalar`, e.g. `lambda out: F.cross_entropy(out, y)`. Randomness (dropout)
    is replayed with the same RNG state for both passes; routing statistics are left untouched.
    """
    loss_fn = _scalar_loss(loss_fn)
    sal = require_sal(module)
    names = sorted({l.weight for l in sal.sal_plan.layers})
    with routing_counts_kept(sal):  # a measurement: leave the routing statistics as they were
        state = torch.random.get_rng_state()
        sal_grads = _grads(sal, loss_fn, inputs, names)
        torch.random.set_rng_state(state)
        bp_grads = _grads(backprop_reference(sal), loss_fn, inputs, names)
    return {n: angle_degrees(sal_grads[n], bp_grads[n]) if sal_grads[n] is not None
            and bp_grads[n] is not None else float("nan") for n in names}
