"""Feedback-alignment layer ops: the forward is the ordinary layer, the input gradient uses B.

Every op takes the weight operand `weight` and a feedback tensor `feedback` of the same shape.
The weight gradient never reads the weight's values (the ops are bilinear), so dW and db are
exactly backprop's; only dX changes: it is computed with B where backprop would use W.
With `match_norm`, B is rescaled to ||W|| at every step (SALConfig.feedback_scale="match").
A `feedback` that requires grad (Kolen-Pollack's trainable B) receives the layer's dW as its
gradient; a fixed B (a buffer, or a detached derived operand) receives nothing.
"""
from __future__ import annotations

import weakref
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..families import conv as plain_conv

_TINY = 1e-12


def _fresh(t: Tensor) -> Tensor:
    """A custom op's output must not be a view (of the op's own temporary): an in-place op after
    it, such as nn.ReLU(inplace=True), would fail in autograd. detach() drops the view link only."""
    return t.detach() if t._is_view() else t


def kp_grad(needs: bool, grad_weight: Optional[Tensor]) -> Optional[Tensor]:
    """The gradient a trainable feedback tensor receives: the layer's own dW (Kolen-Pollack), as a
    copy, so that B.grad and W.grad never alias (an in-place clip of one would scale both)."""
    return grad_weight.clone() if needs and grad_weight is not None else None


# id(tensor) -> (weakref to it, its version, a cache key, the value): norms of fixed feedback
# tensors (FA's B is a buffer: the same between steps). An in-place change (copy_,
# load_state_dict, an optimizer step on a trainable B) bumps the version and recomputes.
_FIXED: dict = {}


def fixed_value(t: Tensor, key, compute):
    """compute() for a function of t alone that stays valid while t is unchanged in place; cached
    for plain tensors that do not require grad (anything else: computed every time)."""
    C = torch._C
    if t.requires_grad or (type(t) is not Tensor and type(t) is not torch.nn.Parameter) or \
            t.is_inference() or C._len_torch_dispatch_stack() or \
            C._get_tracing_state() is not None or C._functorch.peek_interpreter_stack() is not None:
        return compute()   # traced (the value must stay a computation), or no version counter
    full = (id(t), key)
    hit = _FIXED.get(full)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    value = compute()
    if len(_FIXED) > 512:
        _FIXED.clear()
    _FIXED[full] = (weakref.ref(t), t._version, value)
    return value


def rescale(grad_input: Tensor, feedback: Tensor, weight: Tensor, match_norm: bool) -> Tensor:
    """With match_norm, the input gradient computed with B becomes the one computed with
    B·‖W‖/‖B‖. The ops are linear in B, so the scalar is applied to the (smaller) gradient
    instead of to a rescaled copy of B. ‖B‖ of a fixed B is computed once per version."""
    if not match_norm:
        return grad_input
    b_norm = fixed_value(feedback, "norm", lambda: feedback.norm().clamp_min(_TINY))
    return grad_input * (weight.norm() / b_norm)


# ---------------------------------------------------------------- linear: y = x Wᵀ + b
@torch.library.custom_op("salcompile::fa_linear", mutates_args=())
def fa_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], feedback: Tensor,
              match_norm: bool) -> Tensor:
    return _fresh(F.linear(x, weight, bias))   # F.linear of a 1-D or N-D x is a view


@fa_linear.register_fake
def _(x, weight, bias, feedback, match_norm):
    return _fresh(F.linear(x, weight, bias))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, feedback, match_norm = inputs
    ctx.save_for_backward(x, weight, feedback)
    ctx.has_bias = bias is not None
    ctx.match_norm = match_norm


def _linear_backward(ctx, grad):
    x, weight, feedback = ctx.saved_tensors
    need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
    gx = gw = gb = None
    if need_x:
        gx = rescale(grad.matmul(feedback), feedback, weight, ctx.match_norm)
    if need_w or need_b or need_fb:
        g2 = grad.reshape(-1, grad.shape[-1])
        if need_w or need_fb:
            gw = g2.t().matmul(x.reshape(-1, x.shape[-1]))
        if need_b and ctx.has_bias:
            gb = g2.sum(0)
    return gx, gw if need_w else None, gb, kp_grad(need_fb, gw), None


fa_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


def _input_needs_no_grad(x: Tensor, feedback: Tensor) -> bool:
    """FA changes only dX; without one (and with a fixed B) the layer's gradients are BP's."""
    return not x.requires_grad and not feedback.requires_grad and x.dim() >= 2


def _linear_native(x, weight, bias, feedback, match_norm):
    """The eager fast path's native form (fast.py): a first layer is its plain linear."""
    return F.linear(x, weight, bias) if _input_needs_no_grad(x, feedback) else None


fa_linear.sal_fast_native = _linear_native


# ---------------------------------------------------------------- convolution (any dim, transposed, groups)
def _conv(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, transposed,
                                      output_padding, groups)


def _is_unbatched(x: Tensor, stride: List[int]) -> bool:
    return x.dim() == len(stride) + 1


