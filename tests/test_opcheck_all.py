"""Issue 16: every salcompile:: custom op passes torch.library.opcheck.

The ops are enumerated from the dispatcher at test time (test_every_registered_op_has_a_case):
an op registered later without an entry in CASES below fails that test, naming the op. Each case
builds small sample inputs (several per op where it has modes) and runs opcheck's utilities:
test_schema, test_autograd_registration, test_faketensor and test_aot_dispatch_dynamic (the
default set), except where a case says otherwise and why.
"""
import glob
import os
import re
from typing import Callable, NamedTuple, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.testing._internal.optests import OpCheckError, aot_autograd_check

import salcompile  # noqa: F401  (registers every salcompile:: op)
from conftest import D

ops = torch.ops.salcompile
PREFIX = "salcompile::"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The region gates return (areas int64, anchor float). opcheck's test_aot_dispatch_dynamic / _static
# sum every output into one accumulator, in place (`sm += out.sum().abs()`, torch/testing/
# _internal/optests/aot_autograd.py): the first output is the int64 areas, so the accumulator is an
# int64 tensor and adding the float anchor fails ("result type Double can't be cast to the
# desired output type Long"), in opcheck's own eager run, before AOT dispatch is involved. That is
# an opcheck limitation, not a bug of the ops: opcheck runs the other utilities on them, and
# test_gate_aot_dispatch below runs the same AOT check on the gate with its outputs swapped.
# (region_sort's outputs are all integers and no input requires grad: it passes the defaults.)
NO_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")
GATES = ("region_gate", "region_gate_topk")


class Case(NamedTuple):
    op: str                    # name under salcompile::
    id: str
    build: Callable[[], tuple]
    test_utils: Optional[Sequence[str]] = None   # None: opcheck's defaults
    xfail: Optional[str] = None                  # a known bug: strict xfail with this reason
    match: str = "Stride mismatch"               # ... recognised by this text in opcheck's error


CASES = []


class KnownBug(AssertionError):
    """opcheck failed the way a case's xfail reason describes (any other failure stays one)."""


def case(op, id, test_utils=None, xfail=None, match="Stride mismatch"):
    def deco(fn):
        CASES.append(Case(op, id, fn, test_utils, xfail, match))
        return fn
    return deco


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ---------------------------------------------------------------- helpers
def _t(*shape, grad=True, dtype=D):
    return torch.randn(shape, dtype=dtype, requires_grad=grad)


def _fb(shape, kind, dtype=D):
    """The feedback tensor of a rule: bp None, fa a fixed B, kp a trainable B (Kolen-Pollack)."""
    if kind == "bp":
        return None
    return torch.randn(shape, dtype=dtype, requires_grad=kind == "kp")


def _anchor(dtype=D):
    return torch.zeros((), dtype=dtype, requires_grad=True)


def _area(shape, k, empty=False):
    """int64 areas in [0, k); empty: area k-1 gets no row."""
    return torch.randint(0, k - 1 if empty else k, shape)


def _topk_areas(shape, areas, k):
    """[..., k] distinct areas per row (region_gate_topk's output)."""
    return torch.rand(shape + (areas,)).topk(k, -1).indices


def _protos(k, dim, dtype=D):
    return F.normalize(torch.randn(k, dim, dtype=dtype), dim=-1)


def _detached(*ts):
    return tuple(None if t is None else t.detach() for t in ts)


def _laid_out(t, order):
    """t's values, memory laid out with dims `order` outermost first (a permuted copy), keeping
    requires_grad: e.g. (1, 0) feature-major rows, (0, 2, 3, 1) channels_last."""
    inv = [order.index(i) for i in range(t.dim())]
    out = t.detach().permute(order).contiguous().permute(inv)
    return out.requires_grad_(t.requires_grad)


# The non-contiguous (transposed, channels_last, feature-major) cases below once showed fake
# kernels whose strides differed from the real op's (torch.compile failed on them at run time);
# the real ops now return the contiguous layout their fakes promise.


# ---------------------------------------------------------------- fa.py
@case("fa_linear", "2d-bias-fa")
def _():
    return _t(4, 5), _t(3, 5), _t(3), _fb((3, 5), "fa"), False


