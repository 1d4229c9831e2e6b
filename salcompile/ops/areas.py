"""Area ops: a gated layer whose parameters are split into K mutually exclusive areas.

Each row of the input (a sample, or a token) is routed by an int64 tensor `area` to one area k,
and only area k's block of the parameters computes that row:

  partition  weight [N, ...]: the outputs are split into K contiguous blocks; a row routed to k
             computes block k only, its other outputs are exactly 0.
  replicate  weight [K, N, ...]: area k uses copy k, full-size output.
  dense      weight [N, ...]: full output; only with input_block.
  input_block  the input features (channels) are split into K blocks too; area k reads block k.
             A grouped conv (groups % K == 0) in partition mode implies it.

`feedback` None trains with backprop; a tensor shaped like the weight gives feedback alignment:
the input gradient uses the block of B that the area used where backprop uses the block of W
(with match_norm, rescaled per area by ‖W_blk‖/‖B_blk‖). Weight and bias gradients are
backprop's and only blocks used by an area that received a row can be nonzero.

`anchor` (the router gate's 0-dim zero) is never read; its gradient is zeros_like(anchor), which
makes autograd run the gate's backward.

Two implementations with the same signature, outputs and gradients:
  * area_linear_reference / area_conv_reference: the masked-dense oracle. Every area's block runs
    on all rows (ordinary torch ops, or the FA ops), is multiplied by the 0/1 mask of its rows, and
    the blocks are assembled. K× the compute; autograd does the backward.
  * torch.ops.salcompile.area_linear / area_conv: the fast path. Rows are sorted by area and each
    area's block runs on its compact rows only. Their backward is another opaque custom op
    (area_linear_backward / area_conv_backward), so torch.compile(fullgraph=True) never sees the
    data-dependent per-area shapes.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fast
from .fa import _TINY, _fresh, kp_grad

MODES = ("partition", "replicate", "dense")


class _Block(NamedTuple):
    """What area k uses: weight[w] (and feedback[w]), bias[b], input columns x_in, output
    columns out, and the conv's group count."""
    w: tuple
    b: tuple
    x_in: slice
    out: slice
    groups: int


def _bias_shape(weight: Tensor, mode: str):
    return weight.shape[:2] if mode == "replicate" else weight.shape[:1]


def check_mode(who: str, weight: Tensor, feedback: Optional[Tensor], mode: str,
               input_block: bool) -> None:
    """The checks every area op shares (area ops and the fused compact ops)."""
    if mode not in MODES:
        raise ValueError(f"{who}: mode must be one of {MODES}, got {mode!r}")
    if mode == "replicate" and input_block:
        raise ValueError(f"{who}: input_block is not allowed with mode='replicate'")
    if mode == "dense" and not input_block:
        raise ValueError(f"{who}: mode='dense' needs input_block=True")
    if feedback is not None and feedback.shape != weight.shape:
        raise ValueError(f"{who}: feedback shape {tuple(feedback.shape)} != weight shape "
                         f"{tuple(weight.shape)}")


def _split(n: int, k: int, what: str) -> int:
    if n % k:
        raise ValueError(f"area ops: {what} ({n}) is not divisible by areas={k}")
    return n // k


