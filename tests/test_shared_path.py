"""A shared dense path beside the routed areas (SALConfig(shared_fraction=f)): f=0 is today's
pure partition bit for bit, f=1 is dense FA, the fast ops equal the masked-dense references,
rows train the shared weights whatever their area and only their own area's routed block, and
the exporters give the torch gradients."""
import numpy as np
import pytest
import torch

import salcompile
from conftest import (assert_compiled_grads, assert_forms_agree, assert_onnx_matches,
                      assert_train_step_matches_sgd, grads_of)
from salcompile.errors import SalcompileError
from salcompile.models import MLP
from salcompile.passes.split_shared_path import shared_width

D = torch.float64


def _build(dtype=D, **fields):
    torch.manual_seed(0)
    x = torch.randn(12, 6, dtype=dtype)
    model = MLP(6, 32, 3, depth=3).to(dtype)
    return salcompile.transform(model, (x,), **fields), model, x, torch.randint(0, 3, (12,))


def test_shared_width():
    assert shared_width(32, 4, 0) == 0 and shared_width(32, 4, 1.0) == 32
    assert shared_width(32, 4, 0.5) == 16 and shared_width(30, 4, 0.5) == 14   # rest: 4 blocks
    assert shared_width(32, 1, 0.5) == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "half"])
def test_bad_fraction_is_a_clear_error(bad):
    with pytest.raises(SalcompileError, match="shared_fraction"):
        salcompile.SALConfig(shared_fraction=bad)


def test_fraction_zero_is_the_pure_partition_bit_for_bit():
    a, _, x, y = _build(areas=4)
    b, _, _, _ = _build(areas=4, shared_fraction=0.0)
    oa, ga = grads_of(a, x, y)
    ob, gb = grads_of(b, x, y)
    assert torch.equal(oa, ob) and ga.keys() == gb.keys()
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


def test_fraction_one_is_dense_fa():
    s, _, x, y = _build(areas=4, shared_fraction=1.0)
    d, _, _, _ = _build(areas=1)
    os_, gs = grads_of(s, x, y)
    od, gd = grads_of(d, x, y)
    torch.testing.assert_close(os_, od, rtol=0, atol=1e-12)
    for n, g in gd.items():
        torch.testing.assert_close(gs[n], g, rtol=0, atol=1e-12, msg=n)


@pytest.mark.parametrize("rule", ["fa", "bp", "usf", "kp", "dfa"])
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_fast_equals_the_masked_dense_reference(rule, fraction):
    fast, _, x, y = _build(areas=4, shared_fraction=fraction, feedback=rule)
    ref, _, _, _ = _build(areas=4, shared_fraction=fraction, feedback=rule, area_impl="reference")
    of, gf = grads_of(fast, x, y)
    orf, gr = grads_of(ref, x, y)
    torch.testing.assert_close(of, orf, rtol=1e-10, atol=1e-12)
    assert gf.keys() == gr.keys()
    for n in gf:
        torch.testing.assert_close(gf[n], gr[n], rtol=1e-10, atol=1e-12, msg=n)


def test_rows_train_the_shared_weights_and_only_their_own_routed_block():
    sal, _, x, y = _build(areas=4, shared_fraction=0.5)
    entry = sal.sal_plan.layers[1]   # a middle layer: shared and routed, in and out
    assert (entry.shared, entry.shared_in) == (16, 16) and len(entry.parts) == 4
    assert "shared 16 out, 16 in" in str(sal.sal_plan)
    from salcompile.ops.gate import route   # train on the rows of one area only
    gate = sal.get_submodule("sal_gates.gate_0")
    z = route(x.flatten(1), gate.proj, gate.prototypes)
    k = int(z[0])
    rows = z == k
    _, g = grads_of(sal, x[rows], y[rows])
    w = g["layers.1.weight"]
    assert w[:16].abs().sum() > 0                           # the shared outputs learn
    blk = slice(16 + 4 * k, 16 + 4 * (k + 1))
    assert w[blk].abs().sum() > 0                           # this area's routed block learns
    others = torch.ones(32, dtype=torch.bool)
    others[:16], others[blk] = False, False
    assert torch.equal(w[others], torch.zeros_like(w[others]))   # no other area's block
    routed_in = [c for c in range(16, 32) if not 16 + 4 * k <= c < 16 + 4 * (k + 1)]
    assert torch.equal(w[:, routed_in], torch.zeros_like(w[:, routed_in]))


def test_input_block_gain_scales_only_the_routed_input_columns():
    sal, model, _, _ = _build(areas=4, shared_fraction=0.5)
    w0 = model.get_parameter("layers.1.weight")
    w = sal.get_parameter("layers.1.weight")
    torch.testing.assert_close(w[:, :16], w0[:, :16], rtol=0, atol=0)
    torch.testing.assert_close(w[:, 16:], w0[:, 16:] * 2.0, rtol=1e-15, atol=0)   # sqrt(K=4)


