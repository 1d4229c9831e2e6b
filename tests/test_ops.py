"""Each FA op against autograd: dX = ∂⟨g, f(x, B)⟩/∂x and dW = ∂⟨g, f(x, W)⟩/∂W (f bilinear)."""
import pytest
import torch
import torch.nn.functional as F

import salcompile  # noqa: F401  (registers the ops)

ops = torch.ops.salcompile
D = torch.float64


def _check(fa_call, ref, x_shape, w_shape):
    x = torch.randn(x_shape, dtype=D, requires_grad=True)
    w = torch.randn(w_shape, dtype=D, requires_grad=True)
    b = torch.randn(w_shape, dtype=D)
    y = fa_call(x, w, b)
    torch.testing.assert_close(y, ref(x, w))
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    xr = x.detach().requires_grad_()
    (ex,) = torch.autograd.grad(ref(xr, b), xr, g)
    (ew,) = torch.autograd.grad(ref(x.detach(), w), w, g)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)


@pytest.mark.parametrize("x_shape", [(5, 4), (2, 3, 4), (4,)])
def test_fa_linear(x_shape):
    bias = torch.randn(6, dtype=D)
    _check(lambda x, w, b: ops.fa_linear(x, w, bias, b, False),
           lambda x, w: F.linear(x, w, bias), x_shape, (6, 4))


CONVS = [  # x shape, w shape, stride, padding, dilation, transposed, output_padding, groups
    ((2, 4, 9), (6, 2, 3), [2], [1], [1], False, [0], 2),
    ((2, 3, 7, 7), (4, 3, 3, 3), [1, 2], [1, 0], [2, 1], False, [0, 0], 1),
    ((2, 4, 6, 6), (4, 1, 3, 3), [1, 1], [1, 1], [1, 1], False, [0, 0], 4),   # depthwise
    ((3, 7, 7), (4, 3, 3, 3), [1, 1], [0, 0], [1, 1], False, [0, 0], 1),       # unbatched
    ((1, 2, 3, 4, 4), (3, 2, 1, 2, 2), [1, 1, 1], [0, 1, 1], [1, 1, 1], False, [0, 0, 0], 1),
    ((2, 4, 5, 5), (4, 3, 3, 3), [2, 2], [1, 1], [1, 1], True, [1, 0], 1),     # transposed
    ((2, 4, 5), (4, 1, 3), [2], [0], [1], True, [1], 2),                       # grouped transposed
]


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,transposed,out_pad,groups", CONVS)
def test_fa_conv(xs, ws, stride, padding, dilation, transposed, out_pad, groups):
    def ref(x, w):
        unb = x.dim() == len(stride) + 1
        x = x.unsqueeze(0) if unb else x
        y = torch.ops.aten.convolution(x, w, None, stride, padding, dilation, transposed, out_pad,
                                       groups)
        return y.squeeze(0) if unb else y
    _check(lambda x, w, b: ops.fa_conv(x, w, None, b, stride, padding, dilation, transposed,
                                       out_pad, groups, False), ref, xs, ws)


@pytest.mark.parametrize("x_shape,w_shape,weight_first", [
    ((5, 4), (4, 3), False), ((2, 5, 4), (4, 3), False), ((4,), (4, 3), False),
    ((2, 5, 4), (2, 4, 3), False),            # bmm-like, batched weight
    ((3, 4, 2), (5, 4), True), ((4,), (5, 4), True),
])
def test_fa_matmul(x_shape, w_shape, weight_first):
    ref = (lambda x, w: torch.matmul(w, x)) if weight_first else (lambda x, w: torch.matmul(x, w))
    _check(lambda x, w, b: ops.fa_matmul(x, w, b, weight_first, False), ref, x_shape, w_shape)


@pytest.mark.parametrize("eq,x_shape,w_shape,weight_first", [
    ("bi,oi->bo", (5, 4), (3, 4), False),
    ("bti,ijk->bj", (2, 3, 4), (4, 5, 6), False),   # t and k summed away in one operand
    ("oi,bti->bto", (2, 5, 4), (3, 4), True),
])
def test_fa_einsum(eq, x_shape, w_shape, weight_first):
    def ref(x, w):
        return torch.einsum(eq, w, x) if weight_first else torch.einsum(eq, x, w)
    _check(lambda x, w, b: ops.fa_einsum(eq, x, w, b, weight_first, False), ref, x_shape, w_shape)


def test_match_norm_rescales_feedback_to_the_weight_norm():
    x = torch.randn(5, 4, dtype=D, requires_grad=True)
    w = torch.randn(6, 4, dtype=D, requires_grad=True)
    b = torch.randn(6, 4, dtype=D) * 10
    y = ops.fa_linear(x, w, None, b, True)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g @ (b * w.norm() / b.norm()))


def test_dfa_output_delivers_error_times_d():
    y = torch.randn(4, 3, dtype=D, requires_grad=True)
    taps = [torch.randn(4, 5, dtype=D, requires_grad=True),
            torch.randn(4, 2, 3, dtype=D, requires_grad=True)]
    ds = [torch.randn(3, 5, dtype=D), torch.randn(3, 6, dtype=D)]
    out = ops.dfa_output(y, taps, ds)
    torch.testing.assert_close(out, y)
    e = torch.randn_like(out)
    gy, g0, g1 = torch.autograd.grad(out, [y] + taps, e)
    torch.testing.assert_close(gy, e)
    torch.testing.assert_close(g0, e @ ds[0])
    torch.testing.assert_close(g1, (e @ ds[1]).reshape(4, 2, 3))
