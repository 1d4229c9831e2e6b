"""SAL regions on the structures real models have: gated MLPs (SwiGLU/GeGLU) and the tanh GELU,
several output heads, weights used through views, row-changing ops between layers, models where
nothing can be gated (a warning and a plan note), composed weights."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salcompile
from salcompile import SalcompileError
from conftest import D, assert_grads_equal, dense_transform, grads

ops = torch.ops.salcompile


def _targets(module):
    return [n.target for n in module.graph.nodes if n.op == "call_function"]


def _modes(plan):
    return {l.name: l.area_mode for l in plan.layers}


def _check_fast_equals_reference(model, x, **kw):
    """fast fused, fast unfused and the masked-dense reference: same outputs and gradients."""
    ref = salcompile.transform(copy.deepcopy(model), (x,), area_impl="reference", **kw)
    y, g = ref(x), grads(ref, x)
    assert any(k.startswith("sal_gates.") for k in g)
    mods = {}
    for fuse in (True, False):
        m = salcompile.transform(copy.deepcopy(model), (x,), fuse_regions=fuse, **kw)
        torch.testing.assert_close(m(x), y, rtol=1e-9, atol=1e-10)
        assert_grads_equal(grads(m, x), g)
        mods[fuse] = m
    return mods


# ------------------------------------------------------------------ gated MLPs, tanh GELU
def _tanh_gelu(h):   # GPT-2's NewGELU
    inner = math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))
    return 0.5 * h * (1.0 + torch.tanh(inner))


class GatedBlock(nn.Module):
    """x + down(act(gate(norm(x))) * up(norm(x))), then a head: a Llama (SwiGLU) or Gemma (GeGLU)
    MLP block over [batch, seq, features]."""

    def __init__(self, act, d=8, hidden=16):
        super().__init__()
        self.act = act
        self.norm = nn.LayerNorm(d)
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.norm(x)
        return self.head(x + self.down(self.act(self.gate(h)) * self.up(h)))


class GeluBlock(nn.Module):
    """GPT-2's MLP: c_proj(tanh_gelu(c_fc(x))) with a residual."""

    def __init__(self, d=8, hidden=16):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(x + self.c_proj(_tanh_gelu(self.c_fc(x))))


BLOCKS = {"swiglu": lambda: GatedBlock(F.silu),
          "geglu": lambda: GatedBlock(lambda t: F.gelu(t, approximate="tanh"))}


@pytest.mark.parametrize("feedback", ["fa", "bp"])
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_gated_mlp_is_one_region_and_fast_equals_reference(block, feedback):
    model, x = BLOCKS[block]().double(), torch.randn(3, 5, 8, dtype=D)
    plan = salcompile.plan(model, (x,), areas=4)
    assert [r["layers"] for r in plan.regions] == [["gate", "up"]]
    assert plan.regions[0]["exits"] == ["down"] and plan.regions[0]["reads"] == "layer_norm"
    by = {l.name: l for l in plan.layers}
    assert by["down"].sees == "area-sparse(gate_0)" and by["down"].input_block
    assert by["head"].area_mode == "" and by["head"].role == "head"
    mods = _check_fast_equals_reference(model, x, areas=4, feedback=feedback)
    fused = _targets(mods[True])
    # gate and up share one sort of their input; the product stays compact up to the exit
    assert fused.count(ops.compact_linear.default) == 3 and fused.count(ops.sort_rows.default) == 1
    assert ops.scatter_blocks.default not in fused and ops.area_linear.default not in fused


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_gated_mlp_with_one_area_equals_dense(block):
    model, x = BLOCKS[block]().double(), torch.randn(3, 5, 8, dtype=D)
    dense = dense_transform(model, (x,))
    sal = salcompile.transform(model, (x,), areas=1, gate_layers=["gate", "up", "down"])
    assert sal.sal_plan.regions
    torch.testing.assert_close(sal(x), dense(x), rtol=0, atol=0)
    got = grads(sal, x)
    assert all(float(v.abs().max()) == 0 for k, v in got.items() if k.startswith("sal_gates."))
    assert_grads_equal({k: v for k, v in got.items() if not k.startswith("sal_gates.")},
                       grads(dense, x))


@pytest.mark.parametrize("feedback", ["fa", "bp"])
def test_tanh_gelu_keeps_sparsity(feedback):
    model, x = GeluBlock().double(), torch.randn(3, 5, 8, dtype=D)
    plan = salcompile.plan(model, (x,), areas=4)
    assert [(r["layers"], r["exits"]) for r in plan.regions] == [(["c_fc"], ["c_proj"])]
    _check_fast_equals_reference(model, x, areas=4, feedback=feedback)


