"""Every weight-carrying op family reaches FA, or is listed on backprop with a reason; the
parameter audit accounts for every parameter (issue: real models, no silent backprop).

Oracle: FA with feedback_init="weights", feedback_scale="none" equals plain autograd of the
untransformed model, in float64, for every parameter (constituents of composed weights included).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as P

import salcompile
from salcompile import SalcompileError

D = torch.float64


class AddmmFamily(nn.Module):
    """addmm (plain, scaled), baddbmm, addbmm, bmm with an expanded weight."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(5, 6) * 0.4)
        self.b = nn.Parameter(torch.randn(6))
        self.W2 = nn.Parameter(torch.randn(6, 6) * 0.4)
        self.W3 = nn.Parameter(torch.randn(3, 6, 4) * 0.4)
        self.b3 = nn.Parameter(torch.randn(4))
        self.Wb = nn.Parameter(torch.randn(4, 3) * 0.4)

    def forward(self, x):
        h = torch.tanh(torch.addmm(self.b, x, self.W))
        h = torch.tanh(torch.addmm(self.b, h, self.W2, beta=0.5, alpha=2.0))
        hb = h.unsqueeze(0).expand(3, -1, -1)
        g = torch.tanh(torch.baddbmm(self.b3, hb, self.W3))
        g2 = torch.addbmm(self.b3, hb, self.W3)
        e = torch.bmm(g, self.Wb.expand(3, -1, -1))
        return e.sum(0) + g2[:, :3]


class Conv1DStyle(nn.Module):
    """Hugging Face's Conv1D (GPT-2): addmm over flattened tokens, viewed back."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(5, 8) * 0.4)
        self.b = nn.Parameter(torch.randn(8))
        self.W2 = nn.Parameter(torch.randn(8, 3) * 0.4)
        self.b2 = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = torch.addmm(self.b, x.view(-1, x.size(-1)), self.W).view(x.shape[0], x.shape[1], 8)
        h = torch.relu(h)
        return torch.addmm(self.b2, h.view(-1, 8), self.W2).view(x.shape[0], x.shape[1], 3)


class LoRA(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 5) * 0.4)
        self.A = nn.Parameter(torch.randn(6, 2) * 0.4)
        self.B = nn.Parameter(torch.randn(2, 5) * 0.4)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.W + self.A @ self.B)))


class Parametrized(nn.Module):
    """weight_norm on a linear and a conv (wav2vec2's positional conv), spectral_norm."""

    def __init__(self):
        super().__init__()
        self.l = P.weight_norm(nn.Linear(5, 6))
        self.c = P.weight_norm(nn.Conv1d(1, 2, 3), dim=2)
        self.s = P.spectral_norm(nn.Linear(6, 6))
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.s(torch.tanh(self.l(x))))
        c = self.c(x.unsqueeze(1)).flatten(1)[:, :6]
        return self.out(torch.cat([h, c], 1))


class LearntScale(nn.Module):
    """scale·W with a learnt scalar scale; a conv whose weight is reached through arithmetic."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 5) * 0.4)
        self.g = nn.Parameter(torch.tensor(0.7))
        self.cw = nn.Parameter(torch.randn(2, 1, 3) * 0.4)
        self.cs = nn.Parameter(torch.ones(2, 1, 1) * 1.3)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.g * self.W))
        c = F.conv1d(x.unsqueeze(1), self.cw * self.cs).flatten(1)[:, :6]
        return self.out(torch.cat([h, c], 1))


class MaskedScaled(nn.Module):
    """A composed weight that also reads a buffer through ops of its own (a pruning mask)."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 5) * 0.4)
        self.g = nn.Parameter(torch.ones(6, 1))
        self.register_buffer("mask", torch.rand(6, 5, generator=torch.Generator().manual_seed(0)))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.g * self.W * (self.mask > 0.5))))


CASES = {"addmm": (AddmmFamily, (4, 5)), "masked_scaled": (MaskedScaled, (4, 5)), "conv1d_style": (Conv1DStyle, (2, 3, 5)),
         "lora": (LoRA, (4, 5)), "parametrized": (Parametrized, (4, 5)),
         "learnt_scale": (LearntScale, (4, 5))}


def _fa_equals_bp(model, x, example):
    sal = salcompile.transform(model, example_inputs=(x,) if example else None, areas=1,
                               feedback_init="weights", feedback_scale="none")
    ref = dict(model.named_parameters())
    mine = dict(sal.named_parameters())
    l0 = model(x).square().sum()
    l1 = sal(x).square().sum()
    g0 = torch.autograd.grad(l0, list(ref.values()))
    g1 = torch.autograd.grad(l1, [mine[n] for n in ref], allow_unused=True)
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-12)
    for n, a, b in zip(ref, g0, g1):
        assert b is not None, n
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10, msg=n)
    return sal