@case("fa_linear", "3d-nobias-kp-match")
def _():
    return _t(2, 4, 5), _t(3, 5), None, _fb((3, 5), "kp"), True


@case("fa_linear", "1d-x")
def _():
    return _t(5), _t(3, 5), _t(3), _fb((3, 5), "fa"), True


@case("fa_conv", "1d-bias-fa")
def _():
    w = _t(4, 2, 3)
    return _t(2, 2, 7), w, _t(4), _fb(w.shape, "fa"), [1], [1], [1], False, [0], 1, False


@case("fa_conv", "2d-grouped-strided-nobias-kp-match")
def _():
    w = _t(4, 2, 3, 3)
    return (_t(2, 4, 6, 6), w, None, _fb(w.shape, "kp"), [2, 2], [1, 1], [1, 1], False, [0, 0],
            2, True)


@case("fa_conv", "2d-transposed-bias")
def _():
    w = _t(3, 2, 2, 2)   # transposed: [in, out / groups, ...]
    return (_t(2, 3, 4, 4), w, _t(2), _fb(w.shape, "fa"), [2, 2], [0, 0], [1, 1], True, [1, 1],
            1, False)


@case("fa_conv", "2d-unbatched-dilated")
def _():
    w = _t(3, 2, 3, 3)
    return _t(2, 6, 6), w, _t(3), _fb(w.shape, "fa"), [1, 1], [2, 2], [2, 2], False, [0, 0], 1, True


@case("fa_conv", "2d-channels-last")
def _():
    w = _laid_out(_t(4, 3, 3, 3), (0, 2, 3, 1))
    return (_laid_out(_t(2, 3, 5, 5), (0, 2, 3, 1)), w, _t(4), _fb(w.shape, "kp"), [1, 1],
            [1, 1], [1, 1], False, [0, 0], 1, True)


@case("fa_matmul", "x-at-w-fa")
def _():
    return _t(4, 5), _t(5, 3), _fb((5, 3), "fa"), False, False


@case("fa_matmul", "w-at-x-1d-kp-match")
def _():
    return _t(5), _t(3, 5), _fb((3, 5), "kp"), True, True


@case("fa_matmul", "batched-3d-weight")
def _():
    return _t(2, 4, 5), _t(2, 5, 3), _fb((2, 5, 3), "fa"), False, True


@case("fa_einsum", "bi,oi->bo-kp-match")
def _():
    return "bi,oi->bo", _t(4, 5), _t(3, 5), _fb((3, 5), "kp"), False, True


@case("fa_einsum", "weight-first-summed-index")
def _():
    # k is summed away in the forward and only the weight carries it (the vjp's broadcast)
    return "kij,bi->bj", _t(4, 6), _t(2, 6, 3), _fb((2, 6, 3), "fa"), True, False


@case("fa_grouped_mm", "empty-expert-tail-rows-fa")
def _():
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)   # an empty expert; row 6 past the end
    return _t(7, 4), _t(3, 4, 5), offs, _fb((3, 4, 5), "fa"), False


@case("fa_grouped_mm", "kp-match")
def _():
    offs = torch.tensor([3, 5, 8], dtype=torch.int32)
    return _t(8, 4), _t(3, 4, 5), offs, _fb((3, 4, 5), "kp"), True


@case("fa_grouped_mm_backward", "match")
def _():
    # a backward op: not differentiable itself (no double backward), detached inputs
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)
    return (_t(7, 5, grad=False), _t(7, 4, grad=False), _t(3, 4, 5, grad=False), offs,
            _t(3, 4, 5, grad=False), True)


@case("fa_grouped_mm_backward", "transposed-x")   # once a stride mismatch (fixed)
def _():
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)
    return (_t(7, 5, grad=False), _laid_out(_t(7, 4, grad=False), (1, 0)),
            _t(3, 4, 5, grad=False), offs, _t(3, 4, 5, grad=False), False)


# ---------------------------------------------------------------- dfa.py
@case("dfa_output", "two-taps")
def _():
    return _t(4, 3), [_t(4, 5), _t(4, 2, 3)], [_t(3, 5, grad=False), _t(3, 6, grad=False)]


@case("dfa_output", "per-token")
def _():
    return _t(2, 3, 4), [_t(2, 3, 5)], [_t(4, 5, grad=False)]


