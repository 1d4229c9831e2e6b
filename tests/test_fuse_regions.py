"""fuse_regions: a region's area layers in area-sorted compact form (DESIGN §2.5).

The fused graph must give the outputs and every gradient (weights, biases, the gate's P through the
anchor) of the masked-dense reference (area_impl="reference") and of the unfused fast ops, for FA,
BP and DFA, partition and replicate, per-sample and per-token routing, eager and compiled.
"""
import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

import salcompile
from salcompile import SalcompileError
from salcompile.ops import compact
from salcompile.ops.areas import area_linear_reference
from conftest import D, Encoder, assert_grads_equal, grads, mlp

ops = torch.ops.salcompile


def _targets(module):
    return {n.target for n in module.graph.nodes if n.op == "call_function"}


def _variants(model, x, **kw):
    """reference, fast unfused, fast fused: transforms of copies of one model."""
    out = {}
    for name, extra in (("reference", dict(area_impl="reference")),
                        ("fast", dict(fuse_regions=False)), ("fused", {})):
        out[name] = salcompile.transform(copy.deepcopy(model), (x,), **kw, **extra)
    assert ops.compact_linear.default in _targets(out["fused"])
    assert ops.area_linear.default not in _targets(out["fused"])
    assert ops.compact_linear.default not in _targets(out["fast"])
    return out


def _check_same(mods, *inputs):
    ref = mods["reference"]
    y_ref, g_ref = ref(*inputs), grads(ref, *inputs)
    assert "sal_gates.gate_0.proj" in g_ref
    for name in ("fast", "fused"):
        m = mods[name]
        torch.testing.assert_close(m(*inputs), y_ref, rtol=1e-9, atol=1e-10)
        assert_grads_equal(grads(m, *inputs), g_ref)


def _mlp(width=32, depth=4):
    return mlp(8, width, 5, depth=depth).double()


@pytest.mark.parametrize("feedback", ["fa", "bp", "dfa"])
@pytest.mark.parametrize("k", [4, 16])
def test_mlp_partition_equals_reference(feedback, k):
    x = torch.randn(37, 8, dtype=D)
    _check_same(_variants(_mlp(), x, areas=k, feedback=feedback), x)


@pytest.mark.parametrize("feedback", ["fa", "bp", "dfa"])
@pytest.mark.parametrize("rows", [16, 37])
def test_mlp_partition_few_rows_path_equals_reference(feedback, rows, monkeypatch):
    """The paper-scale shape (rows <= 2 x areas): compact_linear's per-row weight-block path,
    forced for 37 rows too."""
    if rows == 37:
        monkeypatch.setattr(compact, "SMALL_ROWS_PER_AREA", 100)
    x = torch.randn(rows, 8, dtype=D)
    _check_same(_variants(_mlp(), x, areas=16, feedback=feedback), x)


def test_fa_with_weights_init_and_no_match():
    x = torch.randn(21, 8, dtype=D)
    _check_same(_variants(_mlp(), x, areas=4, feedback_init="weights"), x)
    _check_same(_variants(_mlp(), x, areas=4, feedback_scale="none"), x)


@pytest.mark.parametrize("feedback", ["fa", "bp"])
def test_fuses_without_shape_metadata(feedback):
    """Graphs without shapes (symbolic_trace): rows are proven aligned from the graph itself
    (the layer reads the activation the gate routes, or a compact value), elementwise ops by
    their identity, residual adds by the widths of their source layers."""
    from salcompile.passes.fuse_regions import fuse_regions
    from salcompile.passes.context import PassContext
    x = torch.randn(17, 8, dtype=D)
    model = Res().double()
    mods = _variants(model, x, areas=4, feedback=feedback)
    sal = salcompile.transform(copy.deepcopy(model), (x,), areas=4, feedback=feedback,
                               fuse_regions=False)
    for n in sal.graph.nodes:
        n.meta.pop("val", None)
    fuse_regions(sal, PassContext(config=sal.sal_config, plan=sal.sal_plan))
    assert ops.area_linear.default not in _targets(sal)
    assert not [n for n in sal.graph.nodes if n.target is ops.scatter_blocks.default]
    mods["fused"] = sal
    _check_same(mods, x)


def test_batch_of_one_and_empty_areas():
    mods = _variants(_mlp(), torch.randn(6, 8, dtype=D), areas=16)
    _check_same(mods, torch.randn(1, 8, dtype=D))   # 15 empty areas
    _check_same(mods, torch.randn(3, 8, dtype=D))


