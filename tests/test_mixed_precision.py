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


# ------------------------------------------------------------------ fp16 training (GradScaler)
from salcompile.errors import SalcompileError                       # noqa: E402
from salcompile.training import (Recipe, autocast, fit, make_grad_scaler,   # noqa: E402
                                 task_loss, _scaled_step)

CPU = torch.device("cpu")
# fit warns that float16 is slow on a CPU (checked once below); these tests run it on purpose
pytestmark = pytest.mark.filterwarnings("ignore:precision='fp16' on a CPU:UserWarning")


def _toy(n=96, features=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y.clamp_max(classes - 1)


def _sal(check_finite=False, areas=4):
    torch.manual_seed(0)
    return salcompile.transform(MLP(6, 32, 3, depth=3), (torch.randn(4, 6),), feedback="fa",
                                areas=areas, check_finite=check_finite)


def test_fit_fp16_trains_a_tiny_mlp_with_finite_loss():
    x, y = _toy()
    with pytest.warns(UserWarning, match="precision='fp16' on a CPU: .* use precision='bf16'"):
        rec = fit(_sal(), (x, y), (x, y), Recipe(lr=1e-2, batch=16, epochs=3), precision="fp16")
    assert all(torch.isfinite(torch.tensor(r.train_loss)) for r in rec)
    assert rec[-1].nonfinite == 0 and rec[-1].train_loss < rec[0].train_loss
    assert set(rec[0].extra) == {"skipped_steps", "loss_scale"}
    assert sum(r.extra["skipped_steps"] for r in rec) < 18 // 2      # most of the 18 steps ran
    assert next(iter(dict(_sal().named_parameters()).values())).dtype == torch.float32


def test_fp16_unscaled_gradients_match_fp32_within_float16_rounding():
    x, y = _toy(16)
    sal = _sal(areas=1)    # dense FA: no routing decision that rounding could flip
    sal.zero_grad()
    task_loss(sal(x), y).backward()
    want = {n: p.grad.clone() for n, p in sal.named_parameters() if p.grad is not None}

    opt = torch.optim.SGD(sal.parameters(), lr=0.1)
    scaler = make_grad_scaler(CPU, "fp16", torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    sal.zero_grad()
    with autocast(CPU, "fp16"):
        out = sal(x)
        loss = task_loss(out, y)
    assert out.dtype == torch.float16
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    got = {n: p.grad for n, p in sal.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n, g in want.items():
        assert got[n].dtype == torch.float32 and torch.isfinite(got[n]).all(), n
        # float16 keeps 11 significant bits (relative rounding 2**-11 per value), a few
        # roundings deep: each value within 1% of the fp32 one, or 2**-11 of the largest
        torch.testing.assert_close(got[n], g, rtol=1e-2, atol=2.0 ** -11 * float(g.abs().max()),
                                   msg=lambda m, n=n: f"{n}: {m}")
        assert _rel(got[n], g) < 5e-3, (n, _rel(got[n], g))


def test_fp16_skips_a_nonfinite_step_instead_of_corrupting_the_weights():
    x, y = _toy()
    bad = x.clone()
    bad[5] = float("nan")     # one batch per epoch has a NaN loss and NaN gradients
    recipe = Recipe(lr=1e-2, batch=16, epochs=2)
    rec32 = fit(_sal(areas=1), (bad, y), (x, y), recipe)
    assert rec32[-1].nonfinite > 0                         # fp32: the NaN step ruins the weights
    sal = _sal(areas=1)
    rec16 = fit(sal, (bad, y), (x, y), recipe, precision="fp16")
    assert all(r.nonfinite == 0 for r in rec16)            # fp16: the scaler skipped that step
    assert all(r.extra["skipped_steps"] >= 1 for r in rec16)
    assert all(torch.isfinite(p).all() for p in sal.parameters())
    assert rec16[-1].test_acc > 40


def test_fp16_with_check_finite_treats_scaled_overflow_as_a_skipped_step():
    x, y = _toy()
    # 2**30 overflows float16 in every layer's gradient: the guards see inf, the scaler backs off
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 30)
    rec = fit(_sal(check_finite=True), (x, y), (x, y), Recipe(lr=1e-2, batch=8, epochs=2),
              precision="fp16", grad_scaler=scaler)
    assert rec[0].extra["skipped_steps"] >= 5 and rec[-1].extra["loss_scale"] < 2.0 ** 20
    assert all(torch.isfinite(torch.tensor(r.train_loss)) for r in rec) and rec[-1].nonfinite == 0


def test_fp16_check_finite_raises_a_real_nonfinite_gradient_at_scale_1():
    x, y = _toy(16)
    sal = _sal(check_finite=True)
    opt = torch.optim.SGD(sal.parameters(), lr=0.1)

    def loss():   # a gradient of 1e6 per output: beyond float16's 65504 even unscaled
        with autocast(CPU, "fp16"):
            return sal(x).float().sum() * 1e6

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    before = [p.detach().clone() for p in sal.parameters()]
    assert _scaled_step(loss(), opt, scaler) is False and scaler.get_scale() == 1.0
    assert all(torch.equal(a, p) for a, p in zip(before, sal.parameters()))
    with pytest.raises(SalcompileError, match=r"gradient reaching layer .*loss scale 1\b"):
        _scaled_step(loss(), opt, scaler)


def test_fp16_forward_overflow_still_raises_under_check_finite():
    x, y = _toy()
    bad = x.clone()
    bad[0] = float("nan")
    with pytest.raises(SalcompileError, match="non-finite value in the model input"):
        fit(_sal(check_finite=True), (bad, y), (x, y), Recipe(epochs=1), precision="fp16")


def test_fp16_argument_errors():
    x, y = _toy(32)
    with pytest.raises(SalcompileError, match="grad_scaler is for precision='fp16'"):
        fit(_sal(), (x, y), (x, y), Recipe(epochs=1), precision="bf16",
            grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(SalcompileError, match="must be a torch.amp.GradScaler"):
        fit(_sal(), (x, y), (x, y), Recipe(epochs=1), precision="fp16", grad_scaler=2.0)
    with pytest.raises(SalcompileError, match="precision='fp8'; choose one of fp32, bf16, fp16"):
        fit(_sal(), (x, y), (x, y), Recipe(epochs=1), precision="fp8")
    assert make_grad_scaler(CPU, "fp32") is None and make_grad_scaler(CPU, "bf16") is None
    with pytest.raises(SalcompileError, match="cpu and cuda, not meta"):
        make_grad_scaler(torch.device("meta"), "fp16")


def test_cli_train_precision_fp16(capsys, recwarn):
    from salcompile.cli import main
    code = main(["train", "--model", "mlp", "--model-args", '{"hidden": 16}', "--data", "iris",
                 "--areas", "1", "--epochs", "2", "--precision", "fp16", "--no-progress",
                 "--no-alignment"])
    captured = capsys.readouterr()
    assert code == 0 and "epoch   2/2" in captured.out and "NONFINITE" not in captured.out
    assert captured.err.count("--precision fp16 on a CPU") == 1    # a note, not also a warning
    assert not [w for w in recwarn if "fp16" in str(w.message)]