def test_product_and_power_sparsity_rules():
    from salcompile.passes.analyse_sparsity import SparseState, analyse_sparsity

    class M(nn.Module):
        def forward(self, a, b, d, rows):
            s = torch.relu(a)
            return (s * b, s * d, s * rows, b * s, s * torch.relu(a * 2.0), torch.pow(s, 3.0),
                    torch.pow(s, -1.0), s * torch.sigmoid(b))

    args = (torch.randn(4, 6), torch.randn(4, 6), torch.randn(6), torch.randn(3, 4, 6))
    ep = torch.export.export(M(), args, strict=False)
    gm = ep.module()
    st = analyse_sparsity(gm, {"a": SparseState("g", -1)})
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    sparse = [o.name in st for o in out]
    # dense factor of the same shape / broadcast vector: sparse; broadcast adding rows: dense;
    # two sparse factors: sparse; positive power: sparse, negative: dense
    assert sparse == [True, True, False, True, True, True, False, True]


# ------------------------------------------------------------------ several output heads
class TwoHeads(nn.Module):
    def __init__(self, as_dict=True):
        super().__init__()
        self.as_dict = as_dict
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 16)
        self.cls, self.aux = nn.Linear(16, 10), nn.Linear(16, 6)

    def forward(self, x):
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        if self.as_dict:
            return {"logits": self.cls(h), "aux": self.aux(h)}
        return self.cls(h), self.aux(h)


