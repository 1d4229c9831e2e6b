"""Each pass on its own (issue 16): a tiny model is captured, the pipeline's earlier passes are run
by hand with a PassContext (`run_until`), then the one pass under test, and what its docstring
says it does is checked on the graph, on the context and, where it is cheap, on the numbers.

The pipeline contract is checked too: every pass of `pipeline._order` is `step(gm, ctx) -> gm`,
and an unexpected failure inside a pass carries a note naming it. The last tests list the nodes
of a finished graph whose meta["val"] is missing or disagrees with what the node computes.
"""
import copy
import functools
import inspect
import operator
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import salcompile
from salcompile import pipeline
from salcompile.capture import capture
from salcompile.config import SALConfig
from salcompile.errors import SalcompileError
from salcompile.layers import get_arg
from salcompile.passes import PassContext
import salcompile.passes as P

D = torch.float64
aten = torch.ops.aten
ops = torch.ops.salcompile


# ---------------------------------------------------------------------------------------------
# tiny models and helpers

def mlp3():
    """3 linear layers: 0 and 2 hidden, 4 the head."""
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3)).to(D)


def x_mlp():
    return torch.randn(6, 8, dtype=D)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def cnn():
    return TinyCNN().to(D)


def x_cnn():
    return torch.randn(4, 3, 6, 6, dtype=D)


def step_name(step) -> str:
    return step.__name__.lstrip("_")


def run_until(model, x, config, stop_before=None, *, trace=True):
    """Capture `model` (torch.export with `x`, or symbolic_trace when trace=False) and run the
    passes of pipeline._order(config) that apply, up to (not including) `stop_before` (a pass or
    its name; None: all of them). Returns (gm, ctx)."""
    gm, how = capture(model, (x,) if trace else None)
    ctx = PassContext(config=config, capture=how)
    for step, when in pipeline._order(config):
        if stop_before is not None and (step is stop_before or step_name(step) == stop_before):
            return gm, ctx
        if when(ctx):
            gm = pipeline._run(step, gm, ctx)
    assert stop_before is None, f"{stop_before} is not in pipeline._order({config})"
    return gm, ctx


