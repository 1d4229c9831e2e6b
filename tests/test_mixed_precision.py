"""Mixed precision: under torch.autocast the FA, DFA, KP and SAL area ops run in the autocast dtype
(as aten's layers do), parameters and their gradients stay float32, and the gradients are close
to the float32 ones."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salcompile
from salcompile.models import MLP


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


CASES = [   # (model, input shape, SALConfig fields)
    ("mlp", (6,), dict(feedback="fa", areas=1)),
    ("mlp", (6,), dict(feedback="fa", areas=4)),
    ("mlp", (6,), dict(feedback="fa", areas=4, fuse_regions=False)),
    ("mlp", (6,), dict(feedback="fa", areas=4, area_mode="replicate")),
    ("mlp", (6,), dict(feedback="dfa", areas=1)),
    ("mlp", (6,), dict(feedback="kp", areas=4)),
    ("mlp", (6,), dict(feedback="usf", areas=1)),
    ("cnn", (1, 6, 6), dict(feedback="fa", areas=1)),
    ("cnn", (1, 6, 6), dict(feedback="fa", areas=4)),
]


def _build(name, shape, fields):
    torch.manual_seed(0)
    model = MLP(6, 32, 3, depth=3) if name == "mlp" else _CNN()
    x = torch.randn((16,) + shape)
    return salcompile.transform(model, (x,), **fields), x, torch.randint(0, 3, (16,))


def _grads(sal, x, y, dtype=None):
    sal.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = sal(x)
        loss = F.cross_entropy(out.float(), y)
    loss.backward()
    return out, {n: p.grad.clone() for n, p in sal.named_parameters() if p.grad is not None}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("name,shape,fields", CASES,
                         ids=[f"{c[0]}-" + "-".join(f"{v}" for v in c[2].values()) for c in CASES])
def test_autocast_runs_the_layers_in_bfloat16_with_float32_like_gradients(name, shape, fields):
    sal, x, y = _build(name, shape, fields)
    out32, want = _grads(sal, x, y)
    out16, got = _grads(sal, x, y, torch.bfloat16)
    assert out32.dtype == torch.float32 and out16.dtype == torch.bfloat16   # autocast took effect
    assert got.keys() == want.keys()
    for n, g in want.items():
        assert got[n].dtype == torch.float32, n
        if g.norm() > 1e-6:
            assert _rel(got[n], g) < 0.05, (n, _rel(got[n], g))
    if fields["feedback"] == "kp":   # B still receives W's gradient, in float32
        for l in sal.sal_plan.layers:
            assert torch.equal(got[l.feedback_buffer], got[l.weight])


def test_autocast_float16_on_cpu():
    sal, x, y = _build("mlp", (6,), dict(feedback="fa", areas=4))
    _, want = _grads(sal, x, y)
    out, got = _grads(sal, x, y, torch.float16)
    assert out.dtype == torch.float16
    for n, g in want.items():
        if g.norm() > 1e-6:
            assert _rel(got[n], g) < 0.02, n


def test_autocast_under_salcompile_compile():
    sal, x, y = _build("mlp", (6,), dict(feedback="fa", areas=4))
    _, eager = _grads(sal, x, y, torch.bfloat16)
    torch._dynamo.reset()
    compiled = salcompile.compile(sal)
    compiled.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
        loss = F.cross_entropy(out.float(), y)
    loss.backward()
    assert out.dtype == torch.bfloat16
    for n, p in sal.named_parameters():
        if n in eager and eager[n].norm() > 1e-6:
            assert _rel(p.grad, eager[n]) < 0.02, n