# ---------------------------------------------------------------- finite.py
@case("check_finite", "requires-grad")
def _():
    return _t(3, 4), "fc1"


@case("check_finite", "transposed-no-grad")
def _():
    return _t(4, 3, grad=False).t(), "input x"


@case("check_finite_grad", "plain")
def _():
    return _t(3, 4, grad=False), "fc1"


# ---------------------------------------------------------------- gate.py
@case("global_route_counts", "float64")
def _():
    return (torch.tensor([3.0, 0.0, 5.0], dtype=D),)


@case("region_gate", "2d", test_utils=NO_AOT)
def _():
    return _t(7, 5, grad=False), _t(3, 5), _protos(4, 3), 0.1, 0.5


@case("region_gate", "3d-float32", test_utils=NO_AOT)
def _():
    f32 = torch.float32
    return _t(2, 3, 5, grad=False, dtype=f32), _t(3, 5, dtype=f32), _protos(4, 3, f32), 0.2, 1.0


@case("region_gate_topk", "k2", test_utils=NO_AOT)
def _():
    return _t(7, 5, grad=False), _t(3, 5), _protos(4, 3), 0.1, 0.5, 2


@case("region_gate_topk", "3d-k1", test_utils=NO_AOT)
def _():
    return _t(2, 3, 5, grad=False), _t(3, 5), _protos(4, 3), 0.1, 0.5, 1


@case("count_routes", "1d-areas")
def _():
    return _area((6,), 3), torch.zeros(3, dtype=D)


@case("count_routes", "topk-areas")
def _():
    return _topk_areas((5,), 4, 2), torch.zeros(4, dtype=D)


# ---------------------------------------------------------------- areas.py
# area_linear(x, area, anchor, weight, bias, feedback, areas, mode, input_block, match_norm)
def _area_linear(x_shape, area_dims, n, k, mode, ib, fb, bias=True, match=False, empty=False):
    fin = x_shape[-1]
    w_shape, b_shape = ((k, n, fin), (k, n)) if mode == "replicate" else ((n, fin), (n,))
    return (_t(*x_shape), _area(x_shape[:area_dims], k, empty), _anchor(), _t(*w_shape),
            _t(*b_shape) if bias else None, _fb(w_shape, fb), k, mode, ib, match)


@case("area_linear", "partition-fa")
def _():
    return _area_linear((6, 8), 1, 6, 2, "partition", False, "fa")


@case("area_linear", "partition-input-block-kp-match-3d")
def _():
    return _area_linear((3, 4, 8), 1, 6, 2, "partition", True, "kp", match=True)


@case("area_linear", "replicate-bp-nobias-empty-area")
def _():
    return _area_linear((5, 8), 1, 4, 3, "replicate", False, "bp", bias=False, empty=True)


@case("area_linear", "replicate-kp")
def _():
    return _area_linear((5, 8), 1, 4, 3, "replicate", False, "kp")


@case("area_linear", "dense-fa-match-2d-area")
def _():
    return _area_linear((2, 3, 8), 2, 5, 2, "dense", True, "fa", match=True)


# area_linear_backward(grad, x, area, weight, feedback, has_bias, areas, mode, input_block,
#                      match_norm, need_x, need_w, need_b): detached inputs (no double backward)
def _area_linear_backward(fwd, n_out, has_bias, needs):
    x, area, _, w, _, fb, k, mode, ib, match = fwd
    g = _t(*x.shape[:-1], n_out, grad=False)
    return (g, *_detached(x), area, *_detached(w, fb), has_bias, k, mode, ib, match, *needs)


@case("area_linear_backward", "partition-input-block-fa-all")
def _():
    return _area_linear_backward(_area_linear((3, 4, 8), 1, 6, 2, "partition", True, "fa",
                                              match=True), 6, True, (True, True, True))


@case("area_linear_backward", "replicate-bp-x-only")
def _():
    return _area_linear_backward(_area_linear((5, 8), 1, 4, 3, "replicate", False, "bp"), 4,
                                 False, (True, False, False))


@case("area_linear_backward", "dense-w-and-b")
def _():
    return _area_linear_backward(_area_linear((6, 8), 1, 5, 2, "dense", True, "fa"), 5, True,
                                 (False, True, True))


