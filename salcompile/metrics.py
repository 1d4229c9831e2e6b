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

from .module import require_sal
from .routing import routing_counts_kept


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    den = a.norm() * b.norm()
    if den == 0:
        return float("nan")
    return math.degrees(math.acos(float((a @ b / den).clamp(-1.0, 1.0))))


def weight_alignment(module) -> Dict[str, float]:
    """{weight name: angle(W, B) in degrees} for every FA layer."""
    sal = require_sal(module)
    params = _all_parameters(sal)
    return {l.weight: angle_degrees(params[l.weight], sal.get_buffer(l.feedback_buffer))
            for l in sal.sal_plan.layers if l.feedback == "fa" and l.feedback_buffer}


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


def gradient_alignment(module, loss_fn: Callable, *inputs) -> Dict[str, float]:
    """{weight name: angle(SAL update, backprop gradient) in degrees} on one batch.

    `loss_fn(output) -> scalar`, e.g. `lambda out: F.cross_entropy(out, y)`. Randomness (dropout)
    is replayed with the same RNG state for both passes; routing statistics are left untouched.
    """
    sal = require_sal(module)
    names = sorted({l.weight for l in sal.sal_plan.layers})
    with routing_counts_kept(sal):  # a measurement: leave the routing statistics as they were
        state = torch.random.get_rng_state()
        sal_grads = _grads(sal, loss_fn, inputs, names)
        torch.random.set_rng_state(state)
        bp_grads = _grads(backprop_reference(sal), loss_fn, inputs, names)
    return {n: angle_degrees(sal_grads[n], bp_grads[n]) if sal_grads[n] is not None
            and bp_grads[n] is not None else float("nan") for n in names}
