"""Area ops: the fast sorted path against the masked-dense reference, and both against oracles."""
import pytest
import torch
import torch.nn.functional as F

# Importing the module registers the area ops (and, through its import of fa, the FA ops).
from salcompile.ops.areas import area_conv_reference, area_linear_reference
from conftest import D, loss_of

ops = torch.ops.salcompile


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _areas(shape, k, pattern):
    """random: any area; empty: area k-1 gets no row; one: every row in area k-1."""
    if pattern == "one":
        return torch.full(shape, k - 1, dtype=torch.long)
    return torch.randint(0, max(1, k - 1) if pattern == "empty" else k, shape)


def _params(w_shape, b_shape, fb):
    w = torch.randn(w_shape, dtype=D, requires_grad=True)
    b = torch.randn(b_shape, dtype=D, requires_grad=True)
    feedback = None if fb == "bp" else torch.randn(w_shape, dtype=D)
    return w, b, feedback, fb == "fa_match"


def _run(fn, x, area, w, b, *args):
    """[output, the loss gradients of whichever of x, W, b require grad]; the anchor's gradient
    is checked to be exact zeros."""
    anchor = torch.zeros((), dtype=D, requires_grad=True)
    out = fn(x, area, anchor, w, b, *args)
    inputs = [t for t in (x, w, b, anchor) if t is not None and t.requires_grad]
    gs = torch.autograd.grad(loss_of(out), inputs)
    ga = gs[-1]
    assert ga is not None and ga.shape == anchor.shape and not ga.any()
    return [out.detach(), *gs[:-1]]


def _assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-11)


def _both(fast, ref, *args):
    r = _run(ref, *args)
    _assert_same(_run(fast, *args), r)
    return r


# ---------------------------------------------------------------- fast ≡ reference, linear
LINEAR = [  # x shape, area dims, out width N, areas K, mode, input_block
    ((6, 8), 1, 8, 4, "partition", False),
    ((6, 8), 1, 8, 2, "partition", True),
    ((3, 4, 8), 1, 6, 2, "partition", False),      # per sample
    ((3, 4, 8), 2, 8, 4, "partition", True),       # per token
    ((2, 3, 2, 8), 2, 4, 2, "partition", False),   # area over a 2-d prefix of a 4-d x
    ((6, 8), 1, 5, 3, "replicate", False),
    ((3, 4, 8), 2, 5, 4, "replicate", False),
    ((6, 8), 1, 5, 2, "dense", True),
    ((3, 4, 8), 1, 5, 4, "dense", True),
    ((1, 8), 1, 8, 4, "partition", True),          # batch size 1
    ((5, 8), 1, 6, 1, "partition", False),         # K = 1
    ((5, 8), 1, 6, 1, "replicate", False),
]


def _linear_args(x_shape, area_dims, n, k, mode, input_block, fb, pattern="random"):
    x = torch.randn(x_shape, dtype=D, requires_grad=True)
    area = _areas(x_shape[:area_dims], k, pattern)
    fin = x_shape[-1]
    w_shape, b_shape = ((k, n, fin), (k, n)) if mode == "replicate" else ((n, fin), (n,))
    w, b, feedback, match = _params(w_shape, b_shape, fb)
    return x, area, w, b, feedback, k, mode, input_block, match


@pytest.mark.parametrize("fb", ["bp", "fa", "fa_match"])
@pytest.mark.parametrize("case", LINEAR)
def test_linear_fast_equals_reference(case, fb):
    _both(ops.area_linear, area_linear_reference, *_linear_args(*case, fb))


@pytest.mark.parametrize("pattern", ["empty", "one"])
@pytest.mark.parametrize("case", [LINEAR[1], LINEAR[3], LINEAR[6], LINEAR[8]])
def test_linear_empty_area_and_single_area(case, pattern):
    _both(ops.area_linear, area_linear_reference, *_linear_args(*case, "fa_match", pattern))