@case("area_linear_backward", "transposed-weight")   # once a stride mismatch (fixed)
def _():
    fwd = list(_area_linear((6, 8), 1, 6, 2, "partition", False, "fa"))
    fwd[3] = _laid_out(fwd[3], (1, 0))
    return _area_linear_backward(tuple(fwd), 6, True, (True, True, True))


# area_conv(x, area, anchor, weight, bias, feedback, stride, padding, dilation, groups, areas,
#           mode, input_block, match_norm)
def _area_conv(xs, cout, kernel, stride, padding, dilation, groups, k, mode, ib, fb, bias=True,
               match=False):
    w_shape = (cout, xs[1] // groups, *kernel)
    w_shape, b_shape = ((k, *w_shape), (k, cout)) if mode == "replicate" else (w_shape, (cout,))
    return (_t(*xs), _area(xs[:1], k), _anchor(), _t(*w_shape), _t(*b_shape) if bias else None,
            _fb(w_shape, fb), stride, padding, dilation, groups, k, mode, ib, match)


@case("area_conv", "2d-partition-fa")
def _():
    return _area_conv((4, 4, 5, 5), 8, (3, 3), [1, 1], [1, 1], [1, 1], 1, 2, "partition", False,
                      "fa")


@case("area_conv", "2d-partition-input-block-kp-match")
def _():
    return _area_conv((4, 4, 5, 5), 4, (3, 3), [1, 1], [1, 1], [1, 1], 1, 2, "partition", True,
                      "kp", match=True)


@case("area_conv", "2d-grouped-partition-nobias")
def _():
    return _area_conv((4, 4, 5, 5), 4, (3, 3), [1, 1], [1, 1], [1, 1], 2, 2, "partition", False,
                      "fa", bias=False)


@case("area_conv", "2d-channels-last-kp")
def _():
    fwd = list(_area_conv((4, 4, 5, 5), 8, (3, 3), [1, 1], [1, 1], [1, 1], 1, 2, "partition",
                          False, "kp"))
    fwd[0], fwd[3] = _laid_out(fwd[0], (0, 2, 3, 1)), _laid_out(fwd[3], (0, 2, 3, 1))
    return tuple(fwd)


@case("area_conv", "1d-replicate-bp")
def _():
    return _area_conv((3, 4, 7), 6, (3,), [1], [0], [1], 1, 2, "replicate", False, "bp")


@case("area_conv", "2d-dense-strided-fa-match")
def _():
    return _area_conv((4, 4, 6, 6), 3, (3, 3), [2, 2], [1, 1], [1, 1], 1, 2, "dense", True, "fa",
                      match=True)


# area_conv_backward(grad, x, area, weight, feedback, stride, padding, dilation, groups,
#                    has_bias, areas, mode, input_block, match_norm, need_x, need_w, need_b)
def _area_conv_backward(fwd, has_bias, needs):
    x, area, anchor, w, b, fb, stride, padding, dilation, groups, k, mode, ib, match = fwd
    with torch.no_grad():
        g = torch.randn_like(ops.area_conv(*fwd))
    return (g, *_detached(x), area, *_detached(w, fb), stride, padding, dilation, groups,
            has_bias, k, mode, ib, match, *needs)


@case("area_conv_backward", "2d-partition-fa-all")
def _():
    return _area_conv_backward(_area_conv((4, 4, 5, 5), 8, (3, 3), [1, 1], [1, 1], [1, 1], 1, 2,
                                          "partition", False, "fa", match=True),
                               True, (True, True, True))


@case("area_conv_backward", "1d-replicate-bp-w-and-b")
def _():
    return _area_conv_backward(_area_conv((3, 4, 7), 6, (3,), [1], [0], [1], 1, 2, "replicate",
                                          False, "bp"), True, (False, True, True))


@case("area_conv_backward", "2d-grouped-x-only-nobias")
def _():
    return _area_conv_backward(_area_conv((4, 4, 5, 5), 4, (3, 3), [1, 1], [1, 1], [1, 1], 2, 2,
                                          "partition", False, "fa", bias=False),
                               False, (True, False, False))


@case("area_conv_backward", "channels-last-weight")   # once a stride mismatch (fixed)
def _():
    fwd = list(_area_conv((4, 4, 5, 5), 8, (3, 3), [1, 1], [1, 1], [1, 1], 1, 2, "partition",
                          False, "fa"))
    fwd[0], fwd[3] = _laid_out(fwd[0], (0, 2, 3, 1)), _laid_out(fwd[3], (0, 2, 3, 1))
    return _area_conv_backward(tuple(fwd), True, (True, True, True))


# ---------------------------------------------------------------- compact.py: routing, layouts
@case("region_sort", "1d")
def _():
    return _area((12,), 3), 3


@case("region_sort", "2d-empty-area")
def _():
    return _area((3, 4), 4, empty=True), 4


@case("region_sort", "topk-entries")
def _():
    return _topk_areas((7,), 4, 2), 4


@case("region_sort", "no-rows")
def _():
    return torch.zeros(0, dtype=torch.long), 3


def _layout(op, x_shape, k, permuted=False):
    area = _area(x_shape[:-1], k)
    order, sarea, _ = ops.region_sort(area, k)
    if op in ("sort_rows", "unsort_rows"):
        if permuted:   # a token-mixing MLP's x.transpose: the outputs are contiguous anyway
            x = _t(x_shape[1], x_shape[0], *x_shape[2:]).transpose(0, 1)
        else:
            x = _t(*x_shape)
        return x, order
    if op == "gather_blocks":
        return _t(*x_shape), order, sarea, k
    return _t(*x_shape[:-1], x_shape[-1] // k), order, sarea, k   # scatter_blocks: compact in


for _op in ("sort_rows", "unsort_rows", "gather_blocks", "scatter_blocks"):
    case(_op, "2d")(lambda _op=_op: _layout(_op, (12, 6), 3))
    case(_op, "3d")(lambda _op=_op: _layout(_op, (4, 5, 6), 2))
case("sort_rows", "permuted")(lambda: _layout("sort_rows", (4, 5, 6), 3, permuted=True))
case("unsort_rows", "permuted")(lambda: _layout("unsort_rows", (4, 5, 6), 3, permuted=True))


@case("sort_rows", "feature-major")
def _():
    x, order = _layout("sort_rows", (12, 6), 3)
    return _laid_out(x, (1, 0)), order


@case("unsort_rows", "feature-major")   # once a stride mismatch (fixed)
def _():
    xs, order = _layout("unsort_rows", (12, 6), 3)
    return _laid_out(xs, (1, 0)), order


# top-k entries: expand_rows(x, order, k), sum_rows(ye, order, k),
# expand_blocks(y, order, sarea, areas, k), sum_blocks(yb, order, sarea, areas, k)
def _entries(op, lead, areas, k, width=8):
    order, sarea, _ = ops.region_sort(_topk_areas(lead, areas, k), areas)
    if op == "expand_rows":
        return _t(*lead, width), order, k
    if op == "sum_rows":
        return _t(*lead, k, width), order, k
    if op == "expand_blocks":
        return _t(*lead, width), order, sarea, areas, k
    return _t(*lead, k, width // areas), order, sarea, areas, k   # sum_blocks


for _op in ("expand_rows", "sum_rows", "expand_blocks", "sum_blocks"):
    case(_op, "rows-k2")(lambda _op=_op: _entries(_op, (7,), 4, 2))
    case(_op, "3d-k3")(lambda _op=_op: _entries(_op, (2, 3), 4, 3))
    case(_op, "k1")(lambda _op=_op: _entries(_op, (5,), 2, 1))


@case("sum_rows", "feature-major")   # once a stride mismatch (fixed)
def _():
    ys, order, k = _entries("sum_rows", (7,), 4, 2)
    return _laid_out(ys, (2, 0, 1)), order, k


@case("gather_blocks", "feature-major")
def _():
    y, order, sarea, k = _layout("gather_blocks", (12, 6), 3)
    return _laid_out(y, (1, 0)), order, sarea, k


@case("scatter_blocks", "feature-major")
def _():
    ys, order, sarea, k = _layout("scatter_blocks", (12, 6), 3)
    return _laid_out(ys, (1, 0)), order, sarea, k


@case("expand_rows", "feature-major")
def _():
    x, order, k = _entries("expand_rows", (7,), 4, 2)
    return _laid_out(x, (1, 0)), order, k


@case("sum_blocks", "feature-major")
def _():
    ys, order, sarea, areas, k = _entries("sum_blocks", (7,), 4, 2)
    return _laid_out(ys, (2, 0, 1)), order, sarea, areas, k


# ---------------------------------------------------------------- compact.py: compact_linear
# compact_linear(x, sorted_area, anchor, weight, bias, feedback, offs, areas, mode, input_block,
#                match_norm): x holds the sorted rows (input_block: each row's own block)
def _compact(lead, fin, n, k, mode, ib, fb, bias=True, match=False, dtype=D, empty=False):
    rows = 1
    for d in lead:
        rows *= d
    _, sarea, offs = ops.region_sort(_area((rows,), k, empty), k)
    w_shape, b_shape = ((k, n, fin), (k, n)) if mode == "replicate" else ((n, fin), (n,))
    x = _t(*lead, fin // k if ib else fin, dtype=dtype)
    return (x, sarea, _anchor(dtype), _t(*w_shape, dtype=dtype),
            _t(*b_shape, dtype=dtype) if bias else None, _fb(w_shape, fb, dtype), offs, k, mode,
            ib, match)


# rows <= 4 * areas take the per-row weight-block path ("few"); more rows the grouped matmul:
# a per-area loop in float64, torch's grouped_mm in float32 (CPU)
@case("compact_linear", "partition-few-fa")
def _():
    return _compact((6,), 8, 6, 3, "partition", False, "fa")


@case("compact_linear", "partition-input-block-loop-kp-match")
def _():
    return _compact((20,), 8, 6, 2, "partition", True, "kp", match=True)


@case("compact_linear", "partition-grouped-mm-float32")
def _():
    return _compact((16,), 8, 12, 3, "partition", False, "fa", match=True, dtype=torch.float32)


@case("compact_linear", "replicate-grouped-mm-float32-bp-empty-area")
def _():
    return _compact((2, 8), 8, 8, 3, "replicate", False, "bp", dtype=torch.float32, empty=True)


@case("compact_linear", "replicate-few-kp-nobias")
def _():
    return _compact((5,), 8, 4, 3, "replicate", False, "kp", bias=False)


@case("compact_linear", "dense-loop-fa-3d")
def _():
    return _compact((3, 6), 8, 5, 2, "dense", True, "fa")


# compact_linear_backward(grad, x, area, offs, weight, feedback, has_bias, areas, mode,
#                         input_block, match_norm, need_x, need_w, need_b)
def _compact_backward(fwd, has_bias, needs):
    x, sarea, _, w, _, fb, offs, k, mode, ib, match = fwd
    with torch.no_grad():
        g = torch.randn_like(ops.compact_linear(*fwd))
    return (g, *_detached(x), sarea, offs, *_detached(w, fb), has_bias, k, mode, ib, match,
            *needs)


@case("compact_linear_backward", "partition-few-all")
def _():
    return _compact_backward(_compact((6,), 8, 6, 3, "partition", False, "fa", match=True),
                             True, (True, True, True))


@case("compact_linear_backward", "partition-input-block-loop-all")
def _():
    return _compact_backward(_compact((20,), 8, 6, 2, "partition", True, "fa", match=True),
                             True, (True, True, True))


@case("compact_linear_backward", "replicate-grouped-mm-float32-w-and-b")
def _():
    return _compact_backward(_compact((16,), 8, 8, 3, "replicate", False, "bp",
                                      dtype=torch.float32), True, (False, True, True))


@case("compact_linear_backward", "transposed-weight-and-grad")
def _():
    fwd = list(_compact((16,), 8, 6, 2, "partition", False, "fa"))
    fwd[3] = _laid_out(fwd[3], (1, 0))
    g, *rest = _compact_backward(tuple(fwd), True, (True, True, True))
    return (_laid_out(g, (1, 0)), *rest)


@case("compact_linear_backward", "dense-loop-x-only-nobias")
def _():
    return _compact_backward(_compact((3, 6), 8, 5, 2, "dense", True, "fa"), False,
                             (True, False, False))


# ---------------------------------------------------------------- the tests
def registered_ops():
    """Every op in the dispatcher's salcompile:: namespace (after `import salcompile`)."""
    return sorted(n[len(PREFIX):] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith(PREFIX))


def declared_ops():
    """The @torch.library.custom_op("salcompile::...") definitions in salcompile's sources."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "salcompile", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            names.update(re.findall(r'custom_op\(\s*"salcompile::(\w+)"', f.read()))
    return sorted(names)


def test_the_enumeration_finds_every_declared_op():
    declared = declared_ops()
    assert "area_linear" in declared, declared   # the pattern still matches the sources
    missing = sorted(set(declared) - set(registered_ops()))
    assert not missing, f"declared in salcompile/ but not found in the dispatcher: {missing}"


def test_every_registered_op_has_a_case():
    covered = {c.op for c in CASES}
    missing = [n for n in registered_ops() if n not in covered]
    assert not missing, (
        f"salcompile:: op(s) without an opcheck case: {missing}. Add sample inputs for each to "
        f"CASES in tests/test_opcheck_all.py (a @case(...) builder per mode of the op).")
    stale = sorted(covered - set(registered_ops()))
    assert not stale, f"CASES names ops that are not registered (renamed or removed?): {stale}"


def _params():
    out = []
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, raises=KnownBug, reason=c.xfail)] \
            if c.xfail else []
        out.append(pytest.param(c, id=f"{c.op}-{c.id}", marks=marks))
    return out


def test_case_ids_are_unique():
    ids = [(c.op, c.id) for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("c", _params())
def test_opcheck(c):
    torch.manual_seed(0)
    args = c.build()
    kwargs = {} if c.test_utils is None else {"test_utils": tuple(c.test_utils)}
    try:
        torch.library.opcheck(getattr(ops, c.op).default, args, **kwargs)
    except OpCheckError as e:
        if c.xfail and c.match in str(e):
            raise KnownBug(str(e)) from e
        raise


# torch bugs met by a check above, keyed by (op, case id, dynamic): strict xfails, so that a torch
# that fixes them turns the case into an XPASS failure (then drop the entry).
AOT_XFAIL = {
    ("region_gate", "3d-float32", True):
        "torch bug, not salcompile's: functorch.compile.aot_function(dynamic=True) raises "
        "KeyError: s<N> in torch/fx/passes/_tensorify_python_scalars.py on a SymFloat made "
        "from a product of two sizes (the gate's backward divides by rows * temperature, rows "
        "= B*T for [B, T, F] features). Pure-torch repro: aot_function(lambda x: x * (1.0 / "
        "(x.reshape(-1).shape[0] * 0.2)), nop, nop, dynamic=True)(torch.randn(2, 3)). "
        "torch.compile(dynamic=True) of the same gate (aot_eager and inductor) works.",
}


def _gate_aot_params():
    out = []
    for c in CASES:
        if c.op in GATES:
            for dynamic in (False, True):
                reason = AOT_XFAIL.get((c.op, c.id, dynamic))
                marks = [pytest.mark.xfail(strict=True, raises=KnownBug, reason=reason)] \
                    if reason else []
                out.append(pytest.param(c, dynamic, marks=marks,
                                        id=f"{c.op}-{c.id}-{'dynamic' if dynamic else 'static'}"))
    return out


@pytest.mark.parametrize("c,dynamic", _gate_aot_params())
def test_gate_aot_dispatch(c, dynamic):
    """opcheck's test_aot_dispatch_{static,dynamic} for the gates (see NO_AOT), through the same
    torch helper with the gate's outputs swapped to (anchor, areas): the anchor's float sum comes
    first, so the harness's accumulator is a float. Checks the outputs and the local rule's
    gradient for proj, eager against AOTAutograd."""
    op = getattr(ops, c.op).default

    def anchor_first(*args):
        area, anchor = op(*pytree.tree_map_only(torch.Tensor, torch.clone, args))
        return anchor, area

    torch.manual_seed(0)
    try:
        aot_autograd_check(anchor_first, c.build(), {}, dynamic, check_gradients="auto")
    except KeyError as e:   # the torch bug of AOT_XFAIL
        if (c.op, c.id, dynamic) in AOT_XFAIL:
            raise KnownBug(repr(e)) from e
        raise