def _conv_forward(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    # the plain convolution (families.conv: an unbatched input too); squeeze(0) there is a view
    return _fresh(plain_conv(x, weight, bias, stride, padding, dilation, transposed,
                             output_padding, groups))


@torch.library.custom_op("salcompile::fa_conv", mutates_args=())
def fa_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], feedback: Tensor, stride: List[int],
            padding: List[int], dilation: List[int], transposed: bool, output_padding: List[int],
            groups: int, match_norm: bool) -> Tensor:
    return _conv_forward(x, weight, bias, stride, padding, dilation, transposed, output_padding,
                         groups)


@fa_conv.register_fake
def _(x, weight, bias, feedback, stride, padding, dilation, transposed, output_padding, groups,
      match_norm):
    return _conv_forward(x, weight, bias, stride, padding, dilation, transposed, output_padding,
                         groups)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, feedback, stride, padding, dilation, transposed, output_padding, groups, \
        match_norm = inputs
    ctx.save_for_backward(x, weight, feedback)
    ctx.has_bias = bias is not None
    ctx.params = (stride, padding, dilation, transposed, output_padding, groups)
    ctx.match_norm = match_norm


def _conv_backward(ctx, grad):
    x, weight, feedback = ctx.saved_tensors
    stride, padding, dilation, transposed, output_padding, groups = ctx.params
    need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
    unbatched = _is_unbatched(x, stride)
    if unbatched:
        x, grad = x.unsqueeze(0), grad.unsqueeze(0)
    out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
    # grad_weight depends on the weight's shape only, so one call with B gives FA's dX and BP's dW.
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad.contiguous(), x, feedback, [out_channels],
        stride, padding, dilation, transposed, output_padding, groups,
        [need_x, need_w or need_fb, need_b and ctx.has_bias])
    if gx is not None:
        gx = rescale(gx.squeeze(0) if unbatched else gx, feedback, weight, ctx.match_norm)
    return (gx, gw if need_w else None, gb if ctx.has_bias else None, kp_grad(need_fb, gw),
            None, None, None, None, None, None, None)


fa_conv.register_autograd(_conv_backward, setup_context=_conv_setup)


def _conv_native(x, weight, bias, feedback, stride, padding, dilation, transposed,
                 output_padding, groups, match_norm):
    """The eager fast path's native form (fast.py): a first layer is its plain convolution."""
    if not _input_needs_no_grad(x, feedback):
        return None
    return plain_conv(x, weight, bias, stride, padding, dilation, transposed, output_padding,
                      groups)


fa_conv.sal_fast_native = _conv_native


# ---------------------------------------------------------------- matmul / mm / bmm / @ with a weight operand
@torch.library.custom_op("salcompile::fa_matmul", mutates_args=())
def fa_matmul(x: Tensor, weight: Tensor, feedback: Tensor, weight_first: bool,
              match_norm: bool) -> Tensor:
    return _fresh(torch.matmul(weight, x) if weight_first else torch.matmul(x, weight))


@fa_matmul.register_fake
def _(x, weight, feedback, weight_first, match_norm):
    return _fresh(torch.matmul(weight, x) if weight_first else torch.matmul(x, weight))


def _matmul_setup(ctx, inputs, output):
    x, weight, feedback, weight_first, match_norm = inputs
    ctx.save_for_backward(x, weight, feedback)
    ctx.weight_first = weight_first
    ctx.match_norm = match_norm


def _matmul_backward(ctx, grad):
    x, weight, feedback = ctx.saved_tensors
    need_x, need_w, need_fb = ctx.needs_input_grad[:3]
    need_gw = need_w or need_fb
    # Give a 1-D activation its matrix form (torch.matmul's own promotion rule).
    x2, g2 = x, grad
    if x.dim() == 1:
        x2 = x.unsqueeze(-1) if ctx.weight_first else x.unsqueeze(0)
        g2 = grad.unsqueeze(-1) if ctx.weight_first else grad.unsqueeze(-2)
    gx = gw = None
    if ctx.weight_first:  # y = W x
        if need_x:
            gx = feedback.mT.matmul(g2).sum_to_size(x2.shape).reshape(x.shape)
        if need_gw:
            gw = g2.matmul(x2.mT).sum_to_size(weight.shape)
    else:  # y = x W
        if need_x:
            gx = g2.matmul(feedback.mT).sum_to_size(x2.shape).reshape(x.shape)
        if need_gw:
            if weight.dim() == 2:
                gw = x2.reshape(-1, x2.shape[-1]).t().matmul(g2.reshape(-1, g2.shape[-1]))
            else:
                gw = x2.mT.matmul(g2).sum_to_size(weight.shape)
    if gx is not None:
        gx = rescale(gx, feedback, weight, ctx.match_norm)
    return gx, gw if need_w else None, kp_grad(need_fb, gw), None, None


fa_matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup)


