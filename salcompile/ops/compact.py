"""Compact (area-sorted) ops: the fused form of a region's area layers (DESIGN §2.5).

passes/fuse_regions.py rewrites a region's chain of fast area_linear ops into these. The rows
(samples or tokens) are sorted by area once, at region entry; every value inside the region is
then held *compact*, in sorted row order:

  BLOCK  partition layouts: [..., width/K], row t holds only its own area's block of the
         full-width area-sparse activation (the other K-1 blocks are exactly 0 and not stored);
  FULL   [..., width], whole rows in sorted order (the input of the region's first layer, the
         outputs of replicate layers and of the exit layer that reads a block and writes a
         dense output).

Ops (the leading dims of x are kept; rows are the flattened leading dims):
  region_sort(area, K) -> (order, sorted_area, offs)   stable argsort, the sorted rows' areas and
         int32 cumulative counts, all on device (scatter_add_ + cumsum): no host sync.
  sort_rows / unsort_rows          FULL <-> original order (a permutation; adjoint of each other).
  gather_blocks / scatter_blocks   full-width area-sparse original order <-> BLOCK compact.
  expand_rows / sum_rows, expand_blocks / sum_blocks   top-k routing (areas [..., k]): the sort
         is of the R*k (row, choice) entries; expand_* give each entry its row (or its area's block
         of it), [..., k, F]; sum_* are their adjoints (a row's k entries summed / put in place).
  compact_linear(x, sorted_area, anchor, weight, bias, feedback, offs, K, mode, input_block,
         match_norm): one grouped matmul over the sorted rows (torch.nn.functional.grouped_mm
         where the dtype/device allow, else a per-area loop), the same modes, feedback and
         gradients as areas.area_linear; its backward is compact_linear_backward, another opaque
         op. Arguments 0-5 and the last one line up with area_linear's (strip_feedback edits
         args[5] and args[-1] of both alike).

Every shape is static (T x width/K), so the fake implementations need no data-dependent sizes and
torch.compile(fullgraph=True) sees no break.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .areas import _bias_shape, check_mode
from . import fast
from .fa import _TINY, _fresh, fixed_value, kp_grad
from .gate import area_counts

# Tests set this to exercise the per-area loop on dtypes grouped_mm would take.
FORCE_LOOP = False


# ---------------------------------------------------------------- routing
@torch.library.custom_op("salcompile::region_sort", mutates_args=())
def region_sort(area: Tensor, areas: int) -> Tuple[Tensor, Tensor, Tensor]:
    """area [...] int64 → (order [R] int64: stable sort of the flattened rows by area,
    sorted_area [R] int64: area of each sorted row, offs [K] int32: cumulative row counts)."""
    rows = area if area.dim() == 1 else area.reshape(-1)
    sorted_area, order = torch.sort(rows, stable=True)
    return order, sorted_area, area_counts(rows, areas).cumsum(0, dtype=torch.int32)


@region_sort.register_fake
def _(area, areas):
    n = area.numel()
    return area.new_empty(n), area.new_empty(n), area.new_empty(areas, dtype=torch.int32)


# ---------------------------------------------------------------- layout changes
def _rows(t: Tensor) -> Tensor:
    """t as [rows, features]: t itself when it is 2-D already (a reshape would make a view, an
    op more; every caller only reads it)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _shaped(t: Tensor, shape) -> Tensor:
    """t.reshape(shape), t itself when it has that shape already."""
    return t if t.shape == shape else t.reshape(shape)


def _permute(x: Tensor, order: Tensor) -> Tensor:
    return _fresh(_shaped(_rows(x).index_select(0, order), x.shape))


def _unpermute(xs: Tensor, order: Tensor) -> Tensor:
    r = _rows(xs)
    # contiguous whatever xs's layout, as the fake kernel says
    out = torch.empty_like(r, memory_format=torch.contiguous_format).index_copy_(0, order, r)
    return _fresh(_shaped(out, xs.shape))


@torch.library.custom_op("salcompile::sort_rows", mutates_args=())
def sort_rows(x: Tensor, order: Tensor) -> Tensor:
    """x [..., F] in original row order → the same rows in sorted order (same shape)."""
    return _permute(x, order)


@sort_rows.register_fake
def _(x, order):
    return x.new_empty(x.shape)   # contiguous, like the real output (not x's strides)


@torch.library.custom_op("salcompile::unsort_rows", mutates_args=())
def unsort_rows(xs: Tensor, order: Tensor) -> Tensor:
    """Inverse of sort_rows."""
    return _unpermute(xs, order)