def test_conv_layers_keep_the_pure_partition_with_a_note():
    from conftest import BNCNN
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    sal = salcompile.transform(BNCNN(), (x,), areas=2, shared_fraction=0.5)
    assert any("keep the pure partition" in n for n in sal.sal_plan.notes)
    sal(x).sum().backward()


def test_exports_give_the_torch_gradients(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    sal, _, x, y = _build(dtype=torch.float32, areas=4, shared_fraction=0.5)
    _, want = grads_of(sal, x, y)
    assert_onnx_matches(sal, x, tmp_path)
    sal.train()
    api = pytest.importorskip("onnxruntime.training.api")
    salcompile.export_ort_training(sal, (x,), tmp_path / "art")
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "art" / "checkpoint"))
    module = api.Module(str(tmp_path / "art" / "training_model.onnx"), state,
                        str(tmp_path / "art" / "eval_model.onnx"))
    module.train()
    module(x.numpy(), y.numpy())
    for n, p in state.parameters:
        np.testing.assert_allclose(np.array(p.grad), want[n].numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=n)


def test_save_load_and_compile(tmp_path):
    sal, _, x, y = _build(dtype=torch.float32, areas=4, shared_fraction=0.5)
    _, want = grads_of(sal, x, y)
    salcompile.save(sal, (x,), tmp_path / "m.pt2")
    loaded = salcompile.load(tmp_path / "m.pt2")
    _, got = grads_of(loaded, x, y)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)
    assert_compiled_grads(sal, x, y, want)


def test_train_step_graph_equals_torch_sgd(tmp_path):
    sal, _, x, y = _build(dtype=torch.float32, areas=4, shared_fraction=0.5)
    assert_train_step_matches_sgd(sal, x, y, tmp_path / "s.onnx")


# ---------------------------------------------------------------- the fused (compact) form
ops = torch.ops.salcompile


def _targets(module):
    return [n.target for n in module.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("rule", ["fa", "usf", "kp"])
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_fused_equals_unfused_and_reference_over_sgd_steps(rule, fraction):
    """Fused: the routed pieces (area ops on slices of W) become compact_linear ops over rows
    sorted once per gate; the shared dense pieces stay dense linears (on the sorted rows). Outputs
    and every parameter gradient equal the unfused pieces and the masked-dense reference, step
    after step."""
    kw = dict(areas=4, shared_fraction=fraction, feedback=rule)
    mods = {name: _build(**kw, **extra)[0] for name, extra in (
        ("reference", dict(area_impl="reference")), ("unfused", dict(fuse_regions=False)),
        ("fused", {}))}
    _, _, x, y = _build()
    fused, unfused = _targets(mods["fused"]), _targets(mods["unfused"])
    assert ops.area_linear.default not in fused and ops.area_linear.default in unfused
    assert fused.count(ops.compact_linear.default) == unfused.count(ops.area_linear.default)
    assert fused.count(ops.region_sort.default) == 1
    # sorted once at the region's entry, the dense pieces on the sorted rows too, every value
    # [shared | own block] in between: one sort_rows in, one unsort_rows out
    moves = [t for t in fused if t in (ops.sort_rows.default, ops.unsort_rows.default,
                                       ops.gather_blocks.default, ops.scatter_blocks.default)]
    assert moves == [ops.sort_rows.default, ops.unsort_rows.default], moves
    names = {n.name for n in mods["fused"].graph.nodes}
    for entry in mods["fused"].sal_plan.layers:   # the plan names the fused pieces
        assert entry.node in names and set(entry.parts) <= names, entry
    opts = {n: torch.optim.SGD(m.parameters(), lr=0.1) for n, m in mods.items()}
    assert_forms_agree(mods, opts, x, y)


def test_fused_shared_path_unfuses_to_the_same_values():
    import torch.fx as fx
    from salcompile.passes.fuse_regions import unfuse_regions
    sal, _, x, y = _build(areas=4, shared_fraction=0.5)
    plain, _, _, _ = _build(areas=4, shared_fraction=0.5, fuse_regions=False)
    g = unfuse_regions(sal.graph)
    targets = {n.target for n in g.nodes}
    assert ops.area_linear.default in targets and not targets & {
        ops.compact_linear.default, ops.region_sort.default, ops.sort_rows.default,
        ops.gather_blocks.default}
    out, want = grads_of(plain, x, y)
    o, got = grads_of(fx.GraphModule(sal, g), x, y)
    torch.testing.assert_close(o, out, rtol=1e-12, atol=1e-12)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=n)