class _Sum(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        out = self.m(x)
        out = out.values() if isinstance(out, dict) else out
        return sum(o.sum(1) for o in out)


@pytest.mark.parametrize("as_dict", [True, False])
def test_every_output_layer_is_a_head(as_dict):
    model, x = TwoHeads(as_dict).double(), torch.randn(6, 8, dtype=D)
    plan = salcompile.plan(model, (x,), areas=4)   # cls has 10 outputs: not divisible by 4
    roles = {l.name: l.role for l in plan.layers}
    assert roles == {"fc1": "hidden", "fc2": "hidden", "cls": "head", "aux": "head"}
    assert _modes(plan) == {"fc1": "partition", "fc2": "partition", "cls": "exit", "aux": "exit"}
    assert plan.head.name == "aux"   # the last one: DFA's head
    _check_fast_equals_reference(_Sum(model), x, areas=4)


def test_returned_hidden_layer_is_an_output_layer():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = self.b(torch.relu(self.a(x)))
            return self.head(torch.relu(h)), h

    plan = salcompile.plan(M(), (torch.randn(2, 8),), areas=4)
    assert _modes(plan) == {"a": "partition", "b": "exit", "head": ""}
    assert {l.name for l in plan.layers if l.role == "head"} == {"b", "head"}


# ------------------------------------------------------------------ shapes from the operand
class SlicedRows(nn.Module):
    """A hidden layer computing with W[:3] of a [4, 8] parameter."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 8) * 0.3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.relu(F.linear(x, self.W[:3])))


@pytest.mark.parametrize("example", [True, False])
def test_width_check_reads_the_operand(example):
    args = ((torch.randn(2, 8),),) if example else ()
    with pytest.raises(SalcompileError, match=r"has 3 outputs, not divisible by K=2"):
        salcompile.transform(SlicedRows(), *args, areas=2)


class SlicedColumns(nn.Module):
    """A layer reading W[:, :8] of a [16, 12] parameter, after a first layer reading x."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(16, 12) * 0.3)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(F.linear(x, self.W[:, :8]))
        return self.head(torch.relu(self.fc(h)))


def test_gate_width_without_example_inputs_reads_the_operand():
    x = torch.randn(5, 8)
    traced = salcompile.transform(SlicedColumns(), areas=4)
    assert traced.sal_plan.regions[0]["features"] == 8
    assert traced.get_parameter("sal_gates.gate_0.proj").shape[1] == 8
    traced(x).sum().backward()
    exported = salcompile.transform(SlicedColumns(), (x[:2],), areas=4)
    exported.load_state_dict(traced.state_dict())
    torch.testing.assert_close(traced(x), exported(x))


class Transposed(nn.Module):
    """GPT-2's Conv1D form: W stored [in=6, out=16], used as linear(x, W.t(), b)."""

    def __init__(self):
        super().__init__()
        self.W, self.b = nn.Parameter(torch.randn(6, 16) * 0.3), nn.Parameter(torch.zeros(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(F.linear(x, self.W.t(), self.b)))


@pytest.mark.parametrize("example", [True, False])
def test_transposed_weight_operand_sizes_the_gate_and_the_blocks(example):
    x = torch.randn(5, 6, dtype=D)
    model = Transposed().double()
    sal = salcompile.transform(model, (x,) if example else None, areas=4)   # 16 outputs, 6 inputs
    (region,) = sal.sal_plan.regions
    assert region["features"] == 6 and region["exits"] == ["head"]
    if example:
        _check_fast_equals_reference(model, x, areas=4)
    else:
        sal(x).sum().backward()


class RowsChange(nn.Module):
    """[B, 8] → fc1 → view as [2B, 8] → fc2 → view back [B, 32] → head: fc2's rows are not
    the rows fc1's gate routes."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x)).reshape(-1, 8)
        return self.head(torch.relu(self.fc2(h)).reshape(x.shape[0], 32))


class TokenMean(nn.Module):
    """Linear over tokens → mean over the tokens → Linear over samples."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x)).mean(1)
        return self.head(torch.relu(self.fc2(h)))


@pytest.mark.parametrize("example", [True, False])
@pytest.mark.parametrize("make,shape", [(RowsChange, (6, 8)), (TokenMean, (3, 5, 8))],
                         ids=["reshape", "mean"])
def test_regions_never_span_a_row_changing_op(make, shape, example):
    x = torch.randn(*shape, dtype=D)
    model = make().double()
    args = (x[:2],) if example else None
    sal = salcompile.transform(model, args, areas=4)
    layers = [r["layers"] for r in sal.sal_plan.regions]
    assert ["fc1", "fc2"] not in layers and ["fc2"] in layers
    for batch in (x, x[:3]):   # runs, at the example batch and at another
        sal(batch).sum().backward()
    if example and make is RowsChange:   # two gates (split region): fast == reference
        assert layers == [["fc1"], ["fc2"]]
        assert any("gate_1 starts at fc2" in n for n in sal.sal_plan.notes)
        _check_fast_equals_reference(model, x, areas=4)


# ------------------------------------------------------------------ nothing to gate
class OnlyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("make,shape,reason", [
    (lambda: nn.Linear(8, 4), (2, 8), "only layers are output layers"),
    (OnlyAttention, (2, 5, 8), "form no MLP/FFN block"),
], ids=["head-only", "attention-only"])
def test_no_region_warns_and_the_plan_says_why(make, shape, reason):
    with pytest.warns(UserWarning, match=r"areas=4 but no layer is gated .*trains dense with fa"):
        sal = salcompile.transform(make(), (torch.randn(*shape),), areas=4)
    assert not sal.sal_plan.regions
    (note,) = [n for n in sal.sal_plan.notes if n.startswith("no SAL region: ")]
    assert reason in note and note in str(sal.sal_plan)
    assert type(sal.sal_plan).from_json(sal.sal_plan.to_json()).notes == sal.sal_plan.notes
    with warnings.catch_warnings(record=True) as caught:   # areas=1: nothing asked, nothing said
        warnings.simplefilter("always")
        salcompile.transform(make(), (torch.randn(*shape),), areas=1)
    assert not [w for w in caught if "no layer is gated" in str(w.message)]


class LoRA(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.A = nn.Parameter(torch.randn(16, 2) * 0.1)
        self.B = nn.Parameter(torch.randn(2, 8) * 0.1)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(F.linear(x, self.W + self.A @ self.B))
        return self.head(torch.relu(self.fc(h)))


def test_composed_weight_stays_dense():
    plan = salcompile.plan(LoRA(), (torch.randn(2, 8),), areas=4)
    modes = {l.weight: l.area_mode for l in plan.layers}
    assert modes == {"W": "", "fc.weight": "partition", "head.weight": "exit"}
    with pytest.raises(SalcompileError, match="composed from several parameters"):
        salcompile.transform(LoRA(), (torch.randn(2, 8),), areas=4, gate_layers=["W"])


class _ViewMutation(torch.nn.Module):
    """h[:, :3].add_(1) writes into h through a view: h is no longer area-sparse."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h[:, :3].add_(1.0)
        return self.c(torch.relu(self.b(h)))


@pytest.mark.parametrize("example", [True, False], ids=["export", "symbolic_trace"])
def test_a_value_mutated_through_a_view_is_dense(example):
    torch.manual_seed(0)
    model, x = _ViewMutation().double(), torch.randn(6, 4, dtype=torch.float64)
    inputs = (x,) if example else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = salcompile.transform(model, example_inputs=inputs, areas=2)
        ref = salcompile.transform(model, example_inputs=inputs, areas=2, area_impl="reference")
    b = next(l for l in fast.sal_plan.layers if l.name == "b")
    assert b.sees == "dense" and not b.input_block
    torch.testing.assert_close(fast(x), ref(x))