# ---------------------------------------------------------------- fast ≡ reference, conv
CONVS = [  # x shape, Cout, kernel, stride, padding, dilation, groups, K, mode, input_block
    ((4, 4, 6, 6), 8, (3, 3), [1, 1], [1, 1], [1, 1], 1, 2, "partition", False),
    ((4, 4, 6, 6), 8, (3, 3), [2, 1], [0, 1], [1, 2], 1, 4, "partition", True),
    ((5, 4, 9), 6, (3,), [2], [1], [1], 1, 2, "partition", False),                 # conv1d
    ((5, 4, 9), 6, (3,), [1], [0], [2], 1, 2, "partition", True),
    ((2, 2, 3, 4, 4), 4, (1, 2, 2), [1, 1, 1], [0, 1, 1], [1, 1, 1], 1, 2, "partition", True),
    ((4, 3, 5, 5), 4, (3, 3), [1, 1], [1, 1], [1, 1], 1, 3, "replicate", False),
    ((4, 4, 5, 5), 6, (3, 3), [1, 1], [1, 1], [1, 1], 2, 3, "replicate", False),   # grouped
    ((4, 4, 5, 5), 6, (3, 3), [1, 1], [1, 1], [1, 1], 1, 2, "dense", True),
    ((4, 8, 5, 5), 8, (3, 3), [1, 1], [1, 1], [1, 1], 4, 2, "partition", False),   # groups % K
    ((4, 8, 5, 5), 8, (3, 3), [1, 1], [1, 1], [1, 1], 8, 4, "partition", True),    # depthwise
    ((1, 4, 5, 5), 4, (3, 3), [1, 1], [1, 1], [1, 1], 1, 4, "partition", True),    # batch 1
    ((3, 3, 5, 5), 4, (3, 3), [1, 1], [1, 1], [1, 1], 1, 1, "partition", False),   # K = 1
]


