"""The eager fast path (salcompile/ops/fast.py): a transformed module run eagerly calls each
salcompile op's own implementation under a small autograd.Function instead of going through the
dispatcher. Same functions, so the same numbers bit for bit; taken only in plain eager mode."""
import copy

import pytest
import torch
import torch.nn.functional as F

import salcompile
from salcompile.models import MLP
from salcompile.ops import fast

CASES = {
    "fa dense": dict(areas=1),
    "sal partition": dict(areas=4),
    "sal partition unfused": dict(areas=4, fuse_regions=False),
    "sal replicate": dict(areas=4, area_mode="replicate"),
    "dfa": dict(areas=4, feedback="dfa"),
    "kp": dict(areas=1, feedback="kp"),
    "reference": dict(areas=4, area_impl="reference"),
}


def _step_grads(sal, x, y):
    sal.zero_grad(set_to_none=True)
    out = sal(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in sal.named_parameters()
                          if p.grad is not None}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rows", [6, 40])   # few rows per area, and the grouped path
def test_fast_path_equals_dispatch_bit_for_bit(case, rows, monkeypatch, compact_regions):
    torch.manual_seed(0)
    x, y = torch.randn(rows, 8, dtype=torch.float64), torch.randint(0, 3, (rows,))
    sal = salcompile.transform(MLP(8, 16, 3, depth=3).double(), (x,), **CASES[case])
    other = copy.deepcopy(sal)
    calls = []
    real = fast.eager_forward
    monkeypatch.setattr(fast, "eager_forward", lambda m: calls.append(m) or real(m))
    out_fast, g_fast = _step_grads(sal, x, y)
    assert calls, "the eager fast path was not taken"
    monkeypatch.setattr(fast, "ENABLED", False)
    calls.clear()
    out_ref, g_ref = _step_grads(other, x, y)
    assert not calls
    assert torch.equal(out_fast, out_ref)
    assert g_fast.keys() == g_ref.keys() and g_fast
    for name in g_fast:
        assert torch.equal(g_fast[name], g_ref[name]), name


def test_hooks_autocast_and_no_grad():
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    sal = salcompile.transform(MLP(8, 16, 3), (x,), areas=4)
    assert fast.plain_eager()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast.plain_eager()
        assert sal(x).dtype == torch.bfloat16   # the ops' Autocast kernels ran
    seen = []
    h = sal.register_forward_hook(lambda m, i, o: seen.append(o))
    sal(x)
    h.remove()
    assert len(seen) == 1                       # hooks run: the module's own __call__ path
    with torch.no_grad():
        torch.testing.assert_close(sal(x), sal(x))


def test_cached_feedback_norm_follows_in_place_changes():
    """‖B‖ of a fixed B is cached per version: an in-place change of B is seen at once."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    sal = salcompile.transform(MLP(8, 16, 3).double(), (x,), areas=4)
    _step_grads(sal, x, y)
    with torch.no_grad():
        for name, b in sal.named_buffers():
            if name.endswith("_feedback"):
                b.mul_(3.0).add_(0.1)
    ref = copy.deepcopy(sal)          # no cache entries for the copy's buffers yet
    _, g1 = _step_grads(sal, x, y)    # its cache entries are stale by version: recomputed
    _, g2 = _step_grads(ref, x, y)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_compiled_module_does_not_take_the_fast_path(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    sal = salcompile.transform(MLP(8, 16, 3), (x,), areas=4)
    calls = []
    real = fast.eager_forward
    monkeypatch.setattr(fast, "eager_forward", lambda m: calls.append(m) or real(m))
    compiled = salcompile.compile(sal, backend="aot_eager")
    torch.testing.assert_close(compiled(x), sal(x))
    assert len(calls) == 1   # the eager call only
