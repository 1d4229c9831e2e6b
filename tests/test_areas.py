"""SAL areas end to end: K=1 ≡ dense, fast ≡ masked-dense reference, selective updates, a gate
that learns only from its local rule, deterministic routing, the plan's regions and sparsity."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salcompile
from salcompile import SalcompileError
from conftest import D, Encoder, assert_grads_equal, dense_transform, grads, loss_of, mlp


class SmallCNN(nn.Module):
    """Channel blocks through relu and pooling, then a linear layer and the head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 3 * 3, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = F.max_pool2d(torch.relu(self.c2(h)), 2)
        return self.head(torch.relu(self.fc(h.flatten(1))))


def cases():
    """(name, model, input, K) in float64."""
    return [
        ("mlp", lambda: mlp(8, 16, 3, depth=3).double(), lambda b: torch.randn(b, 8, dtype=D), 4),
        ("cnn", lambda: SmallCNN().double(), lambda b: torch.randn(b, 3, 6, 6, dtype=D), 4),
        ("encoder", lambda: Encoder().double(), lambda b: torch.randn(b, 5, 8, dtype=D), 4),
    ]


def _combos(feedbacks):
    """(case, feedback) pairs; DFA refuses transformer classifiers (tested in test_modes)."""
    return [pytest.param(*c, fb, id=f"{c[0]}-{fb}") for c in cases() for fb in feedbacks
            if not (fb == "dfa" and c[0] == "encoder")]


def _sal(model, x, **kw):
    return salcompile.transform(model, (x,), **kw)


def _all_in_area_zero(sal):
    """Zero projections: z = 0 for every row, so argmax picks area 0 everywhere."""
    for name, p in sal.named_parameters():
        if name.endswith(".proj"):
            p.data.zero_()


def _without_gates(g):
    return {k: v for k, v in g.items() if not k.startswith("sal_gates.")}


@pytest.mark.parametrize("name,make,inp,k,feedback", _combos(["fa", "bp", "dfa"]))
def test_one_area_equals_dense(name, make, inp, k, feedback):
    x, model = inp(5), make()
    plain = dense_transform(model, (x,), feedback=feedback)
    ref = grads(plain, x)
    sal = _sal(model, x, feedback=feedback, areas=1, gate_layers=lambda n: n != "head"
               and not n.endswith("layers.2"))
    assert sal.sal_plan.regions, "gates were inserted"
    torch.testing.assert_close(sal(x), plain(x), rtol=0, atol=0)
    got = grads(sal, x)
    assert all(float(v.abs().max()) == 0 for k2, v in got.items() if k2.startswith("sal_gates."))
    assert_grads_equal(_without_gates(got), ref)


@pytest.mark.filterwarnings("ignore:example_inputs have batch size 1")
@pytest.mark.parametrize("mode", ["partition", "replicate"])
@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("name,make,inp,k,feedback", _combos(["fa", "dfa"]))
def test_fast_equals_reference(name, make, inp, k, feedback, batch, mode):
    x, model = inp(batch), make()
    fast = _sal(model, x, areas=k, area_mode=mode, feedback=feedback)
    ref = _sal(model, x, areas=k, area_mode=mode, feedback=feedback, area_impl="reference")
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-12, atol=1e-12)
    assert_grads_equal(grads(fast, x), grads(ref, x))


@pytest.mark.parametrize("name,make,inp,k", cases(), ids=[c[0] for c in cases()])
def test_fast_equals_reference_all_rows_in_one_area(name, make, inp, k):
    x, model = inp(6), make()
    fast, ref = _sal(model, x, areas=k), _sal(model, x, areas=k, area_impl="reference")
    _all_in_area_zero(fast), _all_in_area_zero(ref)
    assert_grads_equal(grads(fast, x), grads(ref, x))
    stats = salcompile.routing_stats(fast)
    assert all(s["active"] == 1 and s["counts"][0] == s["rows"] for s in stats.values())


