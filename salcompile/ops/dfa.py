"""Direct feedback alignment in graph form.

`dfa_output(y, taps, feedback)` returns a copy of the network output `y`. Its backward passes the
output error e = ∂loss/∂y through unchanged and gives every tapped activation h_l the gradient
e·D_l (D_l fixed, `n_out × width_l`). The transform makes every consumer of h_l read h_l.detach(),
so e·D_l is the only error h_l ever receives. No hooks, no second loss evaluation.

Shapes: e is (*lead, n_out); a tap is (*lead, *rest) and D_l is (n_out, prod(rest)), so per-token
errors (language models) and per-sample errors (classifiers over sequences or feature maps) both fit.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor


@torch.library.custom_op("salcompile::dfa_output", mutates_args=())
def dfa_output(output: Tensor, taps: List[Tensor], feedback: List[Tensor]) -> Tensor:
    return output.clone()


@dfa_output.register_fake
def _(output, taps, feedback):
    return torch.empty_like(output)


def _setup(ctx, inputs, output):
    out, taps, feedback = inputs
    ctx.save_for_backward(*feedback)
    ctx.tap_shapes = [t.shape for t in taps]


def direct_error(err: Tensor, d: Tensor, tap_shape) -> Tensor:
    """e·D reshaped to the tap's shape."""
    e2 = err.reshape(-1, err.shape[-1])
    return e2.matmul(d.to(err.dtype)).reshape(tap_shape)


def _backward(ctx, grad):
    feedback = ctx.saved_tensors
    tap_grads = [direct_error(grad, d, shape) for d, shape in zip(feedback, ctx.tap_shapes)]
    return grad, tap_grads, [None] * len(feedback)


dfa_output.register_autograd(_backward, setup_context=_setup)
