"""Top-k routing (SALConfig(route_top_k=k), our extension): each row uses and updates its k best
areas. k=1 is today's routing bit for bit; the fast ops equal the masked-dense references; a
hand-written masked network gives the same outputs and backprop gradients; the gate's local rule
is the gradient of its written-out loss over the k selections."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import salcompile
from conftest import (assert_compiles_and_exports, assert_forms_agree,
                      assert_train_step_matches_sgd, grads_of)
from salcompile.errors import SalcompileError
from salcompile.models import MLP
from salcompile.ops.gate import route_topk

D = torch.float64
K, WIDTH = 4, 32


def _build(dtype=D, **fields):
    torch.manual_seed(0)
    x = torch.randn(12, 6, dtype=dtype)
    sal = salcompile.transform(MLP(6, WIDTH, 3, depth=3).to(dtype), (x,), areas=K, **fields)
    return sal, x, torch.randint(0, 3, (12,))


def test_bad_top_k_is_a_clear_error():
    with pytest.raises(SalcompileError, match="exceeds areas"):
        salcompile.SALConfig(areas=4, route_top_k=5)
    with pytest.raises(SalcompileError, match="route_top_k"):
        salcompile.SALConfig(route_top_k=0)
    with pytest.raises(SalcompileError, match="cannot be combined"):
        salcompile.SALConfig(route_top_k=2, shared_fraction=0.5)


def test_top_1_is_todays_routing_bit_for_bit():
    a, x, y = _build()
    b, _, _ = _build(route_top_k=1)
    oa, ga = grads_of(a, x, y)
    ob, gb = grads_of(b, x, y)
    assert torch.equal(oa, ob) and all(torch.equal(ga[n], gb[n]) for n in ga)


@pytest.mark.parametrize("mode", ["partition", "replicate"])
@pytest.mark.parametrize("rule", ["fa", "bp", "kp", "usf", "dfa"])
def test_fast_equals_the_masked_dense_reference(rule, mode):
    fast, x, y = _build(route_top_k=2, feedback=rule, area_mode=mode)
    ref, _, _ = _build(route_top_k=2, feedback=rule, area_mode=mode, area_impl="reference")
    of, gf = grads_of(fast, x, y)
    orf, gr = grads_of(ref, x, y)
    torch.testing.assert_close(of, orf, rtol=1e-10, atol=1e-12)
    assert gf.keys() == gr.keys()
    for n in gf:
        torch.testing.assert_close(gf[n], gr[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("k", [2, 3])
def test_a_hand_written_masked_network_gives_the_same_outputs_and_gradients(k):
    """Partition, top-k: each choice j writes its area's block; a block-reading layer's block
    reads the same area's input block; the exit sums the k blocks it reads (bias once)."""
    sal, x, y = _build(route_top_k=k, feedback="bp")
    out, grads = grads_of(sal, x, y)
    gate = sal.get_submodule("sal_gates.gate_0")
    z = route_topk(x, gate.proj, gate.prototypes, k)                 # [rows, k]
    block = torch.arange(WIDTH) // (WIDTH // K)
    masks = [(block == z[:, j:j + 1]).to(D) for j in range(k)]      # [rows, WIDTH] per choice
    p = {n: t.detach().clone().requires_grad_() for n, t in sal.named_parameters()
         if n.startswith("layers.")}
    lin = lambda h, i: h @ p[f"layers.{i}.weight"].t() + p[f"layers.{i}.bias"]   # noqa: E731
    h0 = torch.relu(sum(m * lin(x, 0) for m in masks))
    h1 = torch.relu(sum(m * lin(m * h0, 1) for m in masks))
    want = sum((m * h1) @ p["layers.2.weight"].t() for m in masks) + p["layers.2.bias"]
    torch.testing.assert_close(out, want.detach(), rtol=1e-12, atol=1e-12)
    F.cross_entropy(want, y).backward()
    for n, t in p.items():
        torch.testing.assert_close(grads[n], t.grad, rtol=1e-10, atol=1e-12, msg=n)


