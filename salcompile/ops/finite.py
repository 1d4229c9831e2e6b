"""`check_finite(x, layer)`: the guard `SALConfig(check_finite=True)` puts after every layer.

Forward: a copy of `x` (a custom op's output may not alias its input), or a SalcompileError naming
the layer when `x` holds NaN or inf. Backward: the incoming gradient passes through with its values
unchanged, after the same check ("the gradient reaching layer ..."), done by the op
`check_finite_grad`. Reading the values is a host sync: an opt-in debugging aid, not for speed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from salcompile.errors import NonFiniteGradient, SalcompileError

_ADVICE = ("lower the learning rate, check the input data and the loss, or use "
           "feedback_scale='match' (keeps each feedback matrix at the scale of its weight)")


def _check(x: Tensor, layer: str, where: str) -> None:
    if not x.is_floating_point() and not x.is_complex():
        return
    if bool(torch.isfinite(x).all()):
        return
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    error = SalcompileError if where == "forward" else NonFiniteGradient
    if layer.startswith("input "):
        subject = f"model {layer}" if where == "forward" else f"gradient of the model {layer}"
        raise error(
            f"non-finite value in the {subject} ({where}): {nan} NaN, {inf} inf of {x.numel()} "
            f"values; " + ("clean the input data (torch.nan_to_num, or drop the bad rows)"
                           if where == "forward" else _ADVICE) + ".")
    subject = (f"the output of layer {layer}" if where == "forward"
               else f"the gradient reaching layer {layer}")
    raise error(
        f"non-finite value in {subject} ({where}): {nan} NaN, {inf} inf of {x.numel()} values; "
        f"{_ADVICE}.")


@torch.library.custom_op("salcompile::check_finite", mutates_args=())
def check_finite(x: Tensor, layer: str) -> Tensor:
    _check(x, layer, "forward")
    return x.clone()


@check_finite.register_fake
def _(x, layer):
    return torch.empty_like(x)


@torch.library.custom_op("salcompile::check_finite_grad", mutates_args=())
def check_finite_grad(grad: Tensor, layer: str) -> Tensor:
    """check_finite's backward, an op of its own: AOTAutograd traces backward formulas, and a
    value check traced there would be a data-dependent branch; an opaque op runs it at run time."""
    _check(grad, layer, "backward")
    return grad.clone()


@check_finite_grad.register_fake
def _(grad, layer):
    return torch.empty_like(grad)


def _setup(ctx, inputs, output):
    ctx.layer = inputs[1]


def _backward(ctx, grad):
    return torch.ops.salcompile.check_finite_grad(grad, ctx.layer), None


check_finite.register_autograd(_backward, setup_context=_setup)


def check_finite_input(x, name: str):
    """The guard for a model input whose type the graph does not record (symbolic_trace capture):
    floating-point tensors go through check_finite, anything else is returned as it is."""
    if isinstance(x, Tensor) and x.is_floating_point():
        return torch.ops.salcompile.check_finite(x, name)
    return x