def _blocks(weight: Tensor, bias: Optional[Tensor], feedback: Optional[Tensor], in_features: int,
            areas: int, mode: str, input_block: bool, groups: int = 1
            ) -> Tuple[int, List[_Block]]:
    """Validate a configuration; return (output features, the K blocks)."""
    if areas < 1:
        raise ValueError(f"area ops: areas must be >= 1, got {areas}")
    check_mode("area ops", weight, feedback, mode, input_block)
    if groups > 1 and mode == "dense":
        raise ValueError("area ops: mode='dense' is not supported for grouped convolutions")
    if groups > 1 and mode == "partition" and groups % areas:
        raise ValueError(f"area ops: groups ({groups}) must be divisible by areas={areas}")
    full = slice(None)
    if mode == "replicate":
        if weight.dim() < 2 or weight.shape[0] != areas:
            raise ValueError(f"area ops: replicate weight must be [areas={areas}, ...], got "
                             f"{tuple(weight.shape)}")
        n_out = weight.shape[1]
        blocks = [_Block((k,), (k,), full, full, groups) for k in range(areas)]
    else:
        n_out = weight.shape[0]
        o = _split(n_out, areas, "output width") if mode == "partition" else n_out
        i = _split(in_features, areas, "input width") if input_block or groups > 1 else 0
        blocks = []
        for k in range(areas):
            out = slice(k * o, (k + 1) * o) if mode == "partition" else full
            if groups > 1:    # grouped partition: out block k reads only in-channel block k
                blocks.append(_Block((out,), (out,), slice(k * i, (k + 1) * i), out,
                                     groups // areas))
            else:
                x_in = slice(k * i, (k + 1) * i) if input_block else full
                blocks.append(_Block((out, x_in), (out,), x_in, out, 1))
    want_bias = _bias_shape(weight, mode)
    if bias is not None and bias.shape != want_bias:
        raise ValueError(f"area ops: bias shape {tuple(bias.shape)} != {tuple(want_bias)}")
    return n_out, blocks


def _row_areas(x: Tensor, area: Tensor, row_dims: int) -> Tensor:
    """The area of each row of x (a position in its first row_dims dims), flattened."""
    if area.dtype != torch.long:
        raise ValueError(f"area ops: area must be int64, got {area.dtype}")
    d = area.dim()
    if not 1 <= d <= row_dims or area.shape != x.shape[:d]:
        raise ValueError(f"area ops: area shape {tuple(area.shape)} must be a prefix of "
                         f"{tuple(x.shape[:row_dims])} (at least one dim)")
    return area.reshape(area.shape + (1,) * (row_dims - d)).expand(x.shape[:row_dims]).reshape(-1)


def _sort_rows(rows: Tensor, areas: int):
    """(stable order of rows by area, [(k, slice of area k's sorted rows)] for non-empty areas,
    flat: order * areas + area of each sorted row, the row of a [R * areas, block] view that holds
    sorted row j's block)."""
    order = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=areas).tolist()   # host sync: fine in an opaque op
    if len(counts) > areas or (rows.numel() and int(rows.min()) < 0):
        raise ValueError(f"area ops: area values must lie in [0, {areas})")
    spans, start = [], 0
    for k, c in enumerate(counts):
        if c:
            spans.append((k, slice(start, start + c)))
        start += c
    return order, spans, order * areas + rows.index_select(0, order)


def _gather(t: Tensor, order: Tensor, flat: Tensor, areas: int, blocked: bool) -> Tensor:
    """t's rows in sorted order: whole rows, or (blocked: t's features split into `areas` blocks)
    only each row's own area block, compact: [R, features / areas, ...]."""
    if not blocked:
        return t.index_select(0, order)
    rows = t.shape[0]
    return t.reshape(rows * areas, -1).index_select(0, flat).reshape(
        (rows, t.shape[1] // areas) + t.shape[2:])


def _scatter(ts: Tensor, order: Tensor, flat: Tensor, areas: int, blocked: bool) -> Tensor:
    """Inverse of _gather: original row order; blocked: full width, zero outside the blocks."""
    if not blocked:
        return torch.empty_like(ts).index_copy_(0, order, ts)
    rows = ts.shape[0]
    out = ts.new_zeros((rows, ts.shape[1] * areas) + ts.shape[2:])
    out.view(rows * areas, -1).index_copy_(0, flat, ts.reshape(rows, -1))
    return out


def _blocked(blocks: List[_Block]):
    """(input read by blocks of columns, output written by blocks of columns)."""
    return blocks[0].x_in != slice(None), blocks[0].out != slice(None)


def _scale(weight_blk: Tensor, feedback_blk: Tensor, match_norm: bool):
    """The per-area factor of fa.rescale."""
    if not match_norm:
        return 1.0
    return weight_blk.norm() / feedback_blk.norm().clamp_min(_TINY)


def _anchor_term(anchor: Tensor) -> Tensor:
    return anchor.sum() * 0   # gradient exactly zeros_like(anchor)


# ---------------------------------------------------------------- shared fast forward / backward
def _fast_forward(x2, rows, weight, bias, blocks, n_out, areas, layer):
    """x2: [R, Fin, ...] rows; layer(x, w, b, groups) is the dense layer on compact rows."""
    order, spans, flat = _sort_rows(rows, areas)
    in_blk, out_blk = _blocked(blocks)
    xs = _gather(x2, order, flat, areas, in_blk)
    ys = None
    for k, r in spans:
        blk = blocks[k]
        y = layer(xs[r] if in_blk else xs[r, blk.x_in], weight[blk.w],
                  None if bias is None else bias[blk.b], blk.groups)
        if ys is None:
            ys = y.new_empty((x2.shape[0],) + y.shape[1:])
        ys[r] = y
    if ys is None:   # no rows at all
        return None
    return _scatter(ys, order, flat, areas, out_blk)


def _fast_backward(grad2, x2, rows, weight, feedback, bias_shape, blocks, areas, match_norm,
                   need_x, need_w, need_b, layer_backward):
    """layer_backward(g, x, w_or_b, groups, need_x, need_w, need_b) -> (gx, gw, gb) on compact
    rows, with gx computed from the operand it is given (W for BP, B for FA). need_b implies a
    bias of bias_shape."""
    order, spans, flat = _sort_rows(rows, areas)
    in_blk, out_blk = _blocked(blocks)
    gs = _gather(grad2, order, flat, areas, out_blk)
    xs = _gather(x2, order, flat, areas, in_blk)
    gxs = torch.empty_like(xs) if need_x else None
    # Every weight block is written once; zeros only where some part is never written.
    full_cover = len(spans) == areas and not (in_blk and out_blk)
    # contiguous, as the fake kernel says, whatever the weight's layout (channels_last, a view)
    dense = torch.contiguous_format
    gw = (torch.empty_like(weight, memory_format=dense) if full_cover else
          torch.zeros_like(weight, memory_format=dense)) if need_w else None
    gb = weight.new_zeros(bias_shape) if need_b else None
    for k, r in spans:
        blk = blocks[k]
        w = weight[blk.w]
        b = w if feedback is None else feedback[blk.w]
        gx_k, gw_k, gb_k = layer_backward(gs[r].contiguous(), xs[r] if in_blk else xs[r, blk.x_in],
                                          b, blk.groups, need_x, need_w, need_b)
        if need_x:
            gx_k = gx_k if feedback is None else gx_k * _scale(w, b, match_norm)
            if in_blk:
                gxs[r] = gx_k
            else:
                gxs[r, blk.x_in] = gx_k
        if need_w:
            gw[blk.w] = gw_k     # the blocks of distinct areas never overlap
        if need_b:
            gb[blk.b] += gb_k    # += : in dense mode every area shares the whole bias
    # Outputs that are not needed: distinct empty tensors (custom op outputs may not alias).
    return (_scatter(gxs, order, flat, areas, in_blk) if need_x else x2.new_empty(0),
            gw if need_w else weight.new_empty(0),
            gb if need_b else weight.new_empty(0))


# ---------------------------------------------------------------- linear
def _linear_setup_rows(x, area, weight, bias, feedback, areas, mode, input_block):
    if x.dim() < 2:
        raise ValueError("area_linear: x must have at least one leading (row) dim")
    n_out, blocks = _blocks(weight, bias, feedback, x.shape[-1], areas, mode, input_block)
    return n_out, blocks, _row_areas(x, area, x.dim() - 1)


def area_linear_reference(x: Tensor, area: Tensor, anchor: Tensor, weight: Tensor,
                          bias: Optional[Tensor], feedback: Optional[Tensor], areas: int,
                          mode: str, input_block: bool, match_norm: bool) -> Tensor:
    n_out, blocks, rows = _linear_setup_rows(x, area, weight, bias, feedback, areas, mode,
                                             input_block)
    rows = rows.reshape(x.shape[:-1] + (1,))
    parts = []
    for k, blk in enumerate(blocks):
        w, b = weight[blk.w], None if bias is None else bias[blk.b]
        xk = x[..., blk.x_in]
        y = F.linear(xk, w, b) if feedback is None else \
            torch.ops.salcompile.fa_linear(xk, w, b, feedback[blk.w], match_norm)
        parts.append(y * (rows == k).to(y.dtype))
    out = torch.cat(parts, -1) if mode == "partition" else sum(parts)
    return out + _anchor_term(anchor)


@torch.library.custom_op("salcompile::area_linear", mutates_args=())
def area_linear(x: Tensor, area: Tensor, anchor: Tensor, weight: Tensor, bias: Optional[Tensor],
                feedback: Optional[Tensor], areas: int, mode: str, input_block: bool,
                match_norm: bool) -> Tensor:
    n_out, blocks, rows = _linear_setup_rows(x, area, weight, bias, feedback, areas, mode,
                                             input_block)
    x2 = x.reshape(-1, x.shape[-1])
    y = _fast_forward(x2, rows, weight, bias, blocks, n_out, areas,
                      lambda xk, w, b, g: F.linear(xk, w, b))
    if y is None:
        y = x.new_zeros(0, n_out)
    return _fresh(y.reshape(x.shape[:-1] + (n_out,)))


@area_linear.register_fake
def _(x, area, anchor, weight, bias, feedback, areas, mode, input_block, match_norm):
    n_out, _, _ = _linear_setup_rows(x, area, weight, bias, feedback, areas, mode, input_block)
    return x.new_empty(x.shape[:-1] + (n_out,))


def _linear_layer_backward(g, x, w, groups, need_x, need_w, need_b):
    return (g.matmul(w) if need_x else None, g.t().matmul(x) if need_w else None,
            g.sum(0) if need_b else None)


@torch.library.custom_op("salcompile::area_linear_backward", mutates_args=())
def area_linear_backward(grad: Tensor, x: Tensor, area: Tensor, weight: Tensor,
                         feedback: Optional[Tensor], has_bias: bool, areas: int, mode: str,
                         input_block: bool, match_norm: bool, need_x: bool, need_w: bool,
                         need_b: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); an output that is not needed comes back as an empty tensor."""
    n_out, blocks, rows = _linear_setup_rows(x, area, weight, None, feedback, areas, mode,
                                             input_block)
    gx, gw, gb = _fast_backward(grad.reshape(-1, n_out), x.reshape(-1, x.shape[-1]), rows,
                                weight, feedback, _bias_shape(weight, mode), blocks, areas,
                                match_norm, need_x, need_w, need_b and has_bias,
                                _linear_layer_backward)
    return (gx.reshape(x.shape) if need_x else gx), gw, gb


def _backward_fake(x, weight, mode, has_bias, need_x, need_w, need_b):
    return (x.new_empty(x.shape if need_x else (0,)),
            weight.new_empty(weight.shape if need_w else (0,)),
            weight.new_empty(_bias_shape(weight, mode) if need_b and has_bias else (0,)))


@area_linear_backward.register_fake
def _(grad, x, area, weight, feedback, has_bias, areas, mode, input_block, match_norm, need_x,
      need_w, need_b):
    return _backward_fake(x, weight, mode, has_bias, need_x, need_w, need_b)


def _linear_setup(ctx, inputs, output):
    x, area, anchor, weight, bias, feedback, areas, mode, input_block, match_norm = inputs
    ctx.save_for_backward(x, area, anchor, weight, feedback)
    ctx.has_bias = bias is not None
    ctx.params = (areas, mode, input_block, match_norm)


def _needs(ctx):
    """(dx, dW, db, d feedback) needed; a trainable feedback (Kolen-Pollack) gets dW's copy."""
    need_x, _, _, need_w, need_b, need_fb = ctx.needs_input_grad[:6]
    return need_x, need_w, need_b and ctx.has_bias, need_fb


def _linear_backward(ctx, grad):
    x, area, anchor, weight, feedback = ctx.saved_tensors
    need_x, need_w, need_b, need_fb = _needs(ctx)
    gx = gw = gb = None
    if need_x or need_w or need_b or need_fb:
        gx, gw, gb = fast.call(
            ctx, torch.ops.salcompile.area_linear_backward, grad, x, area, weight, feedback, ctx.has_bias, *ctx.params, need_x, need_w or need_fb,
            need_b)
    return (gx if need_x else None, None, torch.zeros_like(anchor), gw if need_w else None,
            gb if need_b else None, kp_grad(need_fb, gw), None, None, None, None)


area_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---------------------------------------------------------------- convolution (batched, 1d/2d/3d)
def _conv_setup_rows(x, area, weight, bias, feedback, stride, areas, mode, input_block, groups):
    if x.dim() != len(stride) + 2 or x.dim() not in (3, 4, 5):
        raise ValueError(f"area_conv: x must be batched [N, C, *spatial] (1-3 spatial dims), "
                         f"got {tuple(x.shape)}")
    if area.dim() != 1:
        raise ValueError(f"area_conv: area must be [N], got {tuple(area.shape)}")
    n_out, blocks = _blocks(weight, bias, feedback, x.shape[1], areas, mode, input_block, groups)
    return n_out, blocks, _row_areas(x, area, 1)


def _conv_out_shape(x: Tensor, weight: Tensor, n_out: int, stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int]):
    kernel = weight.shape[-len(stride):]
    spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
               zip(x.shape[2:], kernel, stride, padding, dilation)]
    return (x.shape[0], n_out, *spatial)


def _conv(x, w, b, stride, padding, dilation, groups):
    return torch.ops.aten.convolution(x, w, b, stride, padding, dilation, False,
                                      [0] * len(stride), groups)


def area_conv_reference(x: Tensor, area: Tensor, anchor: Tensor, weight: Tensor,
                        bias: Optional[Tensor], feedback: Optional[Tensor], stride: List[int],
                        padding: List[int], dilation: List[int], groups: int, areas: int,
                        mode: str, input_block: bool, match_norm: bool) -> Tensor:
    n_out, blocks, rows = _conv_setup_rows(x, area, weight, bias, feedback, stride, areas, mode,
                                           input_block, groups)
    rows = rows.reshape((-1,) + (1,) * (x.dim() - 1))
    parts = []
    for k, blk in enumerate(blocks):
        w, b = weight[blk.w], None if bias is None else bias[blk.b]
        xk = x[:, blk.x_in]
        y = _conv(xk, w, b, stride, padding, dilation, blk.groups) if feedback is None else \
            torch.ops.salcompile.fa_conv(xk, w, b, feedback[blk.w], stride, padding, dilation,
                                         False, [0] * len(stride), blk.groups, match_norm)
        parts.append(y * (rows == k).to(y.dtype))
    out = torch.cat(parts, 1) if mode == "partition" else sum(parts)
    return out + _anchor_term(anchor)


@torch.library.custom_op("salcompile::area_conv", mutates_args=())
def area_conv(x: Tensor, area: Tensor, anchor: Tensor, weight: Tensor, bias: Optional[Tensor],
              feedback: Optional[Tensor], stride: List[int], padding: List[int],
              dilation: List[int], groups: int, areas: int, mode: str, input_block: bool,
              match_norm: bool) -> Tensor:
    n_out, blocks, rows = _conv_setup_rows(x, area, weight, bias, feedback, stride, areas, mode,
                                           input_block, groups)
    y = _fast_forward(x, rows, weight, bias, blocks, n_out, areas,
                      lambda xk, w, b, g: _conv(xk, w, b, stride, padding, dilation, g))
    if y is None:
        y = x.new_zeros(_conv_out_shape(x, weight, n_out, stride, padding, dilation))
    return y


@area_conv.register_fake
def _(x, area, anchor, weight, bias, feedback, stride, padding, dilation, groups, areas, mode,
      input_block, match_norm):
    n_out, _, _ = _conv_setup_rows(x, area, weight, bias, feedback, stride, areas, mode,
                                   input_block, groups)
    return x.new_empty(_conv_out_shape(x, weight, n_out, stride, padding, dilation))


@torch.library.custom_op("salcompile::area_conv_backward", mutates_args=())
def area_conv_backward(grad: Tensor, x: Tensor, area: Tensor, weight: Tensor,
                       feedback: Optional[Tensor], stride: List[int], padding: List[int],
                       dilation: List[int], groups: int, has_bias: bool, areas: int, mode: str,
                       input_block: bool, match_norm: bool, need_x: bool, need_w: bool,
                       need_b: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); an output that is not needed comes back as an empty tensor."""
    _, blocks, rows = _conv_setup_rows(x, area, weight, None, feedback, stride, areas, mode,
                                       input_block, groups)

    def layer_backward(g, xk, w, grp, nx, nw, nb):
        # grad_weight depends only on the weight operand's shape: one call gives FA's dX and dW.
        return torch.ops.aten.convolution_backward(
            g, xk, w, [g.shape[1]], stride, padding, dilation, False, [0] * len(stride), grp,
            [nx, nw, nb])

    return _fast_backward(grad, x, rows, weight, feedback, _bias_shape(weight, mode), blocks,
                          areas, match_norm, need_x, need_w, need_b and has_bias, layer_backward)


@area_conv_backward.register_fake
def _(grad, x, area, weight, feedback, stride, padding, dilation, groups, has_bias, areas, mode,
      input_block, match_norm, need_x, need_w, need_b):
    return _backward_fake(x, weight, mode, has_bias, need_x, need_w, need_b)


def _conv_setup(ctx, inputs, output):
    x, area, anchor, weight, bias, feedback, stride, padding, dilation, groups, areas, mode, \
        input_block, match_norm = inputs
    ctx.save_for_backward(x, area, anchor, weight, feedback)
    ctx.has_bias = bias is not None
    ctx.params = (stride, padding, dilation, groups, ctx.has_bias, areas, mode, input_block,
                  match_norm)


def _conv_backward(ctx, grad):
    x, area, anchor, weight, feedback = ctx.saved_tensors
    need_x, need_w, need_b, need_fb = _needs(ctx)
    gx = gw = gb = None
    if need_x or need_w or need_b or need_fb:
        gx, gw, gb = fast.call(
            ctx, torch.ops.salcompile.area_conv_backward, grad.contiguous(), x, area, weight, feedback, *ctx.params, need_x, need_w or need_fb,
            need_b)
    return (gx if need_x else None, None, torch.zeros_like(anchor), gw if need_w else None,
            gb if need_b else None, kp_grad(need_fb, gw)) + (None,) * 8


area_conv.register_autograd(_conv_backward, setup_context=_conv_setup)