def test_all_rows_in_one_area():
    x = torch.randn(11, 8, dtype=D)
    mods = _variants(_mlp(), x, areas=4)
    for m in mods.values():
        with torch.no_grad():   # z = normalize(0) = 0: every score ties, argmax picks area 0
            m.sal_gates.gate_0.proj.zero_()
    _check_same(mods, x)
    assert salcompile.routing_stats(mods["fused"])["gate_0"]["counts"][0] > 0


def test_replicate():
    x = torch.randn(19, 8, dtype=D)
    for feedback in ("fa", "bp"):
        _check_same(_variants(_mlp(16, 4), x, areas=4, area_mode="replicate", feedback=feedback),
                    x)


@pytest.mark.parametrize("kw", [dict(route_top_k=2), dict(route_top_k=3, area_mode="replicate"),
                                dict(shared_fraction=0.5)])
def test_top_k_and_shared_path_fuse_without_shape_metadata(kw):
    """symbolic_trace (no example inputs, no shapes): a top-k region's and a shared path's rows
    are proven through the row-wise ops between its layers (the replicate layers' summed
    outputs, the shared path's slices, cats and dense pieces), and every layer is fused."""
    torch.manual_seed(0)
    x, model = torch.randn(13, 8, dtype=D), Res().double()
    mods = {name: salcompile.transform(copy.deepcopy(model), areas=4, **kw, **extra)
            for name, extra in (("reference", dict(area_impl="reference")),
                                ("fast", dict(fuse_regions=False)), ("fused", {}))}
    assert ops.area_linear.default not in _targets(mods["fused"])
    assert ops.compact_linear.default in _targets(mods["fused"])
    _check_same(mods, x)