def test_gate_local_rule_is_the_gradient_of_its_loss_over_the_k_selections():
    k = 2
    sal, x, y = _build(route_top_k=k, balance_weight=0.7, temperature=0.3)
    _, grads = grads_of(sal, x, y)
    gate = sal.get_submodule("sal_gates.gate_0")
    proj = gate.proj.detach().clone().requires_grad_()
    protos = gate.prototypes.detach()
    z = F.normalize(x @ proj.t(), dim=-1, eps=1e-12)
    winners = (z @ protos.t()).topk(k, -1).indices
    hot = F.one_hot(winners, K).to(D)                    # [rows, k, K]
    target = hot.mean(1)                                 # the k winners' mean one-hot
    frac = hot.sum((0, 1)) / hot.sum()                   # selections per area (constants)
    prob = torch.softmax(z @ protos.t() / 0.3, -1)
    loss = -(target * prob.log()).sum(-1).mean() + 0.7 * K * (frac * prob.mean(0)).sum()
    loss.backward()
    torch.testing.assert_close(grads["sal_gates.gate_0.proj"], proj.grad, rtol=1e-9, atol=1e-12)


def test_routing_stats_count_selections():
    sal, x, _ = _build(route_top_k=2)
    with torch.no_grad():
        sal(x)
    stats = salcompile.routing_stats(sal)["gate_0"]
    assert stats["rows"] == 2 * len(x) and sum(stats["counts"]) == 2 * len(x)
    assert "top-2 routing" in str(sal.sal_plan)


def test_export_onnx_compile_and_save_load(tmp_path):
    sal, x, y = _build(dtype=torch.float32, route_top_k=2)
    out, want = grads_of(sal, x, y)
    salcompile.save(sal, (x,), tmp_path / "m.pt2")
    _, got = grads_of(salcompile.load(tmp_path / "m.pt2"), x, y)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)
    assert_compiles_and_exports(sal, x, y, want, tmp_path)


def test_train_step_graph_equals_torch_sgd_with_top_k(tmp_path):
    """Forward, layer gradients and the top-k gate's local rule, all in the one ONNX graph."""
    sal, x, y = _build(dtype=torch.float32, route_top_k=2)
    assert_train_step_matches_sgd(sal, x, y, tmp_path / "s.onnx")


@pytest.mark.parametrize("mode", ["partition", "replicate"])
def test_ort_training_step_gives_the_torch_gradients_with_top_k(tmp_path, mode):
    """export_ort_training with top-2 routing: one ORT step's gradients (every layer's k blocks
    per row, FA with match-scaled B, the gate's top-k local rule) equal torch's."""
    api = pytest.importorskip("onnxruntime.training.api")
    pytest.importorskip("onnxscript")
    sal, x, _ = _build(dtype=torch.float32, route_top_k=2, area_mode=mode)
    d = tmp_path / "art"
    info = salcompile.export_ort_training(sal, (x,), d, optimizer="sgd")
    assert info["gates"] == 1 and info["redirected"] >= 2
    g = torch.Generator().manual_seed(3)
    xb, yb = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    _, want = grads_of(sal, xb, yb)
    state = api.CheckpointState.load_checkpoint(str(d / "checkpoint"))
    module = api.Module(str(d / "training_model.onnx"), state, str(d / "eval_model.onnx"))
    module.train()
    module(xb.numpy(), yb.numpy())
    got = {n: np.array(p.grad) for n, p in state.parameters}
    assert sorted(got) == sorted(n for n, _ in sal.named_parameters())
    assert "sal_gates.gate_0.proj" in want
    for n, w in want.items():
        w = w.numpy()
        assert np.abs(got[n] - w).max() <= 1e-5 * max(np.abs(w).max(), 1e-6), n