def targets(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def nodes_of(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def out(gm, *inputs):
    y = gm(*inputs)
    return y[0] if isinstance(y, (tuple, list)) else y


class _Record(fx.Interpreter):
    """Runs a GraphModule node by node and keeps every node's value."""

    def run_node(self, n):
        value = super().run_node(n)
        self.values[n.name] = value
        return value


def node_values(gm, *inputs):
    r = _Record(gm)
    r.values = {}
    with torch.no_grad():
        r.run(*inputs)
    return r.values


def loss_grads(module, x):
    module.zero_grad(set_to_none=True)
    y = out(module, x)
    w = torch.linspace(0.5, 1.5, y.numel(), dtype=y.dtype).reshape(y.shape)
    (w * y).square().sum().backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


DENSE = SALConfig(areas=1)   # no gates: the dense model trained with FA
GATED = SALConfig(areas=4, input_block_gain="none")


# ---------------------------------------------------------------------------------------------
# the pipeline contract

def test_every_pass_in_order_has_the_gm_ctx_signature():
    for config in (GATED, SALConfig(areas=1, feedback="dfa", check_finite=True)):
        for step, when in pipeline._order(config):
            params = list(inspect.signature(step).parameters)
            assert params[:2] == ["gm", "ctx"], (step_name(step), params)
            assert callable(when)


@pytest.mark.parametrize("config", [
    SALConfig(areas=4, check_finite=True, shared_fraction=0.5),
    SALConfig(areas=4, feedback="dfa", check_finite=True),
], ids=["fa-shared-finite", "dfa-finite"])
def test_transform_calls_every_pass_as_step_gm_ctx_and_gets_a_graphmodule(monkeypatch, config):
    calls = []
    real_order = pipeline._order

    def recording_order(cfg):
        wrapped = []
        for step, when in real_order(cfg):
            def rec(*args, _step=step, **kwargs):
                assert not kwargs, (step_name(_step), kwargs)
                assert len(args) == 2 and isinstance(args[0], fx.GraphModule) \
                    and isinstance(args[1], PassContext), (step_name(_step), args)
                result = _step(*args)
                assert isinstance(result, fx.GraphModule), (step_name(_step), type(result))
                calls.append(step_name(_step))
                return result
            functools.update_wrapper(rec, step)
            wrapped.append((rec, when))
        return wrapped

    monkeypatch.setattr(pipeline, "_order", recording_order)
    sal = salcompile.transform(mlp3(), (x_mlp(),), config)
    other = "attach_dfa" if config.feedback == "fa" else "attach_fa"   # one feedback family
    expected = [step_name(s) for s, w in real_order(config) if step_name(s) != other]
    # every other pass of the order ran (all apply to these configs), in that order
    assert calls == expected
    assert {"attach_fa" if config.feedback == "fa" else "attach_dfa", "guard_finite",
            "fuse_regions", "split_shared_path", "audit_parameters"} <= set(calls)
    assert isinstance(sal, fx.GraphModule)


def test_an_unexpected_error_in_a_pass_carries_a_note_naming_it(monkeypatch):
    def decompose_addmm(gm, ctx):
        raise ValueError("boom")
    monkeypatch.setattr(P, "decompose_addmm", decompose_addmm)
    with pytest.raises(ValueError, match="boom") as info:
        salcompile.transform(mlp3(), (x_mlp(),), areas=1)
    assert "(in salcompile pass decompose_addmm)" in getattr(info.value, "__notes__", [])


def test_the_analysis_step_is_named_without_its_underscore(monkeypatch):
    def analyse(gm, config, how):
        raise KeyError("no plan")
    monkeypatch.setattr(pipeline, "analyse", analyse)
    with pytest.raises(KeyError) as info:
        salcompile.transform(mlp3(), (x_mlp(),), areas=1)
    assert "(in salcompile pass analyse)" in getattr(info.value, "__notes__", [])


def test_a_salcompile_error_from_a_pass_is_passed_on_without_a_note(monkeypatch):
    def attach_fa(gm, ctx):
        raise SalcompileError("a clear message")
    monkeypatch.setattr(P, "attach_fa", attach_fa)
    with pytest.raises(SalcompileError, match="a clear message") as info:
        salcompile.transform(mlp3(), (x_mlp(),), areas=1)
    assert not getattr(info.value, "__notes__", [])


@pytest.mark.parametrize("make, make_x, config", [
    (mlp3, x_mlp, SALConfig(areas=1, check_finite=True)),
    (mlp3, x_mlp, SALConfig(areas=1, feedback="dfa")),
    # K=1 areas: the gate machinery on a model that must compute exactly the dense numbers
    (mlp3, x_mlp, SALConfig(areas=1, gate_layers=["0", "2"], check_finite=True)),
    (cnn, x_cnn, SALConfig(areas=1, gate_layers=["c*"], feedback="dfa")),
], ids=["mlp-fa-finite", "mlp-dfa", "mlp-k1-gated", "cnn-k1-gated-dfa"])
def test_every_pass_keeps_the_models_output(make, make_x, config):
    model, x = make(), make_x()
    expected = model(x)
    gm, how = capture(model, (x,))
    ctx = PassContext(config=config, capture=how)
    ran = []
    for step, when in pipeline._order(config):
        if when(ctx):
            gm = step(gm, ctx)
            gm.recompile()
            torch.testing.assert_close(out(gm, x), expected,
                                       msg=lambda m: f"{step_name(step)}: {m}")
            ran.append(step_name(step))
    assert "audit_parameters" in ran
    if config.gate_layers:   # the K=1 gates really are in the graph
        assert ctx.regions and "insert_gates" in ran and "make_area_ops" in ran


# ---------------------------------------------------------------------------------------------
# functionalize_inplace

class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        h = h.relu_()
        h.add_(1.0)
        h = h + 0.5
        return self.fc2(h)


def test_functionalize_inplace_makes_private_inplace_ops_out_of_place():
    model = InPlace().to(D)
    x = torch.randn(4, 6, dtype=D)
    gm, ctx = run_until(model, x, DENSE, P.functionalize_inplace, trace=False)
    assert {"relu_", "add_"} <= {n.target for n in gm.graph.nodes if n.op == "call_method"}
    gm = P.functionalize_inplace(gm, ctx)
    methods = [n for n in gm.graph.nodes if n.op == "call_method"]
    assert not [n.target for n in methods if n.target.endswith("_")], gm.graph
    assert {"relu", "add"} <= {n.target for n in methods}
    # rebound: `h + 0.5` reads the result of the (former) add_, not the value before it
    plus = next(n for n in gm.graph.nodes if n.op == "call_function" and n.args[1:] == (0.5,))
    assert plus.args[0].op == "call_method" and plus.args[0].target == "add"
    gm.recompile()
    torch.testing.assert_close(gm(x), model(x))


class MutatesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x.mul_(2.0)
        return self.fc(x)


def test_functionalize_inplace_keeps_a_mutation_of_an_input_in_place_and_rebinds_its_reads():
    model = MutatesInput().to(D)
    x = torch.randn(2, 4, dtype=D)
    gm, ctx = run_until(model, x, DENSE, P.functionalize_inplace, trace=False)
    gm = P.functionalize_inplace(gm, ctx)
    (mul_,) = [n for n in gm.graph.nodes if n.op == "call_method"]
    assert mul_.target == "mul_"   # the caller sees the mutation: it stays
    fc = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert fc.args[0] is mul_
    a, b = x.clone(), x.clone()
    torch.testing.assert_close(gm(a), model(b))
    torch.testing.assert_close(a, b)


def test_functionalize_inplace_leaves_an_export_graph_as_it_is():
    gm, ctx = run_until(mlp3(), x_mlp(), DENSE, P.functionalize_inplace)
    code = gm.code
    assert P.functionalize_inplace(gm, ctx).code == code


# ---------------------------------------------------------------------------------------------
# normalize_layers

class TorchLevel(nn.Module):
    """nn.Linear and nn.Conv1d modules, F.linear, `@` with W.T, torch.matmul."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.W = nn.Parameter(torch.randn(6, 6) * 0.4)
        self.b = nn.Parameter(torch.zeros(6))
        self.V = nn.Parameter(torch.randn(6, 4) * 0.4)
        self.conv = nn.Conv1d(1, 2, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        h = F.linear(h, self.W, self.b)
        h = torch.tanh(h @ self.W.T)
        h = torch.matmul(h, self.V)
        return self.conv(h.unsqueeze(1)).flatten(1)


def test_normalize_layers_turns_torch_level_layers_into_aten_ops():
    model = TorchLevel().to(D)
    x = torch.randn(3, 5, dtype=D)
    gm, ctx = run_until(model, x, DENSE, P.normalize_layers, trace=False)
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"fc", "conv"}
    gm = P.normalize_layers(gm, ctx)
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    t = targets(gm)
    assert t[aten.linear.default] == 2 and t[aten.matmul.default] == 2 \
        and t[aten.convolution.default] == 1, t
    assert not {F.linear, torch._C._nn.linear, torch.matmul, operator.matmul} & set(t)
    # module parameters are read by get_attr under their qualified names
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"fc.weight", "fc.bias", "conv.weight", "conv.bias"} <= reads
    gm.recompile()
    torch.testing.assert_close(gm(x), model(x))


def test_normalize_layers_leaves_an_export_graph_as_it_is():
    gm, ctx = run_until(mlp3(), x_mlp(), DENSE, P.normalize_layers)
    code = gm.code
    assert P.normalize_layers(gm, ctx).code == code


# ---------------------------------------------------------------------------------------------
# decompose_addmm

class AddMM(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(5, 6) * 0.4)
        self.b = nn.Parameter(torch.randn(6))
        self.W2 = nn.Parameter(torch.randn(6, 3) * 0.4)
        self.b2 = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = torch.tanh(torch.addmm(self.b, x, self.W))
        return torch.addmm(self.b2, h, self.W2, beta=0.5, alpha=2.0)


def test_decompose_addmm_splits_addmm_into_a_linear_layer_and_an_add():
    model = AddMM().to(D)
    x = torch.randn(3, 5, dtype=D)
    gm, ctx = run_until(model, x, DENSE, P.decompose_addmm)
    assert targets(gm)[aten.addmm.default] == 2
    gm = P.decompose_addmm(gm, ctx)
    t = targets(gm)
    assert aten.addmm.default not in t
    linears = nodes_of(gm, aten.linear.default)
    assert len(linears) == 2
    for lin, w in zip(linears, ("W", "W2")):   # linear(x, t(W), ...)
        wt = lin.args[1]
        assert wt.target is aten.t.default and wt.args[0].target == w
    assert linears[0].args[2].target == "b"    # beta = alpha = 1, 1-D bias: stays the linear's bias
    assert len(linears[1].args) < 3 or linears[1].args[2] is None   # β·b + α·linear(x, t(W))
    assert t[aten.mul.Tensor] == 2 and t[aten.add.Tensor] == 1
    # the nodes it inserts carry meta["val"] (the capture has shapes)
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    gm.recompile()
    torch.testing.assert_close(gm(x), model(x))
    # and the layer finder now sees two layers
    gm = pipeline._analyse(P.follow_training_mode(gm, ctx), ctx)
    assert [e.weight for e in ctx.plan.layers] == ["W", "W2"]


# ---------------------------------------------------------------------------------------------
# follow_training_mode

class DropBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.bn(self.drop(self.fc(x))))


def test_follow_training_mode_makes_dropout_and_batch_norm_follow_train_and_eval():
    model = DropBN().to(D)
    x = torch.randn(8, 5, dtype=D)
    gm, ctx = run_until(model, x, DENSE, P.follow_training_mode)
    (drop,) = nodes_of(gm, aten.dropout.default)
    (bn,) = nodes_of(gm, aten.batch_norm.default)
    assert drop.args[2] is True and bn.args[5] is True   # the mode export traced in, as constants
    frozen = copy.deepcopy(gm)
    gm = P.follow_training_mode(gm, ctx)
    flag = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "training")
    assert drop.args[2] is flag and bn.args[5] is flag
    (count,) = nodes_of(gm, aten.add_.Tensor)
    assert count.args[0].target == "bn.num_batches_tracked" and count.args[1] is flag

    model.eval()
    expected = model(x)
    gm.eval()
    torch.testing.assert_close(gm(x), expected)      # no dropout, running statistics
    torch.testing.assert_close(gm(x), expected)
    assert int(gm.get_buffer("bn.num_batches_tracked")) == 0   # eval counts no batch
    frozen.eval()
    assert not torch.allclose(frozen(x), expected)   # without the pass: still in training mode

    gm.train()
    a, b = gm(x), gm(x)
    assert not torch.allclose(a, b)                  # dropout is active again
    assert int(gm.get_buffer("bn.num_batches_tracked")) == 2


# ---------------------------------------------------------------------------------------------
# analyse

def test_analyse_fills_plan_specs_tracer_and_head():
    gm, ctx = run_until(mlp3(), x_mlp(), DENSE, "analyse")
    assert ctx.plan is None and not ctx.specs
    code = gm.code
    gm = pipeline._analyse(gm, ctx)
    assert gm.code == code
    assert [e.name for e in ctx.plan.layers] == ["0", "2", "4"]
    assert [s.param for s in ctx.specs] == ["0.weight", "2.weight", "4.weight"]
    assert ctx.head is ctx.specs[-1] and ctx.plan.head.name == "4"
    assert [e.role for e in ctx.plan.layers] == ["hidden", "hidden", "head"]
    assert ctx.tracer is not None and "0.weight" in ctx.tracer.params


# ---------------------------------------------------------------------------------------------
# find_regions

def test_find_regions_groups_the_hidden_layers_of_a_3_layer_mlp():
    gm, ctx = run_until(mlp3(), x_mlp(), GATED, P.find_regions)
    code = gm.code
    gm = P.find_regions(gm, ctx)
    assert gm.code == code   # it reads the graph, changes nothing
    (region,) = ctx.regions
    assert [s.param for s in region.layers] == ["0.weight", "2.weight"]
    assert [s.param for s in region.exits] == ["4.weight"]   # the head keeps a dense output
    assert region.reads.op == "placeholder" and region.features == 8
    assert region.route_by == "sample" and region.phi == "identity"
    assert [(e.gate, e.area_mode) for e in ctx.plan.layers] == \
        [(region.gate, "partition"), (region.gate, "partition"), (region.gate, "exit")]
    assert ctx.plan.regions and ctx.plan.regions[0]["gate"] == region.gate


def test_find_regions_finds_none_in_a_1_layer_model_and_the_pipeline_warns():
    model = nn.Sequential(nn.Linear(8, 3)).to(D)
    gm, ctx = run_until(model, x_mlp(), GATED, P.find_regions)
    gm = P.find_regions(gm, ctx)
    assert ctx.regions == []
    assert any(n.startswith("no SAL region: ") for n in ctx.plan.notes), ctx.plan.notes
    with pytest.warns(UserWarning, match="no layer is gated"):
        pipeline._check_routed(gm, ctx)


# ---------------------------------------------------------------------------------------------
# insert_gates

def test_insert_gates_adds_one_region_gate_and_records_its_routes():
    model, x = mlp3(), x_mlp()
    gm, ctx = run_until(model, x, GATED, P.insert_gates)
    assert ctx.routes == {}
    gm = P.insert_gates(gm, ctx)
    t = targets(gm)
    assert t[ops.region_gate.default] == 1 and t[ops.count_routes.default] == 1
    (gate,) = nodes_of(gm, ops.region_gate.default)
    name = ctx.regions[0].gate
    area, anchor = ctx.routes[name]
    assert (area.args, anchor.args) == ((gate, 0), (gate, 1))
    feats = gate.args[0]   # φ(detach(h)): no gradient from the gate into the network
    assert feats.target is aten.detach.default and feats.args[0] is ctx.regions[0].reads
    order = list(gm.graph.nodes)
    assert order.index(gate) < order.index(ctx.regions[0].layers[0].node)
    holder = gm.get_submodule(f"sal_gates.{name}")
    assert holder.proj.shape == (GATED.route_dim, 8) and holder.proj.requires_grad
    assert holder.prototypes.shape == (4, GATED.route_dim)
    torch.testing.assert_close(holder.prototypes.norm(dim=1), torch.ones(4, dtype=D))
    gm.recompile()
    torch.testing.assert_close(gm(x), model(x))   # the layers are not gated yet
    assert holder.counts.sum().item() == x.shape[0]   # every row was routed, and counted


# ---------------------------------------------------------------------------------------------
# make_area_ops

def test_make_area_ops_replaces_the_gated_linears_by_area_linear():
    model, x = mlp3(), x_mlp()
    gm, ctx = run_until(model, x, GATED, P.make_area_ops)
    gm = P.make_area_ops(gm, ctx)
    t = targets(gm)
    assert aten.linear.default not in t and t[ops.area_linear.default] == 3
    area, anchor = ctx.routes[ctx.regions[0].gate]
    got = []
    for spec in ctx.specs:
        n = spec.node
        assert n.target is ops.area_linear.default and spec.area
        assert get_arg(n, "area") is area and get_arg(n, "anchor") is anchor
        assert get_arg(n, "feedback") is None and get_arg(n, "areas") == 4   # attach_fa fills it
        got.append((get_arg(n, "mode"), get_arg(n, "input_block")))
    assert got == [("partition", False), ("partition", True), ("dense", True)]
    assert [e.node for e in ctx.plan.layers] == [s.node.name for s in ctx.specs]
    # partition: a row routed to area k gets only block k of the layer's output, the dense values
    gm.recompile()
    values = node_values(gm, x)
    k = values[area.name]
    y0 = values[ctx.specs[0].node.name]
    dense = model[0](x).detach()
    block = 16 // 4
    for r in range(x.shape[0]):
        lo = int(k[r]) * block
        torch.testing.assert_close(y0[r, lo:lo + block], dense[r, lo:lo + block])
        assert y0[r, :lo].abs().sum() == 0 and y0[r, lo + block:].abs().sum() == 0


def test_make_area_ops_scales_block_reading_weights_by_sqrt_k():
    model, x = mlp3(), x_mlp()
    gm, ctx = run_until(model, x, SALConfig(areas=4), P.make_area_ops)
    gm = P.make_area_ops(gm, ctx)
    w = dict(gm.named_parameters())
    torch.testing.assert_close(w["0.weight"], model[0].weight)          # dense input
    torch.testing.assert_close(w["2.weight"], 2.0 * model[2].weight)    # reads its input's block
    torch.testing.assert_close(w["4.weight"], 2.0 * model[4].weight)
    assert model[2].weight.data_ptr() != w["2.weight"].data_ptr()


def test_make_area_ops_with_one_area_computes_the_dense_model():
    model, x = mlp3(), x_mlp()
    gm, ctx = run_until(model, x, SALConfig(areas=1, gate_layers=["0", "2"]), P.make_area_ops)
    gm = P.make_area_ops(gm, ctx)
    assert targets(gm)[ops.area_linear.default] == 3
    torch.testing.assert_close(out(gm, x), model(x))


def test_make_area_ops_reference_uses_the_masked_dense_ops():
    from salcompile.ops import areas
    gm, ctx = run_until(mlp3(), x_mlp(), GATED.replace(area_impl="reference"), P.make_area_ops)
    gm = P.make_area_ops(gm, ctx)
    t = targets(gm)
    assert t[areas.area_linear_reference] == 3 and ops.area_linear.default not in t


# ---------------------------------------------------------------------------------------------
# split_shared_path

def test_split_shared_path_is_a_no_op_without_a_shared_fraction():
    gm, ctx = run_until(mlp3(), x_mlp(), GATED, P.split_shared_path)
    code = gm.code
    gm = P.split_shared_path(gm, ctx)
    assert gm.code == code
    assert all(e.shared == 0 and e.shared_in == 0 and not e.parts for e in ctx.plan.layers)


def test_split_shared_path_splits_each_layer_into_a_dense_and_a_routed_part():
    model, x = mlp3(), x_mlp()
    config = GATED.replace(shared_fraction=0.5)
    gm, ctx = run_until(model, x, config, P.split_shared_path)
    assert targets(gm)[ops.area_linear.default] == 3
    gm = P.split_shared_path(gm, ctx)
    assert [(e.shared, e.shared_in) for e in ctx.plan.layers] == [(8, 0), (8, 8), (0, 8)]
    assert all(len(s.parts) >= 2 for s in ctx.specs)
    assert [e.parts for e in ctx.plan.layers] == [[p.name for p in s.parts] for s in ctx.specs]
    t = targets(gm)
    assert t[aten.linear.default] == 3            # one dense piece per layer, on slices of W
    assert t[ops.area_linear.default] == 5        # 1 + 3 + 1 routed pieces
    for s in ctx.specs:
        assert s.node.op == "call_function" and s.node.name in [e.node for e in ctx.plan.layers]
    # the first layer's shared outputs are computed densely for every row
    gm.recompile()
    values = node_values(gm, x)
    y0 = values[ctx.specs[0].node.name]
    assert y0.shape == (6, 16)
    torch.testing.assert_close(y0[:, :8], model[0](x).detach()[:, :8])


def test_split_shared_path_with_everything_shared_is_the_dense_model():
    model, x = mlp3(), x_mlp()
    gm, ctx = run_until(model, x, GATED.replace(shared_fraction=1.0), P.split_shared_path)
    gm = P.split_shared_path(gm, ctx)
    assert ops.area_linear.default not in targets(gm)
    gm.recompile()
    torch.testing.assert_close(out(gm, x), model(x))


# ---------------------------------------------------------------------------------------------
# attach_fa

def test_attach_fa_gives_each_layer_an_fa_op_with_a_feedback_buffer_of_its_weights_shape():
    model, x = mlp3(), x_mlp()
    gm, ctx = run_until(model, x, DENSE, P.attach_fa)
    gm = P.attach_fa(gm, ctx)
    t = targets(gm)
    assert aten.linear.default not in t and t[ops.fa_linear.default] == 3
    buffers = dict(gm.named_buffers())
    params = dict(gm.named_parameters())
    for spec, entry in zip(ctx.specs, ctx.plan.layers):
        n = spec.node
        assert n.target is ops.fa_linear.default and entry.node == n.name
        b = get_arg(n, "feedback")
        assert b.op == "get_attr"
        assert b.target == entry.feedback_buffer == f"{entry.name}.weight_feedback"
        assert buffers[b.target].shape == params[entry.weight].shape
        assert b.target not in params   # FA's B is a fixed buffer
        assert not torch.equal(buffers[b.target], params[entry.weight])
    torch.testing.assert_close(out(gm, x), model(x))   # the forward is the plain one
    g, ref = loss_grads(gm, x), loss_grads(model, x)
    torch.testing.assert_close(g["4.weight"], ref["4.weight"])   # the head's dW is exact
    assert not torch.allclose(g["0.weight"], ref["0.weight"])    # the error came back through B


def test_attach_fa_with_b_equal_to_w_is_backprop():
    model, x = mlp3(), x_mlp()
    gm, ctx = run_until(model, x, DENSE.replace(feedback_init="weights"), P.attach_fa)
    gm = P.attach_fa(gm, ctx)
    for name in ("0", "2", "4"):
        torch.testing.assert_close(gm.get_buffer(f"{name}.weight_feedback"),
                                   gm.get_parameter(f"{name}.weight"))
    g, ref = loss_grads(gm, x), loss_grads(model, x)
    assert g.keys() == ref.keys()
    for n in g:
        torch.testing.assert_close(g[n], ref[n])


def test_attach_fa_fills_the_feedback_slot_of_area_ops():
    gm, ctx = run_until(mlp3(), x_mlp(), GATED.replace(fuse_regions=False), P.attach_fa)
    gm = P.attach_fa(gm, ctx)
    assert ops.fa_linear.default not in targets(gm)
    for spec, entry in zip(ctx.specs, ctx.plan.layers):
        b = get_arg(spec.node, "feedback")
        assert b is not None and b.target == entry.feedback_buffer
        assert get_arg(spec.node, "match_norm") is True   # feedback_scale="match"


# ---------------------------------------------------------------------------------------------
# attach_dfa

def test_attach_dfa_adds_dfa_output_with_one_tap_and_d_per_hidden_layer_input():
    model, x = mlp3(), x_mlp()
    config = DENSE.replace(feedback="dfa")
    gm, ctx = run_until(model, x, config, P.attach_dfa)
    gm = P.attach_dfa(gm, ctx)
    (dfa,) = nodes_of(gm, ops.dfa_output.default)
    y, taps, ds = dfa.args
    assert y is ctx.head.node
    assert [t.name for t in taps] == ctx.plan.dfa_taps and len(taps) == 2   # inputs of 2 and 4
    assert [d.target for d in ds] == ["2.weight_dfa", "4.weight_dfa"]
    for d in ds:
        assert gm.get_buffer(d.target).shape == (3, 16)   # n_out x tap width
    assert ctx.plan.layers[0].feedback_buffer == ""       # layer 0 reads the input: no tap
    for tap, spec in zip(taps, ctx.specs[1:]):
        assert spec.node.args[0].target is aten.detach.default and spec.node.args[0].args[0] is tap
    assert list(gm.graph.nodes)[-1].args[0][0] is dfa      # the model output goes through it
    torch.testing.assert_close(out(gm, x), model(x))
    g = loss_grads(gm, x)
    assert set(g) == {n for n, _ in model.named_parameters()}   # e·D reaches every layer


# ---------------------------------------------------------------------------------------------
# guard_finite

def test_guard_finite_guards_the_input_and_every_layer_output():
    model, x = mlp3(), x_mlp()
    gm, ctx = run_until(model, x, DENSE.replace(check_finite=True), P.guard_finite)
    gm = P.guard_finite(gm, ctx)
    guards = nodes_of(gm, ops.check_finite.default)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert [g.args[1] for g in guards] == [f"input {placeholder.name}", "0", "2", "4"]
    for g, spec in zip(guards[1:], ctx.specs):
        assert g.args[0] is spec.node and list(spec.node.users) == [g]   # others read the guard
    torch.testing.assert_close(out(gm, x), model(x))
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(SalcompileError, match="input"):
        gm(bad)
    with torch.no_grad():
        gm.get_parameter("2.bias")[0] = float("inf")
    with pytest.raises(SalcompileError, match="2"):
        gm(x)


# ---------------------------------------------------------------------------------------------
# fuse_regions / unfuse_regions

def test_fuse_regions_introduces_region_sort_and_compact_linear_and_unfuse_gives_area_ops_back():
    model, x = mlp3(), x_mlp()
    gm, ctx = run_until(model, x, GATED, P.fuse_regions)
    assert targets(gm)[ops.area_linear.default] == 3
    y0, g0 = out(gm, x).detach(), loss_grads(gm, x)
    gm = P.fuse_regions(gm, ctx)
    t = targets(gm)
    assert t[ops.region_sort.default] == 1          # one sort per gate
    assert t[ops.compact_linear.default] == 3 and ops.area_linear.default not in t
    assert [e.node for e in ctx.plan.layers] == \
        [n.name for n in nodes_of(gm, ops.compact_linear.default)]
    gm.recompile()
    torch.testing.assert_close(out(gm, x), y0)       # same values
    g1 = loss_grads(gm, x)
    assert g1.keys() == g0.keys()
    for n in g0:                                     # and gradients
        torch.testing.assert_close(g1[n], g0[n])
    graph = P.unfuse_regions(gm.graph)
    back = fx.GraphModule(gm, graph)
    t = targets(back)
    assert t[ops.area_linear.default] == 3
    assert not {ops.compact_linear.default, ops.region_sort.default} & set(t)
    assert targets(gm)[ops.compact_linear.default] == 3   # a copy: the fused graph is untouched
    torch.testing.assert_close(out(back, x), y0)


# ---------------------------------------------------------------------------------------------
# audit_parameters

def test_audit_parameters_fills_roles_and_changes_nothing():
    gm, ctx = run_until(mlp3(), x_mlp(), GATED, P.audit_parameters)
    code = gm.code
    gm = P.audit_parameters(gm, ctx)
    assert gm.code == code
    roles = ctx.plan.roles
    assert {roles[f"{i}.weight"] for i in (0, 2, 4)} == {"layer"}
    assert {roles[f"{i}.bias"] for i in (0, 2, 4)} == {"local"}
    gate = ctx.regions[0].gate
    assert roles[f"sal_gates.{gate}.proj"] == "local"
    assert set(roles) == {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    assert ctx.plan.backprop == []


def test_audit_parameters_catches_a_weight_use_the_plan_does_not_know(monkeypatch):
    gm, ctx = run_until(mlp3(), x_mlp(), DENSE, P.audit_parameters)
    # simulate a layer-finder bug: layer 2 is missing from the plan
    ctx.plan.layers = [e for e in ctx.plan.layers if e.name != "2"]
    monkeypatch.setenv("SALCOMPILE_STRICT_AUDIT", "1")
    with pytest.raises(SalcompileError, match=r"missed weight uses.*2\.weight"):
        P.audit_parameters(gm, ctx)
    monkeypatch.setenv("SALCOMPILE_STRICT_AUDIT", "0")
    with pytest.warns(UserWarning, match="missed weight uses"):
        P.audit_parameters(gm, ctx)
    (missed,) = ctx.plan.backprop
    assert set(missed.weights) == {"2.weight", "2.bias"}   # fa_linear reads both
    assert "parameter audit" in missed.reason
    assert ctx.plan.roles["2.weight"] == "backprop" and ctx.plan.roles["0.weight"] == "layer"
    # and on_backprop="error" refuses it
    ctx.config = ctx.config.replace(on_backprop="error")
    ctx.plan.backprop = []
    with pytest.warns(UserWarning, match="missed weight uses"), \
            pytest.raises(SalcompileError, match="on_backprop='error'"):
        P.audit_parameters(gm, ctx)


# ---------------------------------------------------------------------------------------------
# strip_feedback

def test_strip_feedback_gives_the_plain_ops_back_and_backprop_gradients():
    model, x = mlp3(), x_mlp()
    gm, ctx = run_until(model, x, DENSE)
    assert targets(gm)[ops.fa_linear.default] == 3
    graph = P.strip_feedback(gm.graph)
    plain = fx.GraphModule(gm, graph)
    t = targets(plain)
    assert t[aten.linear.default] == 3
    assert not [k for k in t if getattr(k, "namespace", "") == "salcompile"], t
    assert not [n for n in graph.nodes if n.op == "get_attr" and n.target.endswith("_feedback")]
    assert targets(gm)[ops.fa_linear.default] == 3   # a copy: the FA graph is untouched
    torch.testing.assert_close(out(plain, x), model(x))
    g, ref = loss_grads(plain, x), loss_grads(model, x)
    assert g.keys() == ref.keys()
    for n in g:
        torch.testing.assert_close(g[n], ref[n])


def test_strip_feedback_removes_dfa_output_and_its_taps():
    model, x = mlp3(), x_mlp()
    gm, ctx = run_until(model, x, DENSE.replace(feedback="dfa"))
    graph = P.strip_feedback(gm.graph)
    plain = fx.GraphModule(gm, graph)
    t = targets(plain)
    assert ops.dfa_output.default not in t and aten.detach.default not in t
    assert not [n for n in graph.nodes if n.op == "get_attr" and n.target.endswith("_dfa")]
    g, ref = loss_grads(plain, x), loss_grads(model, x)
    for n in ref:
        torch.testing.assert_close(g[n], ref[n])


def test_strip_feedback_empties_the_feedback_slot_of_area_ops():
    gm, ctx = run_until(mlp3(), x_mlp(), GATED.replace(fuse_regions=False))
    graph = P.strip_feedback(gm.graph)
    areas_ = [n for n in graph.nodes if n.target is ops.area_linear.default]
    assert len(areas_) == 3
    assert all(get_arg(n, "feedback") is None and get_arg(n, "match_norm") is False
               for n in areas_)


# ---------------------------------------------------------------------------------------------
# meta["val"] of the finished graph (issue 16: nodes a pass inserts carry a true meta["val"])

def _flat(v):
    if isinstance(v, (tuple, list)):
        return [y for x in v for y in _flat(x)]
    return [v]


def _size(d):
    if isinstance(d, torch.SymInt):
        return d.node.hint   # the example input's size
    return int(d)


def val_problems(model, x, config):
    """[(pass, node, target, problem)] for every call_function node of the finished graph whose
    meta["val"] is missing or whose shape/dtype disagrees with what the node computes on `x`.
    `pass` is the one after which the node was first seen without a (true) val."""
    gm, how = capture(model, (x,))
    ctx = PassContext(config=config, capture=how)
    blame = {}
    for step, when in pipeline._order(config):
        if when(ctx):
            gm = pipeline._run(step, gm, ctx)   # the runner fills the vals (passes/_meta.py)
            for n in gm.graph.nodes:
                if n.op == "call_function" and "val" not in n.meta:
                    blame.setdefault(n.name, step_name(step))
    values = node_values(gm, x)
    problems = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        where = blame.get(n.name, "?")
        if "val" not in n.meta:
            problems.append((where, n.name, str(n.target), "no meta['val']"))
            continue
        real, fake = _flat(values[n.name]), _flat(n.meta["val"])
        if len(real) != len(fake):
            problems.append((where, n.name, str(n.target), f"{len(fake)} values for {len(real)}"))
            continue
        for a, b in zip(real, fake):
            if isinstance(a, torch.Tensor) and not (
                    isinstance(b, torch.Tensor) and a.dtype == b.dtype
                    and list(a.shape) == [_size(d) for d in b.shape]):
                problems.append((where, n.name, str(n.target),
                                 f"computes {tuple(a.shape)} {a.dtype}, val says "
                                 f"{getattr(b, 'shape', b)} {getattr(b, 'dtype', '')}"))
    return problems


@pytest.mark.parametrize("make, make_x, config", [
    pytest.param(mlp3, x_mlp, SALConfig(areas=4), id="gated-mlp-areas4"),
    pytest.param(cnn, x_cnn, SALConfig(areas=4), id="cnn-areas4"),
    pytest.param(mlp3, x_mlp, SALConfig(areas=4, shared_fraction=0.5, fuse_regions=False),
                 id="gated-mlp-shared-unfused"),
    pytest.param(mlp3, x_mlp, SALConfig(areas=4, route_top_k=2, fuse_regions=False),
                 id="gated-mlp-topk-unfused"),
    pytest.param(mlp3, x_mlp, SALConfig(areas=4, feedback="dfa", check_finite=True),
                 id="gated-mlp-dfa-guarded"),
    pytest.param(mlp3, x_mlp, SALConfig(areas=4, area_mode="replicate"), id="gated-mlp-replicate"),
    pytest.param(mlp3, x_mlp, SALConfig(areas=4, route_top_k=2), id="gated-mlp-topk-fused"),
    pytest.param(mlp3, x_mlp, SALConfig(areas=4, shared_fraction=0.5), id="gated-mlp-shared-fused"),
])
def test_every_node_of_the_finished_graph_carries_a_true_val(make, make_x, config):
    problems = val_problems(make(), make_x(), config)
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.parametrize("make, make_x, config", [
    (mlp3, x_mlp, SALConfig(areas=1, check_finite=True)),
    (mlp3, x_mlp, SALConfig(areas=1, feedback="usf")),
    (cnn, x_cnn, SALConfig(areas=1, feedback="dfa", check_finite=True)),
], ids=["mlp-fa-finite", "mlp-usf", "cnn-dfa-finite"])
def test_the_dense_passes_insert_nodes_with_a_true_val(make, make_x, config):
    problems = val_problems(make(), make_x(), config)
    assert not problems, "\n".join(map(str, problems))