@unsort_rows.register_fake
def _(xs, order):
    return xs.new_empty(xs.shape)


def _save_order(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


sort_rows.register_autograd(
    lambda ctx, g: (fast.call(ctx, unsort_rows, g.contiguous(), ctx.saved_tensors[0]), None),
    setup_context=_save_order)
unsort_rows.register_autograd(
    lambda ctx, g: (fast.call(ctx, sort_rows, g.contiguous(), ctx.saved_tensors[0]), None),
    setup_context=_save_order)


def _flat_index(order: Tensor, sorted_area: Tensor, areas: int) -> Tensor:
    """Row of a [R * K, width / K] view holding sorted row j's own block."""
    return order * areas + sorted_area


@torch.library.custom_op("salcompile::gather_blocks", mutates_args=())
def gather_blocks(y: Tensor, order: Tensor, sorted_area: Tensor, areas: int) -> Tensor:
    """y [..., W] (original order, area-sparse) → [..., W/K]: each row's own block, sorted."""
    w = y.shape[-1] // areas
    flat = _flat_index(order, sorted_area, areas)
    return _fresh(y.reshape(-1, w).index_select(0, flat).reshape(y.shape[:-1] + (w,)))


@gather_blocks.register_fake
def _(y, order, sorted_area, areas):
    return y.new_empty(y.shape[:-1] + (y.shape[-1] // areas,))


@torch.library.custom_op("salcompile::scatter_blocks", mutates_args=())
def scatter_blocks(ys: Tensor, order: Tensor, sorted_area: Tensor, areas: int) -> Tensor:
    """Inverse of gather_blocks: [..., W/K] compact → [..., W] original order, zero outside
    each row's block."""
    w = ys.shape[-1]
    rows = _rows(ys)
    out = ys.new_zeros(rows.shape[0] * areas, w)
    out.index_copy_(0, _flat_index(order, sorted_area, areas), rows)
    return _fresh(out.reshape(ys.shape[:-1] + (w * areas,)))


@scatter_blocks.register_fake
def _(ys, order, sorted_area, areas):
    return ys.new_empty(ys.shape[:-1] + (ys.shape[-1] * areas,))


def _save_blocks(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.areas = inputs[3]


gather_blocks.register_autograd(
    lambda ctx, g: (fast.call(ctx, scatter_blocks, g.contiguous(), *ctx.saved_tensors,
                              ctx.areas), None, None, None),
    setup_context=_save_blocks)
scatter_blocks.register_autograd(
    lambda ctx, g: (fast.call(ctx, gather_blocks, g.contiguous(), *ctx.saved_tensors,
                              ctx.areas), None, None, None),
    setup_context=_save_blocks)


# ---------------------------------------------------------------- top-k: (row, choice) entries
# Under top-k routing (region_gate_topk: areas [..., k], each row's k distinct best) region_sort
# sorts the R*k (row, choice) entries of the flattened areas (entry e is row e // k, choice
# e % k). A compact value then holds one row per entry, [..., k, F] in sorted entry order: a row's
# k entries are its k area ops (make_area_ops' parts), summed where it leaves the compact form.
def _entry_rows(order: Tensor, choices: int) -> Tensor:
    return torch.div(order, choices, rounding_mode="floor")


def _sum_choices(ys: Tensor, order: Tensor, choices: int) -> Tensor:
    """[E = R * choices, F] sorted entries → [R, F]: per row the sum of its entries, choice 0
    first (the order of the unfused graph's adds)."""
    e = torch.empty_like(ys, memory_format=torch.contiguous_format).index_copy_(0, order, ys)
    e = e.view(-1, choices, ys.shape[-1])
    out = e[:, 0].clone(memory_format=torch.contiguous_format)   # as the fake kernel says
    for j in range(1, choices):
        out.add_(e[:, j])
    return out


@torch.library.custom_op("salcompile::expand_rows", mutates_args=())
def expand_rows(x: Tensor, order: Tensor, choices: int) -> Tensor:
    """x [..., F] original order → [..., choices, F]: sorted entry j holds its row of x."""
    out = _rows(x).index_select(0, _entry_rows(order, choices))
    return _fresh(out.reshape(x.shape[:-1] + (choices, x.shape[-1])))


@expand_rows.register_fake
def _(x, order, choices):
    return x.new_empty(x.shape[:-1] + (choices, x.shape[-1]))


@torch.library.custom_op("salcompile::sum_rows", mutates_args=())
def sum_rows(ys: Tensor, order: Tensor, choices: int) -> Tensor:
    """Adjoint of expand_rows: [..., choices, F] sorted entries → [..., F] original order, each
    row the sum of its `choices` entries."""
    return _fresh(_sum_choices(_rows(ys), order, choices).reshape(ys.shape[:-2] + ys.shape[-1:]))


@sum_rows.register_fake
def _(ys, order, choices):
    return ys.new_empty(ys.shape[:-2] + ys.shape[-1:])


def _save_entries(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.choices = inputs[2]


expand_rows.register_autograd(
    lambda ctx, g: (fast.call(ctx, sum_rows, g.contiguous(), ctx.saved_tensors[0], ctx.choices),
                    None, None),
    setup_context=_save_entries)
sum_rows.register_autograd(
    lambda ctx, g: (fast.call(ctx, expand_rows, g.contiguous(), ctx.saved_tensors[0],
                              ctx.choices), None, None),
    setup_context=_save_entries)


@torch.library.custom_op("salcompile::expand_blocks", mutates_args=())
def expand_blocks(y: Tensor, order: Tensor, sorted_area: Tensor, areas: int,
                  choices: int) -> Tensor:
    """y [..., W] (original order, area-sparse) → [..., choices, W/K]: sorted entry j holds its
    row's block of its own area."""
    w = y.shape[-1] // areas
    flat = _flat_index(_entry_rows(order, choices), sorted_area, areas)
    out = y.reshape(-1, w).index_select(0, flat)
    return _fresh(out.reshape(y.shape[:-1] + (choices, w)))


@expand_blocks.register_fake
def _(y, order, sorted_area, areas, choices):
    return y.new_empty(y.shape[:-1] + (choices, y.shape[-1] // areas))


@torch.library.custom_op("salcompile::sum_blocks", mutates_args=())
def sum_blocks(ys: Tensor, order: Tensor, sorted_area: Tensor, areas: int,
               choices: int) -> Tensor:
    """Adjoint of expand_blocks: [..., choices, W/K] → [..., W] original order, each entry's
    block in its area's place (a row's choices are distinct areas: the blocks do not overlap),
    zero elsewhere."""
    w = ys.shape[-1]
    rows = _rows(ys)
    out = ys.new_zeros(rows.shape[0] // choices * areas, w)
    out.index_add_(0, _flat_index(_entry_rows(order, choices), sorted_area, areas), rows)
    return _fresh(out.reshape(ys.shape[:-2] + (w * areas,)))


@sum_blocks.register_fake
def _(ys, order, sorted_area, areas, choices):
    return ys.new_empty(ys.shape[:-2] + (ys.shape[-1] * areas,))


def _save_entry_blocks(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.areas, ctx.choices = inputs[3], inputs[4]


expand_blocks.register_autograd(
    lambda ctx, g: (fast.call(ctx, sum_blocks, g.contiguous(), *ctx.saved_tensors, ctx.areas,
                              ctx.choices), None, None, None, None),
    setup_context=_save_entry_blocks)
sum_blocks.register_autograd(
    lambda ctx, g: (fast.call(ctx, expand_blocks, g.contiguous(), *ctx.saved_tensors, ctx.areas,
                              ctx.choices), None, None, None, None),
    setup_context=_save_entry_blocks)


# ---------------------------------------------------------------- grouped matmul
def _aligned(t: Tensor) -> bool:
    """grouped_mm's stride rule: the last two strides are (s, 1) or (1, s), s 16-byte aligned."""
    a, b = t.stride()[-2:]
    s = a if b == 1 else (b if a == 1 else None)
    # a 3-D operand's groups start stride(0) apart: CUDA's kernel (TMA) needs those 16-byte
    # aligned too, which torch's own checks do not look at
    group = t.dim() < 3 or (t.stride(0) * t.element_size()) % 16 == 0
    return s is not None and (s * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 and group


def _grouped_ok(*ts: Tensor) -> bool:
    if FORCE_LOOP:
        return False
    t = ts[0]
    if t.device.type == "cpu":
        ok = t.dtype in (torch.float32, torch.bfloat16)
    elif t.device.type == "cuda":
        ok = t.dtype == torch.bfloat16
    else:
        ok = False
    return ok and all(x.numel() and _aligned(x) for x in ts)


def _spans(offs: Tensor):
    ends = offs.tolist()   # host sync: the per-area loop is the fallback path only
    start = 0
    for k, e in enumerate(ends):
        if e > start:
            yield k, start, e
        start = e


def _mm_rows(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """a [R, i] sorted rows, b [K, i, o] → [R, o]: rows of group k times b[k]."""
    if a.shape[0] and _grouped_ok(a, b):
        try:
            return F.grouped_mm(a, b, offs=offs)
        except RuntimeError:
            pass
    out = a.new_empty(a.shape[0], b.shape[-1])
    for k, s, e in _spans(offs):
        torch.mm(a[s:e], b[k], out=out[s:e])
    return out


def _mm_groups(gt: Tensor, x: Tensor, offs: Tensor) -> Tensor:
    """gt [o, R], x [R, i] → [K, o, i]: per group k, gt[:, rows k] @ x[rows k] (0 if empty)."""
    k = offs.shape[0]
    if x.shape[0] and _grouped_ok(gt, x):
        try:
            out = F.grouped_mm(gt, x, offs=offs)
        except RuntimeError:
            pass
        else:
            if out.device.type != "cpu":   # a GPU kernel may leave an empty group unwritten
                counts = torch.diff(offs, prepend=offs.new_zeros(1))
                out = out.masked_fill((counts == 0)[:, None, None], 0)
            return out
    out = x.new_zeros(k, gt.shape[0], x.shape[1])
    for a, s, e in _spans(offs):
        torch.mm(gt[:, s:e], x[s:e], out=out[a])
    return out


# ---------------------------------------------------------------- weight blocks
def _check(x: Tensor, area: Tensor, weight: Tensor, bias: Optional[Tensor],
           feedback: Optional[Tensor], areas: int, mode: str, input_block: bool) -> int:
    """Validate; return the compact output width."""
    check_mode("compact_linear", weight, feedback, mode, input_block)
    if mode == "replicate":
        if weight.dim() != 3 or weight.shape[0] != areas:
            raise ValueError(f"compact_linear: replicate weight must be [{areas}, N, I]")
        n, i = weight.shape[1:]
    else:
        if weight.dim() != 2:
            raise ValueError("compact_linear: weight must be [N, I]")
        n, i = weight.shape
        if (mode == "partition" and n % areas) or (input_block and i % areas):
            raise ValueError(f"compact_linear: widths {tuple(weight.shape)} not divisible by "
                             f"areas={areas}")
    want_in = i // areas if input_block else i
    if x.shape[-1] != want_in:
        raise ValueError(f"compact_linear: x has {x.shape[-1]} features, the layer reads "
                         f"{want_in}")
    if area.shape != (x.numel() // max(1, x.shape[-1]),) and x.numel():
        raise ValueError("compact_linear: area must be [rows]")
    want_b = (areas, n) if mode == "replicate" else (n,)
    if bias is not None and tuple(bias.shape) != want_b:
        raise ValueError(f"compact_linear: bias shape {tuple(bias.shape)} != {want_b}")
    return n // areas if mode == "partition" else n


def _stack(weight: Tensor, areas: int, mode: str, input_block: bool) -> Tensor:
    """The K weight blocks as one [K, o, i] view (strided; matmuls read it in place)."""
    w = weight.contiguous()
    if mode == "replicate":
        return w
    n, i = w.shape
    if mode == "partition" and not input_block:
        return w.view(areas, n // areas, i)
    if mode == "partition":   # the diagonal blocks: rows k, columns k
        return torch.diagonal(w.view(areas, n // areas, areas, i // areas), 0, 0, 2) \
            .permute(2, 0, 1)
    return w.view(n, areas, i // areas).permute(1, 0, 2)   # dense: columns k


def _unstack(gk: Tensor, weight: Tensor, areas: int, mode: str, input_block: bool) -> Tensor:
    """Inverse of _stack for a gradient: [K, o, i] → weight's shape (zeros off the blocks)."""
    if mode == "replicate":
        return gk.contiguous()
    n, i = weight.shape
    if mode == "partition" and not input_block:
        return gk.reshape(n, i)
    if mode == "partition":
        out = gk.new_zeros(n, i)
        torch.diagonal(out.view(areas, n // areas, areas, i // areas), 0, 0, 2).copy_(
            gk.permute(1, 2, 0))
        return out
    return gk.permute(1, 0, 2).reshape(n, i)


def _row_bias(bias: Tensor, area: Tensor, areas: int, mode: str) -> Tensor:
    if mode == "dense":
        return bias
    return bias.reshape(areas, -1).index_select(0, area)


# ---------------------------------------------------------------- few rows: per-row weight blocks
# With few rows per area (a paper-scale batch of 16 over 16 areas), a grouped matmul is K tiny
# matmuls (or, where grouped_mm does not apply, a host sync and a Python loop): gathering each
# row's own weight block and running one batched matmul is 2-4x cheaper. The same products and
# sums, in another order (float rounding only). Chosen by shape, inside the opaque ops.
SMALL_ROWS_PER_AREA = 4          # rows <= this x areas (measured: 2-4x faster up to here) ...
SMALL_GATHER_ELEMENTS = 1 << 20  # ... and rows x block size <= this (the gathered blocks' size)


def _few_rows(rows: int, areas: int, block: Tensor) -> bool:
    return 0 < rows <= SMALL_ROWS_PER_AREA * areas and \
        rows * block.shape[-1] * block.shape[-2] <= SMALL_GATHER_ELEMENTS


def _segment_sum(values: Tensor, area: Tensor, areas: int) -> Tensor:
    """[R, ...] rows → [K, ...]: the sum of each area's rows (0 for an empty area)."""
    return values.new_zeros((areas,) + tuple(values.shape[1:])).index_add_(0, area, values)


def _segment_sum_ok(values: Tensor) -> bool:
    """_segment_sum for per-area bias gradients at any row count: on CPU, index_add_ over the rows
    is 6-10x faster than a grouped matmul with a ones column (16 tiny matmuls; measured at 4096
    rows, 16 areas, widths 64 and 256); the same sums, in row order (float rounding aside). Not on
    CUDA (its index_add_ is atomic: the order, and so the float sum, would vary run to run), nor
    for half types (index_add_ accumulates in the tensor's own dtype; the matmul in float32)."""
    return values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64)


def _block_norms(blocks: Tensor) -> Tensor:
    """[K, o, i] → [K] Frobenius norms. Contiguous first: reducing strided block views in place
    is 2-3x slower than copying them."""
    return torch.linalg.vector_norm(blocks.contiguous(), dim=(1, 2))


def _fixed_block_norms(feedback: Tensor, blocks: Tensor) -> Tensor:
    """_block_norms of a fixed feedback tensor's blocks, clamped to >= _TINY, computed once per
    version of it."""
    return fixed_value(feedback, ("blocks", blocks.shape, blocks.stride(),
                                  blocks.storage_offset()),
                       lambda: _block_norms(blocks).clamp_min(_TINY))


# ---------------------------------------------------------------- compact linear
@torch.library.custom_op("salcompile::compact_linear", mutates_args=())
def compact_linear(x: Tensor, area: Tensor, anchor: Tensor, weight: Tensor,
                   bias: Optional[Tensor], feedback: Optional[Tensor], offs: Tensor, areas: int,
                   mode: str, input_block: bool, match_norm: bool) -> Tensor:
    """x [..., I or I/K] sorted rows (input_block: each row's own block) → [..., o] sorted rows,
    o = N/K (partition: the row's own output block) or N (replicate, dense)."""
    o = _check(x, area, weight, bias, feedback, areas, mode, input_block)
    x2 = _rows(x)
    wk = _stack(weight, areas, mode, input_block)
    if _few_rows(x2.shape[0], areas, wk):
        # [R, 1, i] x [R, i, o] (each row's block, transposed): CPU's batched matrix-vector
        # product in the other orientation is ~3x slower
        wr = wk.index_select(0, area).transpose(1, 2)
        if bias is not None:
            # [R, 1, o] (each row's bias block), or a dense bias [o] (broadcast)
            rb = bias if mode == "dense" else bias.reshape(areas, 1, -1).index_select(0, area)
            y = torch.baddbmm(rb, x2.unsqueeze(1), wr)
        else:
            y = torch.bmm(x2.unsqueeze(1), wr)
        return _fresh(y.reshape(x.shape[:-1] + (o,)))
    y = _mm_rows(x2, wk.transpose(1, 2), offs)
    if bias is not None:
        y.add_(_row_bias(bias, area, areas, mode))   # y is fresh: no extra [rows, o] buffer
    return _fresh(y.contiguous().reshape(x.shape[:-1] + (o,)))


@compact_linear.register_fake
def _(x, area, anchor, weight, bias, feedback, offs, areas, mode, input_block, match_norm):
    o = _check(x, area, weight, bias, feedback, areas, mode, input_block)
    return x.new_empty(x.shape[:-1] + (o,))


@torch.library.custom_op("salcompile::compact_linear_backward", mutates_args=())
def compact_linear_backward(grad: Tensor, x: Tensor, area: Tensor, offs: Tensor, weight: Tensor,
                            feedback: Optional[Tensor], has_bias: bool, areas: int, mode: str,
                            input_block: bool, match_norm: bool, need_x: bool, need_w: bool,
                            need_b: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); an output that is not needed comes back as an empty tensor."""
    g2 = _rows(grad).contiguous()
    x2 = _rows(x)
    gx = gw = gb = None
    wk = _stack(weight, areas, mode, input_block)
    few = _few_rows(g2.shape[0], areas, wk)
    if need_x:
        bk = wk if feedback is None else _stack(feedback, areas, mode, input_block)
        if few:
            gx = torch.bmm(g2.unsqueeze(1), bk.index_select(0, area)).reshape(x2.shape)
        else:
            gx = _mm_rows(g2, bk, offs)
        if feedback is not None and match_norm:
            # per-area ‖W_k‖/‖B_k‖ (fa.rescale); ‖B_k‖ of a fixed B is computed once per version
            scale = _block_norms(wk) / _fixed_block_norms(feedback, bk)
            if scale.dtype != gx.dtype:
                scale = scale.to(gx.dtype)
            gx.mul_(scale.index_select(0, area).unsqueeze(1))
        gx = _shaped(gx, x.shape)
    if need_w:
        gk = _segment_sum(g2.unsqueeze(2) * x2.unsqueeze(1), area, areas) if few else \
            _mm_groups(g2.t(), x2, offs)
        gw = _unstack(gk, weight, areas, mode, input_block)
    if need_b and has_bias:
        if (few or _segment_sum_ok(g2)) and mode != "dense":
            gb = _segment_sum(g2, area, areas)
            gb = gb.reshape(-1) if mode == "partition" else gb
        elif mode == "dense":   # column sums as a matrix-vector product (faster than sum(0))
            gb = g2.new_ones(1, g2.shape[0]).mm(g2).reshape(-1)
        else:   # per-area column sums of the sorted rows: one grouped matmul with a ones column
            ones = g2.new_ones(g2.shape[0], max(1, 16 // g2.element_size()))
            gb = _mm_groups(g2.t(), ones, offs)[..., 0]
            gb = gb.reshape(-1) if mode == "partition" else gb.contiguous()
    # Outputs that are not needed: distinct empty tensors (custom op outputs may not alias).
    # Contiguous, as the fake implementation promises (grouped_mm may pad its output's rows).
    return (gx.contiguous() if gx is not None else x.new_empty(0),
            gw.contiguous() if gw is not None else weight.new_empty(0),
            gb.contiguous() if gb is not None else weight.new_empty(0))


@compact_linear_backward.register_fake
def _(grad, x, area, offs, weight, feedback, has_bias, areas, mode, input_block, match_norm,
      need_x, need_w, need_b):
    return (x.new_empty(x.shape if need_x else (0,)),
            weight.new_empty(weight.shape if need_w else (0,)),
            weight.new_empty(_bias_shape(weight, mode) if need_b and has_bias else (0,)))


def _compact_setup(ctx, inputs, output):
    x, area, anchor, weight, bias, feedback, offs, areas, mode, input_block, match_norm = inputs
    ctx.save_for_backward(x, area, anchor, weight, feedback, offs)
    ctx.has_bias = bias is not None
    ctx.params = (areas, mode, input_block, match_norm)


def _compact_backward(ctx, grad):
    x, area, anchor, weight, feedback, offs = ctx.saved_tensors
    need_x, _, _, need_w, need_b, need_fb = ctx.needs_input_grad[:6]
    need_b = need_b and ctx.has_bias
    gx = gw = gb = None
    if need_x or need_w or need_b or need_fb:
        gx, gw, gb = fast.call(
            ctx, torch.ops.salcompile.compact_linear_backward,
            grad, x, area, offs, weight, feedback, ctx.has_bias, *ctx.params, need_x,
            need_w or need_fb, need_b)
    return (gx if need_x else None, None, torch.zeros_like(anchor), gw if need_w else None,
            gb if need_b else None, kp_grad(need_fb, gw), None, None, None, None, None)


compact_linear.register_autograd(_compact_backward, setup_context=_compact_setup)
