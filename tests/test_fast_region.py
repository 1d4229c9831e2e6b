"""The few-rows region path (salcompile/ops/fast_region.py): on the eager fast path a fused region
with few rows runs masked-dense in one autograd.Function. Oracle: the same module with the path
off (the compact ops one by one), over several Adam steps, in float64; and that the path was
taken (or not) where it should be."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import salcompile
from salcompile.models import MLP
from salcompile.ops import fast, fast_region

pytestmark = pytest.mark.usefixtures("one_thread")


class Act(nn.Module):
    """in -> hidden -> hidden -> out with a chosen activation; tokens [B, T, F] when 3-D."""

    def __init__(self, act, widths=(8, 16, 16, 3)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.act = act

    def forward(self, x):
        for l in self.layers[:-1]:
            x = self.act(l(x))
        return self.layers[-1](x)


class Head(nn.Module):
    """One gated partition layer whose block-sparse output leaves the region (scatter_blocks),
    then a plain layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.sigmoid(self.body(x)))


MODELS = {
    "mlp (paper)": (lambda: MLP(8, 16, 3), {}),
    "mlp depth 3": (lambda: MLP(8, 16, 3, depth=3), {}),
    "gelu": (lambda: Act(F.gelu), {}),
    "silu": (lambda: Act(F.silu), {}),
    "tanh": (lambda: Act(torch.tanh), {}),
    "leaky relu": (lambda: Act(nn.LeakyReLU(0.2)), {}),
    "kolen-pollack": (lambda: MLP(8, 16, 3, depth=3), dict(feedback="kp")),
    "feedback as drawn": (lambda: MLP(8, 16, 3, depth=3), dict(feedback_scale="none")),
    "scatter exit": (lambda: Head(), {}),
}


def _pair(build, config, x):
    torch.manual_seed(1)
    sal = salcompile.transform(build().double(), (x,), areas=4, **config)
    ref = copy.deepcopy(sal)
    real = fast_region.ENABLED
    try:   # the reference renders its eager forward with the path off (cached per class)
        fast_region.ENABLED = False
        fast.eager_forward(ref)
    finally:
        fast_region.ENABLED = real
    return sal, ref


def _regions(module) -> int:
    return sum(n.target is torch.ops.salcompile.region_sort.default for n in module.graph.nodes)


def _run_and_compare(sal, ref, x, y, steps=3):
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (sal, ref)]
    for step in range(steps):
        outs, grads = [], []
        for m in (sal, ref):
            m.zero_grad(set_to_none=True)
            out = m(x)
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
            outs.append(out.detach())
            grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for n in grads[1]:
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-9, atol=1e-12,
                                       msg=f"step {step}: {n}")
        for o in opts:
            o.step()
    for (n, p), q in zip(sal.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=n)
    for (n, b), c in zip(sal.named_buffers(), ref.buffers()):   # routing counts among them
        assert torch.equal(b, c), n


@pytest.mark.parametrize("name", sorted(MODELS))
def test_masked_region_equals_compact_ops(name):
    build, config = MODELS[name]
    torch.manual_seed(0)
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    sal, ref = _pair(build, config, x)
    assert _regions(sal) == 1
    before = dict(fast_region.TAKEN)
    _run_and_compare(sal, ref, x, y)
    assert fast_region.TAKEN["masked"] - before["masked"] == 3, "the masked path was not taken"
    # the gate learned (its local rule ran through the anchor) and the plan is unchanged
    assert sal.sal_gates.gate_0.proj.grad is not None and sal.sal_gates.gate_0.proj.grad.any()
    assert sal.sal_plan == ref.sal_plan


def test_token_rows_and_no_grad():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 8, dtype=torch.float64), torch.randint(0, 3, (2, 3))
    sal, ref = _pair(lambda: Act(torch.relu), {}, x)
    _run_and_compare(sal, ref, x, y, steps=2)
    with torch.no_grad():
        before = fast_region.TAKEN["masked"]
        torch.testing.assert_close(sal(x), ref(x), rtol=1e-10, atol=1e-12)
        assert fast_region.TAKEN["masked"] == before + 1
    sal.eval(), ref.eval()
    torch.testing.assert_close(sal(x), ref(x), rtol=1e-10, atol=1e-12)


def test_many_rows_take_the_compact_ops(monkeypatch):
    torch.manual_seed(0)
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    sal, ref = _pair(lambda: MLP(8, 16, 3, depth=3), {}, x)
    monkeypatch.setattr(fast_region, "MASKED_MACS", 6 * (16 * 8 + 16 * 16 + 3 * 16) - 1)
    before = dict(fast_region.TAKEN)
    _run_and_compare(sal, ref, x, y, steps=2)
    assert fast_region.TAKEN["masked"] == before["masked"]
    assert fast_region.TAKEN["compact"] == before["compact"] + 2
    # the same bits as the compact ops themselves: the fallback runs them one by one
    out, g = sal(x), ref(x)
    assert torch.equal(out, g)


def test_regions_it_does_not_run_keep_their_ops():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    for config in (dict(area_mode="replicate"), dict(route_top_k=2)):
        sal = salcompile.transform(MLP(8, 16, 3, depth=3), (x,), areas=4, **config)
        graph, fns = fast_region.rewrite(sal.graph)
        assert not fns and graph is sal.graph, config
    # the graph itself (compile, export, save and ONNX read it) never changes
    sal = salcompile.transform(MLP(8, 16, 3), (x,), areas=4)
    code = sal.code
    graph, fns = fast_region.rewrite(sal.graph)
    assert len(fns) == 1 and graph is not sal.graph and sal.code == code
    targets = [n.target for n in graph.nodes]
    assert torch.ops.salcompile.compact_linear.default not in targets
    # the gate joins the region's Function; the routing counter still counts (after it)
    assert torch.ops.salcompile.region_gate.default not in targets
    assert targets.count(torch.ops.salcompile.count_routes.default) == 1


def test_float32_paper_scale_agrees_with_the_compact_ops():
    torch.manual_seed(0)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    torch.manual_seed(1)
    sal = salcompile.transform(MLP(64, 256, 10), (x,), areas=16)
    ref = copy.deepcopy(sal)
    fast_region.ENABLED = False
    try:
        fast.eager_forward(ref)
    finally:
        fast_region.ENABLED = True
    for m in (sal, ref):
        F.cross_entropy(m(x), y).backward()
    for (n, p), q in zip(sal.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_benchmark_floor_runs_sals_gate_exactly():
    """benchmarks/step_time.py's floor row (FA + the region gate alone) is only a floor if its
    gate is SAL's: the same routing counts and the same local-rule gradient of P."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
    spec = importlib.util.spec_from_file_location("step_time_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    base, x = MLP(8, 32, 3), torch.randn(12, 8)
    y = torch.randint(0, 3, (12,))
    sal = salcompile.transform(copy.deepcopy(base), (x,), areas=4)
    floor = bench._FAPlusGate(salcompile.transform(copy.deepcopy(base), (x,), areas=1), sal)
    for m in (sal, floor):
        F.cross_entropy(m(x), y).backward()
    gate = sal.sal_gates.gate_0
    assert floor.proj.grad is not None and floor.proj.grad.abs().sum() > 0
    torch.testing.assert_close(floor.proj.grad, gate.proj.grad, rtol=0, atol=0)
    torch.testing.assert_close(floor.counts, gate.counts, rtol=0, atol=0)
    assert sum(p.numel() for p in floor.parameters()) == sum(p.numel() for p in sal.parameters())