def test_fa_with_weights_equals_bp_with_areas():
    model, x = SmallCNN().double(), torch.randn(6, 3, 6, 6, dtype=D)
    fa = _sal(model, x, areas=4, feedback_init="weights", feedback_scale="none")
    bp = _sal(model, x, areas=4, feedback="bp")
    assert_grads_equal(grads(fa, x), grads(bp, x))


def test_partition_only_updates_the_routed_area():
    torch.manual_seed(1)
    model, k = mlp(8, 16, 3, depth=3).double(), 4
    x = torch.randn(1, 8, dtype=D).repeat(6, 1)  # identical rows: one area
    sal = salcompile.transform(model, (x,), areas=k)
    before = {n: p.detach().clone() for n, p in sal.named_parameters()}
    opt = torch.optim.SGD(sal.parameters(), lr=0.1)
    loss_of(sal(x)).backward()
    opt.step()
    sal.requires_grad_(False)
    (area,) = [a for a, c in enumerate(salcompile.routing_stats(sal)["gate_0"]["counts"]) if c]
    blk = 16 // k
    for n in ("layers.0", "layers.1"):
        dw = (sal.get_parameter(f"{n}.weight") - before[f"{n}.weight"]).abs().sum(1)
        db = (sal.get_parameter(f"{n}.bias") - before[f"{n}.bias"]).abs()
        rows = torch.arange(16) // blk == area
        assert float(dw[~rows].max()) == 0 and float(db[~rows].max()) == 0
        assert float(dw[rows].max()) > 0
    head = (sal.get_parameter("layers.2.weight") - before["layers.2.weight"]).abs().sum(0)
    cols = torch.arange(16) // blk == area
    assert float(head[~cols].max()) == 0 and float(head[cols].max()) > 0


def test_gate_gradient_ignores_the_network_loss():
    x = torch.randn(9, 8, dtype=D)
    sal = salcompile.transform(mlp(8, 16, 3, depth=3).double(), (x,), areas=4)
    got = []
    for loss in (lambda o: o.sum(), lambda o: 3 * o.square().sum(), lambda o: -o[:, 0].mean()):
        sal.zero_grad()
        loss(sal(x)).backward()
        got.append(sal.get_parameter("sal_gates.gate_0.proj").grad.clone())
    assert float(got[0].abs().sum()) > 0
    for g in got[1:]:
        torch.testing.assert_close(g, got[0], rtol=0, atol=0)


def test_routing_is_deterministic_given_the_seeds():
    x = torch.randn(20, 8)
    a = salcompile.transform(mlp(8, 16, 3, depth=3), (x,), areas=4, routing_seed=3)
    b = salcompile.transform(mlp(8, 16, 3, depth=3), (x,), areas=4, routing_seed=3)
    c = salcompile.transform(mlp(8, 16, 3, depth=3), (x,), areas=4, routing_seed=4)
    a(x), b(x), c(x)
    sa, sb, sc = (salcompile.routing_stats(m)["gate_0"]["counts"] for m in (a, b, c))
    assert sa == sb and sum(sa) == 20
    pa, pc = (m.get_buffer("sal_gates.gate_0.prototypes") for m in (a, c))
    assert not torch.equal(pa, pc)


def test_replicate_starts_as_the_dense_model():
    x = torch.randn(7, 8, dtype=D)
    model = mlp(8, 16, 3, depth=3).double()
    sal = salcompile.transform(model, (x,), areas=4, area_mode="replicate", feedback="bp")
    torch.testing.assert_close(sal(x), model(x), rtol=1e-12, atol=1e-12)
    assert sal.get_parameter("layers.0.weight").shape == (4, 16, 8)
    assert sal.get_parameter("layers.2.weight").shape == (3, 16)  # the head is shared


def test_width_not_divisible_names_the_layer():
    with pytest.raises(SalcompileError, match=r"layers\.0 has 16 outputs, not divisible by K=3"):
        salcompile.transform(mlp(8, 16, 3, depth=3), (torch.randn(2, 8),), areas=3)