# ---------------------------------------------------------------- einsum with one weight operand
def parse_einsum(equation: str):
    """'ab,bc->ac' -> ('ab', 'bc', 'ac'), or None when the equation is outside what FA supports
    (implicit output, ellipsis, repeated indices within one term, more than two operands)."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    for t in (*terms, out):
        if len(set(t)) != len(t):
            return None
    return terms[0], terms[1], out


def _einsum_vjp(out_term: str, grad: Tensor, other_term: str, other: Tensor, target_term: str,
                target_shape) -> Tensor:
    """d<grad, einsum(target, other)>/d target: an einsum, plus a broadcast for indices that only
    the target carries (they were summed away in the forward)."""
    kept = "".join(c for c in target_term if c in out_term or c in other_term)
    g = torch.einsum(f"{out_term},{other_term}->{kept}", grad, other)
    if kept != target_term:
        for i, c in enumerate(target_term):
            if c not in kept:
                g = g.unsqueeze(i)
        g = g.expand(target_shape)
    return g


@torch.library.custom_op("salcompile::fa_einsum", mutates_args=())
def fa_einsum(equation: str, x: Tensor, weight: Tensor, feedback: Tensor, weight_first: bool,
              match_norm: bool) -> Tensor:
    ops = (weight, x) if weight_first else (x, weight)
    return _fresh(torch.einsum(equation, *ops))   # einsum's result is often a permuted view


@fa_einsum.register_fake
def _(equation, x, weight, feedback, weight_first, match_norm):
    ops = (weight, x) if weight_first else (x, weight)
    return _fresh(torch.einsum(equation, *ops))


def _einsum_setup(ctx, inputs, output):
    equation, x, weight, feedback, weight_first, match_norm = inputs
    ctx.save_for_backward(x, weight, feedback)
    ctx.equation, ctx.weight_first, ctx.match_norm = equation, weight_first, match_norm


def _einsum_backward(ctx, grad):
    x, weight, feedback = ctx.saved_tensors
    need_x, need_w, need_fb = ctx.needs_input_grad[1:4]
    t0, t1, out = parse_einsum(ctx.equation)
    xt, wt = (t1, t0) if ctx.weight_first else (t0, t1)
    gx = _einsum_vjp(out, grad, wt, feedback, xt, x.shape) if need_x else None
    if gx is not None:
        gx = rescale(gx, feedback, weight, ctx.match_norm)
    gw = _einsum_vjp(out, grad, xt, x, wt, weight.shape) if need_w or need_fb else None
    return None, gx, gw if need_w else None, kp_grad(need_fb, gw), None, None


fa_einsum.register_autograd(_einsum_backward, setup_context=_einsum_setup)


# ---------------------------------------------------------------- grouped matmul (MoE experts)
def _grouped(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """x [rows, in] sorted by expert, weight [E, in, out], offs [E] cumulative row ends: rows
    offs[e-1]:offs[e] go through weight[e]; rows past offs[-1] give 0 (as torch's grouped_mm)."""
    out = x.new_zeros(x.shape[0], weight.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end].matmul(weight[e])
        start = end
    return out


@torch.library.custom_op("salcompile::fa_grouped_mm", mutates_args=())
def fa_grouped_mm(x: Tensor, weight: Tensor, offs: Tensor, feedback: Tensor,
                  match_norm: bool) -> Tensor:
    return _grouped(x, weight, offs)


@fa_grouped_mm.register_fake
def _(x, weight, offs, feedback, match_norm):
    return x.new_empty(x.shape[0], weight.shape[-1])


def _grouped_setup(ctx, inputs, output):
    x, weight, offs, feedback, match_norm = inputs
    ctx.save_for_backward(x, weight, offs, feedback)
    ctx.match_norm = match_norm


# The backward reads the offsets on the host (a per-expert loop), so it is an op of its own:
# opaque to torch.compile / AOT tracing, which would otherwise meet data-dependent shapes.
@torch.library.custom_op("salcompile::fa_grouped_mm_backward", mutates_args=())
def fa_grouped_mm_backward(grad: Tensor, x: Tensor, weight: Tensor, offs: Tensor,
                           feedback: Tensor, match_norm: bool) -> List[Tensor]:
    gx = rescale(_grouped(grad, feedback.mT, offs), feedback, weight, match_norm)  # dY·B[e]ᵀ
    # dW[e] = X[e]ᵀ·dY[e], exactly backprop's; contiguous, as the fake says
    gw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            gw[e] = x[start:end].t().matmul(grad[start:end])
        start = end
    return [gx, gw]


@fa_grouped_mm_backward.register_fake
def _(grad, x, weight, offs, feedback, match_norm):
    return [x.new_empty(x.shape), weight.new_empty(weight.shape)]   # both contiguous


def _grouped_backward(ctx, grad):
    x, weight, offs, feedback = ctx.saved_tensors
    gx, gw = torch.ops.salcompile.fa_grouped_mm_backward(grad.contiguous(), x, weight, offs,
                                                         feedback, ctx.match_norm)
    need_w, _, need_fb = ctx.needs_input_grad[1:4]
    return gx, gw if need_w else None, None, kp_grad(need_fb, gw), None


fa_grouped_mm.register_autograd(_grouped_backward, setup_context=_grouped_setup)