def test_region_gate_topk_passes_opcheck():
    from torch.library import opcheck
    torch.manual_seed(0)
    feats, proj = torch.randn(7, 5, dtype=D), torch.randn(3, 5, dtype=D, requires_grad=True)
    protos = F.normalize(torch.randn(K, 3, dtype=D), dim=-1)
    # as region_gate: opcheck's AOT-dispatch check builds a float cotangent for the integer
    # areas output (an opcheck limitation, region_gate fails it the same way); the others run
    opcheck(torch.ops.salcompile.region_gate_topk.default, (feats, proj, protos, 0.1, 0.5, 2),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    area, _ = torch.ops.salcompile.region_gate_topk(feats, proj, protos, 0.1, 0.5, 1)
    top1, _ = torch.ops.salcompile.region_gate(feats, proj, protos, 0.1, 0.5)
    assert torch.equal(area[:, 0], top1)


# ---------------------------------------------------------------- the fused (compact) form
ops = torch.ops.salcompile


def _targets(module):
    return [n.target for n in module.graph.nodes if n.op == "call_function"]


def _three(**fields):
    """reference, unfused fast, fused fast: one model, three transforms."""
    mods = {name: _build(**fields, **extra)[0] for name, extra in (
        ("reference", dict(area_impl="reference")), ("unfused", dict(fuse_regions=False)),
        ("fused", {}))}
    fused, unfused = _targets(mods["fused"]), _targets(mods["unfused"])
    assert ops.compact_linear.default in fused and ops.area_linear.default not in fused
    assert ops.compact_linear.default not in unfused and ops.area_linear.default in unfused
    return mods


@pytest.mark.parametrize("rule", ["fa", "kp"])
@pytest.mark.parametrize("mode", ["partition", "replicate"])
@pytest.mark.parametrize("k", [2, 3])
def test_fused_equals_unfused_and_reference_over_sgd_steps(k, mode, rule):
    """Top-k fused: the rows' (row, choice) entries sorted once, each layer one compact_linear
    over the k*N entries, the k terms of a row summed where a value leaves the compact form.
    Outputs and every parameter gradient (layers, biases, KP's B, the gate's P) equal the unfused
    area ops and the masked-dense reference, step after step."""
    mods = _three(route_top_k=k, feedback=rule, area_mode=mode)
    _, x, y = _build()
    opts = {n: torch.optim.SGD(m.parameters(), lr=0.1) for n, m in mods.items()}
    assert "sal_gates.gate_0.proj" in grads_of(mods["reference"], x, y)[1]
    assert_forms_agree(mods, opts, x, y)


def test_fused_token_routing_and_residual_adds():
    """Per-token top-2 routing through an encoder's FFN, and a residual add of two compact
    values inside a region: fused = unfused = reference."""
    import copy
    from conftest import Encoder, assert_grads_equal, grads
    from torch import nn

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, h):
            h = torch.relu(self.a(h))
            return self.c(h + torch.tanh(self.b(h)) * 0.5)

    torch.manual_seed(0)
    for model, x in ((Encoder().double(), torch.randn(3, 5, 8, dtype=D)),
                     (Res().double(), torch.randn(13, 8, dtype=D))):
        mods = {name: salcompile.transform(copy.deepcopy(model), (x,), areas=K, route_top_k=2,
                                           **extra)
                for name, extra in (("reference", dict(area_impl="reference")),
                                    ("unfused", dict(fuse_regions=False)), ("fused", {}))}
        assert ops.area_linear.default not in _targets(mods["fused"])
        want = grads(mods["reference"], x)
        for name in ("unfused", "fused"):
            torch.testing.assert_close(mods[name](x), mods["reference"](x), rtol=1e-9, atol=1e-10)
            assert_grads_equal(grads(mods[name], x), want)