def test_plan_shows_regions_modes_and_sparsity():
    x = torch.randn(2, 8)
    p = salcompile.plan(mlp(8, 16, 3, depth=3), (x,), areas=4)
    by = {l.name: l for l in p.layers}
    assert [r["gate"] for r in p.regions] == ["gate_0"]
    assert by["layers.0"].area_mode == "partition" and by["layers.0"].sees == "dense"
    assert by["layers.1"].area_mode == "partition" and by["layers.1"].input_block
    assert by["layers.2"].area_mode == "exit" and by["layers.2"].sees == "area-sparse(gate_0)"
    text = str(p)
    assert "region gate_0: routes per sample" in text and "exit" in text


def test_sequence_model_gates_each_ffn_and_routes_tokens():
    x = torch.randn(3, 5, 8)
    p = salcompile.plan(Encoder(), (x,), areas=4)
    assert len(p.regions) == 2 and all(r["route_by"] == "token" for r in p.regions)
    gated = {l.name: l.area_mode for l in p.layers if l.area_mode}
    assert sorted(gated.values()) == ["exit", "exit", "partition", "partition"]
    assert all("linear1" in n or "linear2" in n for n in gated)  # attention left un-gated


def test_sparsity_analysis_marks_values():
    from salcompile.passes.analyse_sparsity import SparseState, analyse_sparsity

    class M(nn.Module):
        def forward(self, a, b):
            s = torch.relu(a) * 2.0
            return torch.sigmoid(s), s + torch.tanh(a), s + b

    gm = torch.fx.symbolic_trace(M())
    st = analyse_sparsity(gm, {"a": SparseState("g", -1)})
    sparse = {n for n in st}
    assert {"relu", "mul", "tanh", "add"} <= sparse
    assert "sigmoid" not in sparse and "add_1" not in sparse


def test_sal16_trains_mlp_cnn_and_transformer():
    torch.manual_seed(0)
    models = [(mlp(8, 64, 3, depth=2), torch.randn(32, 8)),
              (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(16 * 16, 3)), torch.randn(32, 3, 4, 4)),
              (nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                             nn.Flatten(), nn.Linear(16 * 4, 3)), torch.randn(32, 4, 16))]
    for model, x in models:
        y = x.flatten(1)[:, :6].reshape(32, 3, 2).sum(-1).argmax(1)  # a learnable rule
        sal = salcompile.transform(model, (x,), config=salcompile.SALConfig(areas=16))
        opt = torch.optim.Adam(sal.parameters(), lr=1e-2)
        losses = []
        for _ in range(40):
            opt.zero_grad()
            loss = F.cross_entropy(sal(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.7 * losses[0], (type(model).__name__, losses[0], losses[-1])
        assert salcompile.routing_stats(sal)


def test_block_gain_keeps_deep_partition_activations_at_the_dense_scale():
    from salcompile.models import build
    model, x = build("deep-mlp", in_features=16, width=64, depth=12), torch.randn(64, 16)
    before = model.layers[1].weight.detach().clone()
    dense = model(x).std()
    kept = salcompile.transform(model, (x,), areas=16)(x).std() / dense
    shrunk = salcompile.transform(model, (x,), areas=16, input_block_gain="none")(x).std() / dense
    assert 0.2 < kept < 5 and shrunk < 1e-6
    assert torch.equal(model.layers[1].weight, before)  # the caller's model is left alone


def test_areas_without_example_inputs_equal_the_exported_capture():
    """symbolic_trace leaves no shapes: the gate's width comes from the layer's parameter."""
    torch.manual_seed(0)
    from salcompile.models import MLP
    model = MLP(8, 16, 3, depth=3)
    x = torch.randn(9, 8)
    traced = salcompile.transform(model, areas=4)
    exported = salcompile.transform(model, (x[:2],), areas=4)
    traced.load_state_dict(exported.state_dict())
    torch.testing.assert_close(traced(x), exported(x))
    traced(x).sum().backward()
    assert traced.get_parameter("layers.0.weight").grad.abs().sum() > 0