@pytest.mark.parametrize("example", [True, False], ids=["export", "symbolic_trace"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_weight_gets_fa_and_fa_with_weights_equals_backprop(case, example):
    cls, shape = CASES[case]
    torch.manual_seed(0)
    model, x = cls().to(D), torch.randn(*shape, dtype=D)
    if case == "parametrized" and not example:
        # symbolic_trace keeps parametrized modules opaque: listed on backprop, with the fix
        with pytest.warns(UserWarning, match="keeps backprop.*pass example_inputs"):
            sal = salcompile.transform(model, areas=1)
        assert {b.name for b in sal.sal_plan.backprop} == {"l", "c", "s"}
        with pytest.raises(SalcompileError, match="on_backprop='error'"):
            salcompile.transform(model, areas=1, on_backprop="error")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no layer left on backprop, nothing warned
        sal = _fa_equals_bp(model, x, example)
    plan = sal.sal_plan
    assert not plan.backprop
    weights = {n for n, p in model.named_parameters() if p.dim() >= 2}
    on_layers = {c for e in plan.layers for c in [e.weight, *e.constituents]}
    assert weights <= on_layers, weights - on_layers
    assert set(plan.roles) >= set(dict(model.named_parameters()))
    assert all(plan.roles[n] == "layer" for n in weights)


def test_conv1d_style_layers_read_the_token_rows():
    """GPT-2's addmm over flattened tokens becomes a linear on [batch, seq, features]."""
    sal = salcompile.transform(Conv1DStyle().to(D), example_inputs=(torch.randn(2, 3, 5, dtype=D),),
                               areas=1)
    ops = [n.target for n in sal.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.addmm.default not in ops
    assert ops.count(torch.ops.salcompile.fa_linear.default) == 2
    assert all(e.op == "linear" and e.via == "t" for e in sal.sal_plan.layers)


def test_composed_weights_list_their_constituents_and_get_effective_feedback():
    sal = salcompile.transform(LoRA().to(D), example_inputs=(torch.randn(4, 5, dtype=D),), areas=1)
    lora = next(e for e in sal.sal_plan.layers if e.weight == "W")
    assert sorted(lora.constituents) == ["A", "B", "W"]
    assert "composed with" in str(sal.sal_plan)
    assert tuple(sal.get_buffer(lora.feedback_buffer).shape) == (6, 5)   # effective weight's shape
    # a different B from W's own (random, fixed, seeded)
    again = salcompile.transform(LoRA().to(D), example_inputs=(torch.randn(4, 5, dtype=D),), areas=1)
    torch.testing.assert_close(sal.get_buffer(lora.feedback_buffer),
                               again.get_buffer(lora.feedback_buffer))


def test_composed_weight_trains_with_fa_not_backprop():
    """With a random B the LoRA layer's input gradient is B's, not W_eff's: it differs from BP."""
    torch.manual_seed(0)
    model, x = LoRA().to(D), torch.randn(4, 5, dtype=D)
    sal = salcompile.transform(model, example_inputs=(x,), areas=1, feedback_scale="none")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    sal(x1).square().sum().backward()
    model(x2).square().sum().backward()
    assert not torch.allclose(x1.grad, x2.grad)


def test_grouped_mm_op_matches_a_per_expert_loop_and_passes_opcheck():
    torch.manual_seed(0)
    x = torch.randn(7, 4, dtype=D, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=D, requires_grad=True)
    b = torch.randn(3, 4, 5, dtype=D)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)   # an empty expert; row 6 past the end
    y = torch.ops.salcompile.fa_grouped_mm(x, w, offs, b, False)
    starts = [0, 2, 2]
    ref = torch.zeros(7, 5, dtype=D)
    for e, (s, t) in enumerate(zip(starts, offs.tolist())):
        ref[s:t] = x[s:t].detach() @ w[e].detach()
    torch.testing.assert_close(y, ref)
    g = torch.randn(7, 5, dtype=D)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    want_x, want_w = torch.zeros(7, 4, dtype=D), torch.zeros(3, 4, 5, dtype=D)
    for e, (s, t) in enumerate(zip(starts, offs.tolist())):
        want_x[s:t] = g[s:t] @ b[e].T           # FA: B in the input gradient
        want_w[e] = x[s:t].detach().T @ g[s:t]   # backprop's weight gradient
    torch.testing.assert_close(gx, want_x)
    torch.testing.assert_close(gw, want_w)
    torch.library.opcheck(torch.ops.salcompile.fa_grouped_mm.default, (x, w, offs, b, False))


def test_moe_experts_through_grouped_mm_get_fa():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=30,
                                     num_local_experts=4, num_experts_per_tok=2, use_cache=False)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    # float32: torch's eager grouped_mm (the untransformed model's path) has no float64 kernel
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 30, (2, 6))
    sal = salcompile.transform(model, example_inputs=(ids,), areas=1, feedback_init="weights",
                               feedback_scale="none")
    plan = sal.sal_plan
    assert not plan.backprop
    experts = [e for e in plan.layers if e.op == "grouped_mm"]
    assert len(experts) == 2
    assert all(plan.roles[n] in ("layer", "local") for n, _ in model.named_parameters())
    ref = dict(model.named_parameters())
    mine = dict(sal.named_parameters())
    l0 = model(ids).logits.square().mean()
    l1 = sal(ids).logits.square().mean()
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    g0 = torch.autograd.grad(l0, list(ref.values()), allow_unused=True)
    g1 = torch.autograd.grad(l1, [mine[n] for n in ref], allow_unused=True)
    for n, a, b in zip(ref, g0, g1):
        if a is None:
            assert b is None or not b.any(), n
            continue
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * max(1.0, float(a.abs().max())),
                                   msg=n)