def _conv_args(xs, cout, kernel, stride, padding, dilation, groups, k, mode, input_block, fb,
               pattern="random"):
    x = torch.randn(xs, dtype=D, requires_grad=True)
    area = _areas(xs[:1], k, pattern)
    w_shape = (cout, xs[1] // groups, *kernel)
    w_shape, b_shape = ((k, *w_shape), (k, cout)) if mode == "replicate" else (w_shape, (cout,))
    w, b, feedback, match = _params(w_shape, b_shape, fb)
    return (x, area, w, b, feedback, stride, padding, dilation, groups, k, mode, input_block,
            match)


@pytest.mark.parametrize("fb", ["bp", "fa", "fa_match"])
@pytest.mark.parametrize("case", CONVS)
def test_conv_fast_equals_reference(case, fb):
    _both(ops.area_conv, area_conv_reference, *_conv_args(*case, fb))


@pytest.mark.parametrize("pattern", ["empty", "one"])
@pytest.mark.parametrize("case", [CONVS[1], CONVS[5], CONVS[9]])
def test_conv_empty_area_and_single_area(case, pattern):
    _both(ops.area_conv, area_conv_reference, *_conv_args(*case, "fa_match", pattern))


# Every area gets rows: the fast backward then writes each weight block exactly once (no
# zero fill when the blocks cover the weight). x non-contiguous: the block gather reshapes.
@pytest.mark.parametrize("fb", ["bp", "fa_match"])
@pytest.mark.parametrize("case", [LINEAR[0], LINEAR[1], LINEAR[5], LINEAR[7]])
def test_linear_every_area_has_rows(case, fb):
    x, area, w, b, feedback, k, mode, input_block, match = _linear_args(*case, fb)
    area = torch.arange(area.numel()).reshape(area.shape) % k
    xt = torch.randn(x.shape[::-1], dtype=D).t().requires_grad_()
    _both(ops.area_linear, area_linear_reference, xt, area, w, b, feedback, k, mode,
          input_block, match)


@pytest.mark.parametrize("case", [CONVS[0], CONVS[5], CONVS[7], CONVS[9]])
def test_conv_every_area_has_rows(case):
    args = list(_conv_args(*case, "fa_match"))
    args[1] = torch.arange(args[1].numel()) % case[7]
    _both(ops.area_conv, area_conv_reference, *args)


# ---------------------------------------------------------------- oracles
@pytest.mark.parametrize("fn", [ops.area_linear, area_linear_reference])
def test_linear_one_area_is_f_linear(fn):
    x, area, w, b, *_ = _linear_args((3, 4, 8), 1, 6, 1, "partition", False, "bp")
    got = _run(fn, x, area, w, b, None, 1, "partition", False, False)
    _assert_same(got, _run(lambda x, a, an, w, b: F.linear(x, w, b) + 0 * an, x, area, w, b))


@pytest.mark.parametrize("fn", [ops.area_conv, area_conv_reference])
def test_conv_one_area_is_f_conv2d(fn):
    args = _conv_args(*CONVS[1][:6], 1, 1, "partition", False, "bp")
    x, area, w, b = args[:4]
    got = _run(fn, *args[:4], None, *args[5:])
    expect = _run(lambda x, a, an, w, b: F.conv2d(x, w, b, [2, 1], [0, 1], [1, 2]) + 0 * an,
                  x, area, w, b)
    _assert_same(got, expect)


@pytest.mark.parametrize("fn", [ops.area_linear, area_linear_reference])
def test_replicate_of_equal_copies_is_dense(fn):
    k = 3
    x = torch.randn(4, 5, 8, dtype=D, requires_grad=True)
    area = torch.randint(0, k, (4, 5))
    w0, b0 = torch.randn(6, 8, dtype=D), torch.randn(6, dtype=D)
    w = w0.expand(k, 6, 8).clone().requires_grad_()
    b = b0.expand(k, 6).clone().requires_grad_()
    out, gx, gw, gb = _run(fn, x, area, w, b, None, k, "replicate", False, False)
    w0.requires_grad_(), b0.requires_grad_()
    eout, egx, egw, egb = _run(lambda x, a, an, w, b: F.linear(x, w, b) + 0 * an, x, area, w0,
                               b0)
    _assert_same([out, gx, gw.sum(0), gb.sum(0)], [eout, egx, egw, egb])


@pytest.mark.parametrize("case", [LINEAR[3], LINEAR[6], LINEAR[8]])
@pytest.mark.parametrize("fn", [ops.area_linear, area_linear_reference])
def test_fa_with_feedback_equal_to_weight_is_bp(fn, case):
    x, area, w, b, _, *rest, _ = _linear_args(*case, "bp")
    fa = _run(fn, x, area, w, b, w.detach().clone(), *rest, False)
    _assert_same(fa, _run(fn, x, area, w, b, None, *rest, False))


@pytest.mark.parametrize("fn", [ops.area_conv, area_conv_reference])
def test_conv_fa_with_feedback_equal_to_weight_is_bp(fn):
    x, area, w, b, _, *rest, _ = _conv_args(*CONVS[1], "bp")
    fa = _run(fn, x, area, w, b, w.detach().clone(), *rest, False)
    _assert_same(fa, _run(fn, x, area, w, b, None, *rest, False))


def test_match_norm_rescales_each_area_by_its_own_blocks():
    x = torch.randn(6, 8, dtype=D, requires_grad=True)
    area = torch.tensor([0, 1, 1, 0, 1, 0])
    w = torch.randn(4, 8, dtype=D, requires_grad=True)
    fb = torch.randn(4, 8, dtype=D)
    fb[2:] *= 10            # area 1's feedback block is 10× larger
    y = ops.area_linear(x, area, torch.zeros((), dtype=D), w, None, fb, 2, "partition", True,
                        True)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    expect = torch.zeros_like(x)
    for k, (r, c) in enumerate([(slice(0, 2), slice(0, 4)), (slice(2, 4), slice(4, 8))]):
        rows = area == k
        bk = fb[r, c] * w[r, c].norm() / fb[r, c].norm()
        expect[rows, c] = g[rows, r] @ bk.detach()
    torch.testing.assert_close(gx, expect)


# ---------------------------------------------------------------- selective updates
SELECTIVE = [  # mode, input_block, weight shape, mask of area k's weight block
    ("partition", False, (8, 8), lambda m, k: m[2 * k:2 * k + 2].fill_(1)),
    ("partition", True, (8, 8), lambda m, k: m[2 * k:2 * k + 2, 2 * k:2 * k + 2].fill_(1)),
    ("replicate", False, (4, 8, 8), lambda m, k: m[k].fill_(1)),
    ("dense", True, (8, 8), lambda m, k: m[:, 2 * k:2 * k + 2].fill_(1)),
]


@pytest.mark.parametrize("fn", [ops.area_linear, area_linear_reference])
@pytest.mark.parametrize("mode,input_block,w_shape,block", SELECTIVE)
def test_selective_updates_linear(fn, mode, input_block, w_shape, block):
    k = 2
    x = torch.randn(5, 3, 8, dtype=D)
    w = torch.randn(w_shape, dtype=D, requires_grad=True)
    b = torch.randn(w_shape[:-1], dtype=D, requires_grad=True)
    area = torch.full((5, 3), k)
    out, gw, gb = _run(fn, x, area, w, b, torch.randn(w_shape, dtype=D), 4, mode, input_block,
                       True)
    mask = torch.zeros(w_shape, dtype=torch.bool)
    block(mask, k)
    assert gw[mask].ne(0).all() and gw[~mask].eq(0).all()
    bmask = mask.any(-1)
    assert gb[bmask].ne(0).all() and gb[~bmask].eq(0).all()
    if mode == "partition":   # outputs outside area k's block are exactly zero
        assert out[..., bmask].ne(0).all() and out[..., ~bmask].eq(0).all()


@pytest.mark.parametrize("fn", [ops.area_conv, area_conv_reference])
@pytest.mark.parametrize("groups,input_block", [(1, True), (4, False)])
def test_selective_updates_conv(fn, groups, input_block):
    x = torch.randn(3, 4, 5, 5, dtype=D)
    w = torch.randn(8, 4 // groups, 3, 3, dtype=D, requires_grad=True)
    b = torch.randn(8, dtype=D, requires_grad=True)
    _, gw, gb = _run(fn, x, torch.ones(3, dtype=torch.long), w, b, None, [1, 1], [1, 1],
                     [1, 1], groups, 2, "partition", input_block, False)
    mask = torch.zeros(w.shape, dtype=torch.bool)
    if groups == 1:
        mask[4:, 2:] = True      # output block 1 × input block 1
    else:
        mask[4:] = True          # grouped: output block 1 already reads input block 1 only
    assert gw[mask].ne(0).all() and gw[~mask].eq(0).all()
    assert gb[4:].ne(0).all() and gb[:4].eq(0).all()


# ---------------------------------------------------------------- needs_input_grad, compile, errors
@pytest.mark.parametrize("grad_of", ["x", "w", "b"])
def test_only_the_needed_gradients(grad_of):
    x, area, w, b, *rest = _linear_args((4, 8), 1, 6, 2, "partition", False, "fa_match")
    for t, name in ((x, "x"), (w, "w"), (b, "b")):
        t.requires_grad_(name == grad_of)
    _both(ops.area_linear, area_linear_reference, x, area, w, b, *rest)
    cx, carea, cw, cb, *crest = _conv_args(*CONVS[0], "fa")
    for t, name in ((cx, "x"), (cw, "w"), (cb, "b")):
        t.requires_grad_(name == grad_of)
    _both(ops.area_conv, area_conv_reference, cx, carea, cw, cb, *crest)


def test_compiled_fullgraph_matches_eager():
    def f(x, area, anchor, w, b, fb):
        return torch.tanh(ops.area_linear(x, area, anchor, w, b, fb, 2, "partition", True, True))

    args = _linear_args((3, 4, 8), 2, 6, 2, "partition", True, "fa_match")
    x, area, w, b, fb = args[:5]
    compiled = torch.compile(f, fullgraph=True)
    _assert_same(_run(lambda *a: compiled(*a, fb), x, area, w, b),
                 _run(lambda *a: f(*a, fb), x, area, w, b))


def test_fake_tensor_registrations():
    from torch.library import opcheck
    args = _linear_args((3, 4, 8), 1, 6, 2, "partition", True, "fa_match")
    x, area, w, b, fb, k, mode, ib, match = args
    opcheck(ops.area_linear, (x, area, torch.zeros((), dtype=D, requires_grad=True), w, b, fb,
                              k, mode, ib, match))
    g = torch.randn(3, 4, 6, dtype=D)
    # The backward ops are not differentiable themselves (no double backward): detached inputs.
    opcheck(ops.area_linear_backward, (g, x.detach(), area, w.detach(), fb, True, k, mode, ib,
                                       match, True, False, True))
    cargs = _conv_args(*CONVS[9], "fa")
    opcheck(ops.area_conv, (*cargs[:2], torch.zeros((), dtype=D, requires_grad=True),
                            *cargs[2:]))
    g = torch.randn(4, 8, 5, 5, dtype=D)
    opcheck(ops.area_conv_backward, (g, cargs[0].detach(), cargs[1], cargs[2].detach(),
                                     *cargs[4:9], True, *cargs[9:], False, True, True))


def test_float32():
    x, area, w, b, fb, *rest = _linear_args((3, 4, 8), 2, 8, 4, "partition", True, "fa_match")
    x, w, b, fb = (t.detach().float().requires_grad_(t.requires_grad) for t in (x, w, b, fb))
    anchor = torch.zeros((), requires_grad=True)
    outs = [fn(x, area, anchor, w, b, fb, *rest) for fn in (ops.area_linear,
                                                           area_linear_reference)]
    assert outs[0].dtype == torch.float32
    g = [torch.autograd.grad(loss_of(y), (x, w, b, anchor)) for y in outs]
    torch.testing.assert_close(outs[0], outs[1])
    for u, v in zip(*g):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("mode,input_block,w_shape,groups,k", [
    ("replicate", True, (2, 4, 8), 1, 2),
    ("dense", False, (4, 8), 1, 2),
    ("bogus", False, (4, 8), 1, 2),
    ("partition", False, (6, 8), 1, 4),       # 6 outputs, 4 areas
    ("dense", True, (4, 6), 1, 4),            # 6 inputs, 4 areas
    ("replicate", False, (3, 4, 8), 1, 2),    # 3 copies, 2 areas
])
def test_invalid_linear_configs(mode, input_block, w_shape, groups, k):
    x = torch.randn(3, w_shape[-1], dtype=D)
    for fn in (ops.area_linear, area_linear_reference):
        with pytest.raises(ValueError):
            fn(x, torch.zeros(3, dtype=torch.long), torch.zeros(()), torch.randn(w_shape),
               None, None, k, mode, input_block, False)


def test_invalid_conv_and_area_values():
    x, w = torch.randn(2, 6, 5, 5), torch.randn(6, 2, 3, 3)   # groups 3
    for fn in (ops.area_conv, area_conv_reference):
        for mode, ib in (("partition", False), ("dense", True)):
            with pytest.raises(ValueError):
                fn(x, torch.zeros(2, dtype=torch.long), torch.zeros(()), w, None, None,
                   [1, 1], [1, 1], [1, 1], 3, 2, mode, ib, False)
    with pytest.raises(ValueError):
        ops.area_linear(torch.randn(3, 4), torch.tensor([0, 2, 1]), torch.zeros(()),
                        torch.randn(4, 4), None, None, 2, "partition", False, False)