class Res(nn.Module):
    """Residual adds inside a region, tanh and a scale between layers."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + torch.tanh(self.b(h)) * 0.5
        return self.head(self.act(h + self.c(h)))


def test_residual_adds_stay_compact():
    x = torch.randn(13, 8, dtype=D)
    mods = _variants(Res().double(), x, areas=4)
    _check_same(mods, x)
    fused = [n for n in mods["fused"].graph.nodes if n.target is ops.scatter_blocks.default]
    assert not fused   # nothing leaves the compact form before the exit layer


def test_token_routing_transformer_ffn():
    x = torch.randn(3, 5, 8, dtype=D)
    mods = _variants(Encoder().double(), x, areas=4)
    assert salcompile.plan(mods["fused"]).regions[0]["route_by"] == "token"
    _check_same(mods, x)


def test_check_finite_and_plan_nodes():
    x = torch.randn(9, 8, dtype=D)
    mods = _variants(_mlp(), x, areas=4, check_finite=True)
    _check_same(mods, x)
    sal = mods["fused"]
    names = {n.name: n for n in sal.graph.nodes}
    for entry in salcompile.plan(sal).layers:
        assert entry.node in names, entry
        assert names[entry.node].target in (ops.compact_linear.default, ops.fa_linear.default)
    bad = copy.deepcopy(sal)
    with torch.no_grad():
        getattr(bad.layers, "1").weight.fill_(float("nan"))
    with pytest.raises(SalcompileError, match="layers.1"):
        bad(x)


def test_compiled_fullgraph_same_grads():
    x = torch.randn(24, 8, dtype=D)
    mods = _variants(_mlp(), x, areas=4)
    torch._dynamo.reset()
    compiled = salcompile.compile(mods["fused"], backend="aot_eager")
    g_ref = grads(mods["reference"], x)
    torch.testing.assert_close(compiled(x), mods["reference"](x), rtol=1e-9, atol=1e-10)
    assert_grads_equal(grads(compiled, x), g_ref)
    explained = torch._dynamo.explain(mods["fused"])(x)
    assert explained.graph_break_count == 0


def test_backprop_reference_and_unfuse():
    from salcompile.metrics import backprop_reference
    from salcompile.passes.fuse_regions import unfuse_regions
    x = torch.randn(15, 8, dtype=D)
    mods = _variants(_mlp(), x, areas=4)
    # strip_feedback understands compact_linear: the fused graph stripped = the fast one stripped
    assert_grads_equal(grads(backprop_reference(mods["fused"]), x),
                       grads(backprop_reference(mods["fast"]), x))
    sal = mods["fused"]
    g = unfuse_regions(sal.graph)
    targets = {n.target for n in g.nodes}
    assert ops.area_linear.default in targets and not targets & {
        ops.compact_linear.default, ops.region_sort.default, ops.sort_rows.default,
        ops.unsort_rows.default}
    unfused = fx.GraphModule(sal, g)
    torch.testing.assert_close(unfused(x), sal(x), rtol=1e-9, atol=1e-10)
    assert_grads_equal(grads(unfused, x), grads(mods["fast"], x))


def test_switch_and_validation():
    x = torch.randn(4, 8, dtype=D)
    assert ops.compact_linear.default not in _targets(
        salcompile.transform(_mlp(), (x,), areas=4, fuse_regions=False))
    with pytest.raises(SalcompileError, match="fuse_regions"):
        salcompile.SALConfig(fuse_regions="yes")


def test_convolutions_are_left_alone():
    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc, self.head = nn.Linear(8 * 4 * 4, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.c2(torch.relu(self.c1(x))))
            return self.head(torch.relu(self.fc(torch.flatten(h, 1))))

    x, model = torch.randn(5, 3, 4, 4, dtype=D), CNN().double()
    mods = {name: salcompile.transform(copy.deepcopy(model), (x,), areas=4, **kw)
            for name, kw in (("reference", dict(area_impl="reference")),
                             ("fast", dict(fuse_regions=False)), ("fused", {}))}
    assert ops.area_conv.default in _targets(mods["fused"])
    assert ops.compact_linear.default in _targets(mods["fused"])   # fc and the head's exit
    _check_same(mods, x)


# ---------------------------------------------------------------- the ops alone
def _sorted_case(rows, k, dtype, counts=None):
    area = torch.randint(0, k, (rows,)) if counts is None else \
        torch.repeat_interleave(torch.arange(k), torch.tensor(counts))[torch.randperm(rows)]
    order, sarea, offs = ops.region_sort(area, k)
    assert torch.equal(sarea, area[order]) and torch.equal(sarea, area.sort(stable=True)[0])
    assert offs.dtype == torch.int32 and int(offs[-1]) == rows
    return area, order, sarea, offs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode,input_block", [("partition", False), ("partition", True),
                                              ("dense", True), ("replicate", False)])
@pytest.mark.parametrize("loop", [False, True, "few"])
def test_compact_linear_equals_area_linear(dtype, mode, input_block, loop, monkeypatch):
    # "few": the per-row weight-block path compact_linear takes for few rows per area
    monkeypatch.setattr(compact, "FORCE_LOOP", loop is True)
    monkeypatch.setattr(compact, "SMALL_ROWS_PER_AREA", 100 if loop == "few" else 0)
    k, n, i, rows = 4, 16, 32, 29
    area, order, sarea, offs = _sorted_case(rows, k, dtype, counts=[10, 0, 17, 2])
    w_shape = (k, n, i) if mode == "replicate" else (n, i)
    w = torch.randn(w_shape, dtype=dtype, requires_grad=True)
    b = torch.randn(w_shape[:-1], dtype=dtype, requires_grad=True)
    fb = torch.randn(w_shape, dtype=dtype)
    x_full = torch.randn(rows, i, dtype=dtype)
    if input_block:   # an area-sparse input: zero outside each row's block
        mask = (torch.arange(i) // (i // k) == area[:, None]).to(dtype)
        x_full = x_full * mask
    x_full.requires_grad_(True)
    anchor = torch.zeros((), dtype=dtype, requires_grad=True)
    args = (w, b, fb, k, mode, input_block, True)
    y_ref = area_linear_reference(x_full, area, anchor, *args)
    xc = ops.gather_blocks(x_full, order, sarea, k) if input_block else \
        ops.sort_rows(x_full, order)
    yc = ops.compact_linear(xc, sarea, anchor, w, b, fb, offs, k, mode, input_block, True)
    y = ops.scatter_blocks(yc, order, sarea, k) if mode == "partition" else \
        ops.unsort_rows(yc, order)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, y_ref, **tol)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x_full, w, b, anchor), gy)
    want = torch.autograd.grad(y_ref, (x_full, w, b, anchor), gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol)


def test_region_sort_no_rows_and_opcheck():
    order, sarea, offs = ops.region_sort(torch.zeros(0, dtype=torch.long), 3)
    assert order.shape == (0,) and offs.tolist() == [0, 0, 0]
    from torch.library import opcheck
    area, order, sarea, offs = _sorted_case(12, 3, D)
    w = torch.randn(6, 6, dtype=D, requires_grad=True)
    x = torch.randn(12, 2, dtype=D, requires_grad=True)
    opcheck(ops.compact_linear, (x, sarea, torch.zeros((), dtype=D, requires_grad=True), w, None,
                                 torch.randn(6, 6, dtype=D), offs, 3, "partition", True, True))
    opcheck(ops.scatter_blocks, (x, order, sarea, 3))
    # fp32: the grouped_mm path, whose outputs must have the strides the fake kernels promise
    w32 = torch.randn(12, 8, requires_grad=True)
    b32 = torch.randn(12, requires_grad=True)
    opcheck(ops.compact_linear, (torch.randn(12, 8, requires_grad=True), sarea,
                                 torch.zeros((), requires_grad=True), w32, b32,
                                 torch.randn(12, 8), offs, 3, "partition", False, True))


# ---------------------------------------------------------------- regressions found in review
def test_layout_ops_fake_strides_match_on_permuted_inputs():
    """sort_rows/unsort_rows return contiguous tensors; their fake kernels must say so (inductor
    asserts the strides), also for a permuted input such as a token-mixing MLP's x.transpose."""
    area = torch.randint(0, 3, (4, 5), generator=torch.Generator().manual_seed(0))
    order, _, _ = ops.region_sort(area, 3)
    x = torch.randn(5, 4, 6, requires_grad=True).transpose(0, 1)
    for op in (ops.sort_rows, ops.unsort_rows):
        torch.library.opcheck(op, (x, order))