def test_fused_top_k_unfuses_save_loads_compiles_and_exports(tmp_path):
    """unfuse_regions gives the unfused top-k form back (what the ONNX exporters read); the fused
    model saves, loads, compiles (no graph break) and exports to ONNX."""
    import torch.fx as fx
    from salcompile.passes.fuse_regions import unfuse_regions
    sal, x, y = _build(dtype=torch.float32, route_top_k=2)
    plain, _, _ = _build(dtype=torch.float32, route_top_k=2, fuse_regions=False)
    assert ops.expand_rows.default in _targets(sal) and ops.sum_rows.default in _targets(sal)
    out, want = grads_of(sal, x, y)
    ref_out, ref = grads_of(plain, x, y)
    torch.testing.assert_close(out, ref_out)
    g = unfuse_regions(sal.graph)
    targets = {n.target for n in g.nodes}
    assert ops.area_linear.default in targets and not targets & {
        ops.compact_linear.default, ops.region_sort.default, ops.expand_rows.default,
        ops.sum_rows.default, ops.expand_blocks.default, ops.sum_blocks.default}
    unfused = fx.GraphModule(sal, g)
    o, got = grads_of(unfused, x, y)
    torch.testing.assert_close(o, out)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], msg=n)
    salcompile.save(sal, (x,), tmp_path / "m.pt2")
    loaded = salcompile.load(tmp_path / "m.pt2")
    assert ops.compact_linear.default in _targets(loaded)
    _, got = grads_of(loaded, x, y)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)
    torch._dynamo.reset()
    assert torch._dynamo.explain(sal)(x).graph_break_count == 0
    assert_compiles_and_exports(sal, x, y, want, tmp_path)


def test_entry_ops_pass_opcheck_and_are_adjoint():
    """expand_rows / sum_rows and expand_blocks / sum_blocks: fake shapes, autograd, and each
    the other's adjoint (<expand(x), y> = <x, sum(y)>)."""
    from torch.library import opcheck
    torch.manual_seed(0)
    rows, k, areas = 7, 2, 4
    z = torch.rand(rows, areas).topk(k, -1).indices          # distinct areas per row
    order, sarea, _ = ops.region_sort(z, areas)
    x = torch.randn(rows, 8, dtype=D, requires_grad=True)
    ye = torch.randn(rows, k, 8, dtype=D, requires_grad=True)
    yb = torch.randn(rows, k, 2, dtype=D, requires_grad=True)
    opcheck(ops.expand_rows, (x, order, k))
    opcheck(ops.sum_rows, (ye, order, k))
    opcheck(ops.expand_blocks, (x, order, sarea, areas, k))
    opcheck(ops.sum_blocks, (yb, order, sarea, areas, k))
    with torch.no_grad():
        torch.testing.assert_close((ops.expand_rows(x, order, k) * ye).sum(),
                                   (x * ops.sum_rows(ye, order, k)).sum())
        torch.testing.assert_close((ops.expand_blocks(x, order, sarea, areas, k) * yb).sum(),
                                   (x * ops.sum_blocks(yb, order, sarea, areas, k)).sum())
        # entry j of row r: its row, and its area's block
        e = ops.expand_blocks(x, order, sarea, areas, k).reshape(-1, 2)
        r = order // k
        torch.testing.assert_close(e, x.reshape(rows, areas, 2)[r, sarea])


@pytest.mark.parametrize("path", ["grouped", "loop", "few"])
def test_fused_top_k_on_each_compact_matmul_path(path, monkeypatch):
    """compact_linear's three ways over the k*N entries (grouped_mm, the per-area loop, the
    per-row weight blocks of few rows per area) give the reference's numbers; float32 so that
    grouped_mm applies."""
    from salcompile.ops import compact
    monkeypatch.setattr(compact, "FORCE_LOOP", path == "loop")
    monkeypatch.setattr(compact, "SMALL_ROWS_PER_AREA", 100 if path == "few" else 0)
    mods = _three(dtype=torch.float32, route_top_k=2)
    _, x, y = _build(dtype=torch.float32)
    out, want = grads_of(mods["reference"], x, y)
    o, got = grads_of(mods["fused"], x, y)
    torch.testing.assert_close(o, out, rtol=1e-5, atol=1e-6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=n)
