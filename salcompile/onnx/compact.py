"""The sorted compact form of routed (area) linear layers in ONNX, for the training exporters.

    routed_form="compact"   each area's block of the weight runs on the rows routed to it only
    routed_form="masked"    every area's block runs on every row, masked (K× the compute)

Both give the routed layer's outputs and gradients (ops/areas.py); "compact" is the default of
export_train_step and export_ort_training and applies to linear area layers (partition,
replicate, dense/input_block exits, top-k parts, shared-path slices); area convolutions stay
masked-dense in both forms. export_onnx (inference) keeps the masked form.

The ONNX form of one routed linear layer (rows r = 0..R-1, areas k = 0..K-1):

  * the permutation: every row's area plus one sentinel row per area (area k), sorted with
    TopK(largest=0) (ties keep row order); rows per area (Equal + ReduceSum, each +1 for its
    sentinel); the inverse permutation is TopK of the permutation, restricted to the real rows;
  * one Gather puts the rows in that order (for a layer that reads blocks of its input: each
    row's own block, from the [R·K, i] view of x), one Split by the counts cuts them per area,
    one Gemm per area with the area's block of W (a Split of W, or a Gather of the diagonal
    blocks of an input_block partition weight: weight-only chains, so the ORT artifacts' FA edit
    mirrors them for B block by block); the outputs are concatenated, put back in row order
    (Gather by the inverse permutation, sentinels dropped) and, for a layer that writes blocks of
    outputs, placed in the row's block by its 0/1 area mask;
  * backward (export_train_step writes it out): the same pieces of the sorted incoming gradient,
    dX_k = dY_k · B_k (rescaled per area by ‖W_k‖/max(‖B_k‖, 1e-12) with match_norm),
    dW_k = dY_kᵀ · X_k, db from the row masks, assembled in the weight's layout.

Sentinels: every area has at least one row, so no Gemm has 0 rows or a 0-long inner dimension
(ORT's Gemm refuses K=0 — dW of an empty area — and its gradient graph fails on M=0). They are
exact: in export_train_step the sentinel rows of X are zero and those of dY repeat row 0, so
they add 0 to dW, and their outputs and dX rows are dropped; in export_ort_training the sentinel
rows of X repeat row 0 and their outputs are dropped, so ORT's backward gives them a zero
gradient, which adds nothing to dW or dX (a zero-row constant there makes ORT's gradient
builder define a gradient twice).

The exporter's Split takes its output count from `num_outputs`, which ONNX forbids beside the
`split` input: `fix_splits` drops the attribute after the export. Within one export
(`sharing()`), the permutation of a gate's areas and a layer input's sorted pieces are built once
and read by every layer of the gate and by the backward.

How it is wired: export_train_step keeps the fast area_linear op and its registered backward
(salcompile::area_linear_backward) in the traced step and gives both an ONNX translation here;
export_ort_training writes the forward as `salcompile_onnx::routed_linear` (a custom op of its
own, translated here) and ONNX Runtime builds its gradient graph.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
from torch import Tensor

from ..errors import SalcompileError

FORMS = ("compact", "masked")


def check_form(who: str, routed_form) -> str:
    if routed_form not in FORMS:
        raise SalcompileError(f"{who}: routed_form must be one of {', '.join(map(repr, FORMS))}, "
                              f"not {routed_form!r}.")
    return routed_form


# ---------------------------------------------------------------- the forward op (ORT artifacts)
@torch.library.custom_op("salcompile_onnx::routed_linear", mutates_args=())
def routed_linear(x: Tensor, area: Tensor, weight: Tensor, bias: Optional[Tensor], areas: int,
                  mode: str, input_block: bool) -> Tensor:
    """The routed linear layer's forward (area_linear without feedback or anchor); exported in
    the compact form (routed_linear_onnx)."""
    return torch.ops.salcompile.area_linear(x, area, weight.new_zeros(()), weight, bias, None,
                                            areas, mode, input_block, False)


@routed_linear.register_fake
def _(x, area, weight, bias, areas, mode, input_block):
    n_out = weight.shape[1] if mode == "replicate" else weight.shape[0]
    return x.new_empty(x.shape[:-1] + (n_out,))


# ---------------------------------------------------------------- ONNX building blocks
def _op():
    from onnxscript import opset20 as op
    return op


def _ints(op, values):
    return op.Constant(value_ints=[int(v) for v in values])


def _dtype(like) -> int:
    """The ONNX element type of `like`: an int (itself), or a value the exporter hands a
    translation (values made inside one may not know theirs: pass the input's)."""
    if isinstance(like, int):
        return like
    dtype = getattr(like, "dtype", None)
    if dtype is None:
        raise SalcompileError("the compact routed form needs the element type of its inputs.")
    return int(dtype)


def _float(op, value: float, like):
    # Cast(to=...), not CastLike(like): a constant must not read a differentiable tensor (ORT's
    # gradient builder would give it a gradient)
    return op.Cast(op.Constant(value_float=float(value)), to=_dtype(like))


def _zeros(op, shape, like):
    return op.Expand(_float(op, 0.0, like), _ints(op, shape))


def _empty(op, like):
    return op.Cast(op.ConstantOfShape(_ints(op, [0])), to=_dtype(like))


def _static(value, who: str) -> List[int]:
    shape = getattr(value, "shape", None)
    dims = [] if shape is None else list(shape)
    if shape is None or not all(isinstance(d, int) for d in dims):
        raise SalcompileError(f"{who}: the compact routed form needs the weight's static shape "
                              "(export with routed_form='masked').")
    return dims


def _rank(value) -> Optional[int]:
    shape = getattr(value, "shape", None)
    return None if shape is None else len(shape)


class _Layout:
    """A configuration's blocks: in features F, out features n_out, per-area input width
    (`i`, None: the whole input), per-area output width `o` (None: the whole output)."""

    def __init__(self, w_shape, areas: int, mode: str, input_block: bool):
        k = areas
        self.k, self.mode, self.in_blk = k, mode, bool(input_block)
        if mode == "replicate":
            self.n_out, self.f = w_shape[1], w_shape[2]
            self.o = None
        else:
            self.n_out, self.f = w_shape[0], w_shape[1]
            self.o = self.n_out // k if mode == "partition" else None
        self.i = self.f // k if self.in_blk else None
        self.w_out = self.n_out if self.o is None else self.o   # one area's output width
        self.w_in = self.f if self.i is None else self.i         # one area's input width


def _blocks(op, w, lay: _Layout):
    """The K weight blocks [w_out, w_in] (weight-only forward nodes)."""
    k = lay.k
    if k == 1:
        return [op.Reshape(w, _ints(op, [lay.w_out, lay.w_in]))]
    if lay.mode == "replicate":
        return list(op.Split(op.Reshape(w, _ints(op, [k * lay.n_out, lay.f])), axis=0,
                             num_outputs=k))
    if lay.mode == "dense":
        return list(op.Split(w, axis=1, num_outputs=k))
    if lay.in_blk:
        return list(op.Split(_diagonal(op, w, lay), axis=0, num_outputs=k))
    return list(op.Split(w, axis=0, num_outputs=k))


def _bias_blocks(op, b, lay: _Layout):
    k = lay.k
    if b is None:
        return [None] * k
    if lay.mode == "dense" or k == 1:
        return [op.Reshape(b, _ints(op, [lay.w_out]))] * k
    if lay.mode == "replicate":
        b = op.Reshape(b, _ints(op, [k * lay.n_out]))
    return list(op.Split(b, axis=0, num_outputs=k))


# Per export: what one translation built and a later one reuses (the permutation of a gate's
# areas, read by every layer it routes and by their backward; a layer input's sorted rows, read
# by its forward and its backward). Keys hold the exporter's own value objects, so nothing is
# shared between exports: `sharing()` opens and clears the cache around one export.
_CACHE: Optional[dict] = None


@contextlib.contextmanager
def sharing():
    global _CACHE
    saved, _CACHE = _CACHE, {}
    try:
        yield
    finally:
        _CACHE = saved


def _cached(key, build):
    if _CACHE is None:
        return build()
    # the key holds the values themselves (identity), so none is collected and reused meanwhile
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


class _Route:
    """One area vector's sorted order, one sentinel row per area included: the area of every
    sorted position, the source row (>= R for the sentinels), the rows per area (+1) and the
    inverse permutation restricted to the real rows."""

    def __init__(self, op, a, k: int):
        self.a, self.k = a, k
        ids = _ints(op, range(k))
        a_ext = op.Concat(a, ids, axis=0)                               # [R + K]
        n_ext = op.Shape(a_ext)
        self.rows = op.Shape(a)                                         # [1]: R
        self.sorted_areas, self.order = op.TopK(a_ext, n_ext, axis=0, largest=0, sorted=1)
        self.counts = op.ReduceSum(op.Cast(op.Equal(op.Unsqueeze(a_ext, _ints(op, [1])),
                                                    op.Unsqueeze(ids, _ints(op, [0]))),
                                           to=7), _ints(op, [0]), keepdims=0)   # int64 [K]
        _, inv = op.TopK(self.order, n_ext, axis=0, largest=0, sorted=1)
        self.inv = op.Slice(inv, _ints(op, [0]), self.rows)            # real rows' positions
        self.real = op.Less(self.order, self.rows)                     # [R + K] bool
        self._idx: dict = {}
        self._mask: dict = {}

    def index(self, op, blocked: bool, zero_row: bool):
        """Gather indices of the sorted positions into a table of R·m rows (m = K when every
        row owns a block of the table: its area's), the sentinels pointing at row R·m (a zero
        row the caller appends) with `zero_row`, else at row 0 (any finite row)."""
        key = (blocked, zero_row)
        if key not in self._idx:
            src = op.Add(op.Mul(self.order, _ints(op, [self.k])), self.sorted_areas) \
                if blocked else self.order
            other = op.Mul(self.rows, _ints(op, [self.k])) if blocked and zero_row else \
                (self.rows if zero_row else _ints(op, [0]))
            self._idx[key] = op.Where(self.real, src, other)
        return self._idx[key]

    def mask(self, op, like):
        """[R, K] 0/1: row r is routed to area k."""
        key = _dtype(like)
        if key not in self._mask:
            self._mask[key] = op.Cast(op.Equal(op.Unsqueeze(self.a, _ints(op, [1])),
                                               op.Unsqueeze(_ints(op, range(self.k)),
                                                            _ints(op, [0]))), to=key)
        return self._mask[key]


def _route(op, x, area, lay: _Layout) -> _Route:
    xr, ar = _rank(x), _rank(area)
    if xr is None or ar is None:
        raise SalcompileError("the compact routed form needs the ranks of x and area.")
    if ar < xr - 1:   # an area per leading position, broadcast over the others: x-specific
        a = op.Reshape(op.Expand(op.Unsqueeze(area, _ints(op, range(ar, xr - 1))),
                                 op.Shape(x, start=0, end=-1)), _ints(op, [-1]))
        return _cached(("route", area, x, lay.k), lambda: _Route(op, a, lay.k))
    return _cached(("route", area, lay.k),
                   lambda: _Route(op, op.Reshape(area, _ints(op, [-1])), lay.k))


def _sorted_pieces(op, route: _Route, t2, width: int, blocked: bool, zero_row: bool, dt: int):
    """The K per-area pieces of t2's sorted rows (area k's block of columns of each row when
    `blocked`, t2 then [R, K·width]); one sentinel row per piece, zero with `zero_row`."""
    table = op.Reshape(t2, _ints(op, [-1, width])) if blocked else t2
    if zero_row:
        table = op.Concat(table, _zeros(op, [1, width], dt), axis=0)
    ts = op.Gather(table, route.index(op, blocked, zero_row), axis=0)   # [R + K, width]
    if route.k == 1:
        return [ts]
    return list(op.Split(ts, route.counts, axis=0, num_outputs=route.k))   # see fix_splits


def _unsort(op, route: _Route, pieces, width: int, blocked: bool, like):
    """Per-area rows (sentinels included) -> row order [R, width]; `blocked`: placed in the
    row's block of a [R, K·width] result (zeros elsewhere)."""
    ys = op.Gather(op.Concat(*pieces, axis=0) if len(pieces) > 1 else pieces[0], route.inv,
                   axis=0)
    if not blocked:
        return ys
    full = op.Mul(op.Unsqueeze(ys, _ints(op, [1])),
                  op.Unsqueeze(route.mask(op, like), _ints(op, [2])))
    return op.Reshape(full, _ints(op, [-1, route.k * width]))


def _x_pieces(op, x, route: _Route, lay: _Layout, dt: int, zero_row: bool = True):
    def build():
        x2 = op.Reshape(x, _ints(op, [-1, lay.f]))
        return x2, _sorted_pieces(op, route, x2, lay.w_in, lay.in_blk, zero_row, dt)
    return _cached(("x", x, route, lay.f, lay.w_in, lay.in_blk, zero_row), build)


def _forward(op, x, area, weight, bias, areas: int, mode: str, input_block: bool,
             zero_row: bool):
    """`zero_row`: the sentinel rows of x are zero (export_train_step's backward needs that:
    its dY sentinels are arbitrary rows); without, they repeat row 0: their outputs are
    dropped, so ORT's gradient graph gives them a zero gradient, which adds nothing to dW or
    dX (and the graph needs no zero-row constant, which ORT's gradient builder mishandles)."""
    lay = _Layout(_static(weight, "routed linear"), int(areas), mode, input_block)
    dt = _dtype(weight)
    route = _route(op, x, area, lay)
    x2, xs = _x_pieces(op, x, route, lay, dt, zero_row)
    ws, bs = _blocks(op, weight, lay), _bias_blocks(op, bias, lay)
    ys = [op.Gemm(xs[j], ws[j], transB=1) if bs[j] is None else
          op.Gemm(xs[j], ws[j], bs[j], transB=1) for j in range(lay.k)]
    y = _unsort(op, route, ys, lay.w_out, lay.o is not None, dt)
    return op.Reshape(y, op.Concat(op.Shape(x, start=0, end=-1), _ints(op, [lay.n_out]),
                                   axis=0))


def routed_linear_onnx(x, area, weight, bias=None, areas: int = 1, mode: str = "partition",
                       input_block: bool = False):
    """ONNX translation of salcompile_onnx::routed_linear (traced onnxscript)."""
    return _forward(_op(), x, area, weight, bias, areas, mode, input_block, False)


def area_linear_onnx(x, area, anchor, weight, bias=None, feedback=None, areas: int = 1,
                     mode: str = "partition", input_block: bool = False,
                     match_norm: bool = False):
    """ONNX translation of salcompile::area_linear's forward (the feedback is read only by its
    backward)."""
    return _forward(_op(), x, area, weight, bias, areas, mode, input_block, True)


def _block_norms(op, w, lay: _Layout, dt: int):
    """[K]: ‖block k‖ of a weight-shaped tensor."""
    k = lay.k
    if lay.mode == "replicate" or (lay.mode == "partition" and not lay.in_blk):
        return op.ReduceL2(op.Reshape(w, _ints(op, [k, -1])), _ints(op, [1]), keepdims=0)
    if lay.mode == "dense":
        return op.ReduceL2(op.Reshape(w, _ints(op, [lay.n_out, k, lay.i])), _ints(op, [0, 2]),
                           keepdims=0)
    return op.ReduceL2(op.Reshape(_diagonal(op, w, lay), _ints(op, [k, -1])), _ints(op, [1]),
                       keepdims=0)


def _diagonal_rows(lay: _Layout) -> List[int]:
    """Rows of a [K·o·K, i] view of a partition input_block weight holding its diagonal
    blocks, block by block: row r of block k is (k·o + r)·K + k."""
    k, o = lay.k, lay.o
    return [(j * o + r) * k + j for j in range(k) for r in range(o)]


def _diagonal(op, w, lay: _Layout):
    """[K·o, i]: the K diagonal blocks of a partition input_block weight, stacked."""
    return op.Gather(op.Reshape(w, _ints(op, [-1, lay.i])), _ints(op, _diagonal_rows(lay)),
                     axis=0)


def area_linear_backward_onnx(grad, x, area, weight, feedback=None, has_bias: bool = False,
                              areas: int = 1, mode: str = "partition", input_block: bool = False,
                              match_norm: bool = False, need_x: bool = True, need_w: bool = True,
                              need_b: bool = True):
    """ONNX translation of salcompile::area_linear_backward: (dX, dW, db), an output that is not
    needed an empty tensor, as the op returns."""
    op = _op()
    lay = _Layout(_static(weight, "routed linear"), int(areas), mode, input_block)
    k = lay.k
    dt = _dtype(weight)
    route = _route(op, x, area, lay)
    x2, xs = _x_pieces(op, x, route, lay, dt)
    g2 = op.Reshape(grad, _ints(op, [-1, lay.n_out]))
    gs = _sorted_pieces(op, route, g2, lay.w_out, lay.o is not None, False, dt)
    gx = gw = gb = None
    if need_x:
        operand = weight if feedback is None else feedback
        bs = _blocks(op, operand, lay)
        gxs = op.Concat(*[op.MatMul(gs[j], bs[j]) for j in range(k)], axis=0) \
            if k > 1 else op.MatMul(gs[0], bs[0])
        if feedback is not None and match_norm:   # ‖W_k‖ / max(‖B_k‖, tiny), per sorted row
            scale = op.Div(_block_norms(op, weight, lay, dt),
                           op.Max(_block_norms(op, feedback, lay, dt), _float(op, 1e-12, dt)))
            gxs = op.Mul(gxs, op.Unsqueeze(op.Gather(scale, route.sorted_areas, axis=0),
                                           _ints(op, [1])))
        gx = op.Reshape(_unsort(op, route, [gxs], lay.w_in, lay.in_blk, dt), op.Shape(x))
    if need_w:
        parts = [op.Gemm(gs[j], xs[j], transA=1) for j in range(k)]
        w_shape = _static(weight, "routed linear")
        if k == 1:
            gw = op.Reshape(parts[0], _ints(op, w_shape))
        elif lay.mode == "replicate":
            gw = op.Reshape(op.Concat(*parts, axis=0), _ints(op, w_shape))
        elif lay.mode == "dense":
            gw = op.Concat(*parts, axis=1)
        elif not lay.in_blk:
            gw = op.Concat(*parts, axis=0)
        else:   # the diagonal blocks of [K·o, K·i], zeros elsewhere
            rows = _diagonal_rows(lay)
            gw = op.Reshape(op.ScatterND(_zeros(op, [lay.n_out * k, lay.i], dt),
                                         op.Reshape(_ints(op, rows), _ints(op, [-1, 1])),
                                         op.Concat(*parts, axis=0)), _ints(op, w_shape))
    if need_b and has_bias:
        if lay.mode == "dense" or k == 1:
            gb = op.ReduceSum(g2, _ints(op, [0]), keepdims=0)
            if lay.mode == "replicate":
                gb = op.Reshape(gb, _ints(op, [1, lay.n_out]))
        elif lay.mode == "replicate":   # [K, N]: the rows of each area
            gb = op.MatMul(op.Transpose(route.mask(op, dt), perm=[1, 0]), g2)
        else:   # partition [K·o]: each row's own block
            gb = op.Reshape(op.ReduceSum(op.Mul(op.Reshape(g2, _ints(op, [-1, k, lay.o])),
                                                op.Unsqueeze(route.mask(op, dt),
                                                             _ints(op, [2]))),
                                         _ints(op, [0]), keepdims=0), _ints(op, [lay.n_out]))
    return (gx if gx is not None else _empty(op, dt),
            gw if gw is not None else _empty(op, dt),
            gb if gb is not None else _empty(op, dt))


def fix_splits(model) -> int:
    """The exporter's Split needs `num_outputs` to count its outputs, ONNX forbids it beside
    the `split` input: drop the attribute where both are given (the per-area row splits)."""
    done = 0
    for n in model.graph.node:
        if n.op_type == "Split" and n.domain in ("", "ai.onnx") and len(n.input) > 1 \
                and n.input[1]:
            keep = [a for a in n.attribute if a.name != "num_outputs"]
            if len(keep) != len(n.attribute):
                del n.attribute[:]
                n.attribute.extend(keep)
                done += 1
    return done


def train_step_table() -> dict:
    """The custom translation table export_train_step passes to the exporter (compact form)."""
    s = torch.ops.salcompile
    return {s.area_linear.default: area_linear_onnx,
            s.area_linear_backward.default: area_linear_backward_onnx}


def ort_table() -> dict:
    return {torch.ops.salcompile_onnx.routed_linear.default: routed_linear_onnx}


__all__ = ["FORMS", "check_form", "routed_linear", "train_step_table", "ort_table", "sharing",
           "fix_splits"]