def test_in_place_activation_after_an_area_layer_trains():
    """Area ops return fresh tensors, not views: nn.ReLU(inplace=True) after them works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16),
                          nn.ReLU(inplace=True), nn.Linear(16, 3)).double()
    x = torch.randn(9, 8, dtype=D)
    mods = {name: salcompile.transform(copy.deepcopy(model), areas=4, **kw)
            for name, kw in (("reference", dict(area_impl="reference")),
                             ("fast", dict(fuse_regions=False)), ("fused", {}))}
    got = {name: grads(m, x) for name, m in mods.items()}
    for name in ("fast", "fused"):
        assert_grads_equal(got[name], got["reference"], rtol=1e-10, atol=1e-12)


class _ClampedRegion(nn.Module):
    """hardtanh(h, 0.5, 1) maps 0 to 0.5: not block-sparse, and read outside the region too."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.nn.functional.hardtanh(self.a(x), 0.5, 1.0)
        return self.c(torch.relu(self.b(h))) + h.sum(-1, keepdim=True)


def test_ops_that_move_zero_do_not_stay_compact():
    torch.manual_seed(0)
    x = torch.randn(9, 8, dtype=D)
    mods = _variants(_ClampedRegion().double(), x, areas=4)
    ref = mods["reference"](x)
    for name in ("fast", "fused"):
        torch.testing.assert_close(mods[name](x), ref, rtol=1e-12, atol=1e-12)


def test_dropout_stays_compact():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32),
                          nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 3))
    sal = salcompile.transform(model, (torch.randn(4, 8),), areas=4)
    targets = [n.target for n in sal.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.compact_linear.default) == 3
    assert ops.gather_blocks.default not in targets and ops.scatter_blocks.default not in targets
    sal.eval()   # eval: dropout is the identity, so the fused model equals the reference
    ref = salcompile.transform(model, (torch.randn(4, 8),), areas=4, area_impl="reference").eval()
    x = torch.randn(7, 8)
    torch.testing.assert_close(sal(x), ref(x), rtol=1e-5, atol=1e-6)


def test_grouped_mm_needs_16_byte_aligned_group_starts():
    """CUDA's grouped_mm reads group k at base + k*stride(0): bf16 weight blocks 8 bytes apart (a
    [64, 8] weight split into 16 column blocks of 4) must take the per-area loop instead."""
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    blocks = w.view(8, 16, 4).permute(1, 0, 2)              # [16, 8, 4], strides (4, 64, 1)
    assert blocks.stride() == (4, 64, 1) and not compact._aligned(blocks)
    assert compact._aligned(torch.zeros(16, 8, 8, dtype=torch.bfloat16))   # groups 128 B apart