class _Opaque(nn.Module):
    """A weight used by an op salcompile has no FA form for (a bilinear form)."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 5, 5) * 0.3)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(F.bilinear(x, x, self.W)))


def test_an_unrewritable_weight_is_warned_listed_and_refusable():
    x = torch.randn(3, 5)
    with pytest.warns(UserWarning, match="keeps backprop"):
        sal = salcompile.transform(_Opaque(), example_inputs=(x,), areas=1)
    plan = sal.sal_plan
    assert [b.weights for b in plan.backprop] == [["W"]]
    assert plan.roles["W"] == "backprop" and plan.roles["out.weight"] == "layer"
    assert "1 backprop" in str(plan)
    with pytest.raises(SalcompileError, match="on_backprop='error'.*bilinear"):
        salcompile.transform(_Opaque(), example_inputs=(x,), areas=1, on_backprop="error")


def test_the_audit_catches_a_weight_use_the_layer_finder_missed(monkeypatch):
    """Simulate a layer-finder bug: linear layers go unrecognised. The audit must notice."""
    import importlib
    plan_module = importlib.import_module("salcompile.plan")
    real = plan_module.recognise

    def blind(node, tracer, gm):
        r = real(node, tracer, gm)
        return None if getattr(r, "op", None) == "linear" and "0" in r.param else r
    monkeypatch.setattr(plan_module, "recognise", blind)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(SalcompileError, match="missed weight uses.*0.weight"):
        salcompile.transform(model, example_inputs=(torch.randn(3, 4),), areas=1)
    monkeypatch.setenv("SALCOMPILE_STRICT_AUDIT", "0")
    with pytest.warns(UserWarning, match="missed weight uses"):
        sal = salcompile.transform(model, example_inputs=(torch.randn(3, 4),), areas=1)
    assert sal.sal_plan.roles["0.weight"] == "backprop"


def test_addmm_is_not_mistaken_for_an_elementwise_add():
    from salcompile.layers import LOCAL_OPS, LOCAL_PREFIXES
    for name in ("addmm", "addbmm", "baddbmm", "multi_head_attention_forward"):
        assert name not in LOCAL_OPS and not name.startswith(LOCAL_PREFIXES)


def test_roles_cover_frozen_and_tied_parameters():
    from conftest import TiedLM
    model = TiedLM().to(D)
    model.emb.weight.requires_grad_(True)
    ids = torch.randint(0, 11, (2, 5))
    sal = salcompile.transform(model, example_inputs=(ids,), areas=1)
    roles = sal.sal_plan.roles
    names = dict(model.named_parameters(remove_duplicate=False))
    assert set(names) <= set(roles)
    tied = [n for n in names if names[n] is model.emb.weight]
    assert len({roles[n] for n in tied}) == 1
    frozen = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    frozen[0].weight.requires_grad_(False)
    sal = salcompile.transform(frozen, example_inputs=(torch.randn(2, 4),), areas=1)
    assert sal.sal_plan.roles["0.weight"] == "frozen"


def test_training_exporters_refuse_composed_weights_instead_of_exporting_backprop(tmp_path):
    x = torch.randn(4, 5)
    sal = salcompile.transform(LoRA(), example_inputs=(x,), areas=1)
    with pytest.raises(SalcompileError, match="export_ort_training: layers linear .composed"):
        salcompile.export_ort_training(sal, (x,), tmp_path / "art")
    with pytest.raises(SalcompileError, match="export_train_step: layers linear .composed"):
        salcompile.export_train_step(sal, (x,), tmp_path / "step.onnx")


# ---------------------------------------------------------------- random models of real idioms
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BLOCKS = ("linear", "conv1d_addmm", "lora", "weight_norm", "swiglu", "inplace_relu", "bmm_expand",
          "scaled")


class _Block(nn.Module):
    """One idiom from real code, width d → d."""

    def __init__(self, kind, d):
        super().__init__()
        self.kind = kind
        if kind in ("linear", "inplace_relu"):
            self.l = nn.Linear(d, d)
        elif kind == "conv1d_addmm":
            self.W, self.b = nn.Parameter(torch.randn(d, d) / d ** 0.5), nn.Parameter(torch.zeros(d))
        elif kind == "lora":
            self.l = nn.Linear(d, d)
            self.A, self.B = nn.Parameter(torch.randn(d, 2) * 0.3), nn.Parameter(torch.randn(2, d) * 0.3)
        elif kind == "weight_norm":
            self.l = P.weight_norm(nn.Linear(d, d))
        elif kind == "swiglu":
            self.g, self.u, self.o = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        elif kind == "bmm_expand":
            self.W = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        elif kind == "scaled":
            self.W, self.s = nn.Parameter(torch.randn(d, d) / d ** 0.5), nn.Parameter(torch.tensor(0.9))

    def forward(self, h):
        k = self.kind
        if k == "linear":
            return torch.tanh(self.l(h))
        if k == "inplace_relu":
            y = self.l(h)
            y.relu_()
            return y + h
        if k == "conv1d_addmm":
            return torch.tanh(torch.addmm(self.b, h.view(-1, h.size(-1)), self.W).view(h.shape))
        if k == "lora":
            return torch.tanh(F.linear(h, self.l.weight + self.A @ self.B, self.l.bias))
        if k == "weight_norm":
            return torch.tanh(self.l(h))
        if k == "swiglu":
            return self.o(F.silu(self.g(h)) * self.u(h)) + h
        if k == "bmm_expand":
            return torch.tanh(torch.bmm(h, self.W.expand(h.shape[0], -1, -1)))
        return torch.tanh(F.linear(h, self.s * self.W))


class _Random(nn.Module):
    def __init__(self, kinds, d, d_out):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(k, d) for k in kinds)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4),
       d=st.sampled_from([4, 8]), seq=st.integers(2, 4), seed=st.integers(0, 2 ** 16))
def test_random_models_of_real_idioms_are_fully_accounted_and_exact(kinds, d, seq, seed):
    """Every random stack of real-code idioms: the (strict) audit passes, nothing stays on
    backprop, every matrix is a layer, FA with B = W equals autograd; with areas=2 it still
    runs and accounts for everything."""
    torch.manual_seed(seed)
    model = _Random(kinds, d, 3).to(D)
    x = torch.randn(2, seq, d, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sal = _fa_equals_bp(model, x, example=True)
    plan = sal.sal_plan
    assert not plan.backprop
    assert all(plan.roles[n] == "layer" for n, p in model.named_parameters() if p.dim() >= 2)
    gated = salcompile.transform(model, example_inputs=(x,), areas=2)
    assert not gated.sal_plan.backprop
    gated(x).sum().backward()


class _GatheredExperts(nn.Module):
    """Per-row expert weights picked by data-dependent indices (Mixtral's batched_mm form)."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(3, 5, 4) * 0.4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        ids = (x.sum(-1) > 0).long() + (x[:, 0] > 0).long()    # in [0, 2], from the data
        h = torch.bmm(x.unsqueeze(1), self.W[ids]).squeeze(1)
        return self.out(torch.tanh(h))


def test_weights_gathered_by_indices_get_fa_and_the_training_exporters_refuse_them(tmp_path):
    torch.manual_seed(0)
    model, x = _GatheredExperts().to(D), torch.randn(6, 5, dtype=D)
    sal = _fa_equals_bp(model, x, example=True)
    experts = next(e for e in sal.sal_plan.layers if e.weight == "W")
    assert experts.op == "bmm" and "index" in experts.via.split(".")
    assert sal.sal_plan.roles["W"] == "layer"
    with pytest.raises(SalcompileError, match="weight gathered by indices"):
        salcompile.export_ort_training(sal, (x,), tmp_path / "art")
