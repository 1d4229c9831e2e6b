"""Feedback rules of the registry (salcompile/feedback/): uSF, brSF, frSF, Kolen-Pollack beside
FA/DFA/BP. Oracles: a rule whose B equals W by construction equals backprop; KP's B gradient is
W's; every rule survives areas, fused regions, compile, save/load and the exporters."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salcompile
from conftest import assert_train_step_matches_sgd
from salcompile import feedback, metrics
from salcompile.config import FEEDBACK_MODES
from salcompile.errors import SalcompileError
from salcompile.models import MLP

FA_FAMILY = ["fa", "usf", "brsf", "frsf", "kp"]
D = torch.float64
AREA_CONFIGS = {   # name: SALConfig fields
    "dense": dict(areas=1),
    "partition_fused": dict(areas=4),
    "partition_unfused": dict(areas=4, fuse_regions=False),
    "partition_reference": dict(areas=4, area_impl="reference"),
    "replicate": dict(areas=4, area_mode="replicate"),
}


def _mlp(feedback_rule, dtype=D, **fields):
    torch.manual_seed(0)
    x = torch.randn(8, 6, dtype=dtype)
    y = torch.randint(0, 3, (8,))
    sal = salcompile.transform(MLP(6, 16, 3, depth=3).to(dtype), (x,), feedback=feedback_rule,
                               **fields)
    return sal, x, y


def _grads(module, x, y, owner=None):
    """Gradients of the cross-entropy through `module`, named as in `owner` (default: module)."""
    owner = owner or module
    owner.zero_grad()
    F.cross_entropy(module(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in owner.named_parameters()
            if p.grad is not None}


def _sgd_run(module, x, y, steps=4, lr=0.1, wd=0.01):
    opt = torch.optim.SGD(module.parameters(), lr=lr, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _weights(sal):
    return [l.weight for l in sal.sal_plan.layers]


# ---------------------------------------------------------------- the registry
def test_registry_lists_every_rule_and_config_takes_them():
    assert set(FEEDBACK_MODES) == set(feedback.names()) >= {"fa", "dfa", "bp", "usf", "brsf",
                                                            "frsf", "kp"}
    for name in feedback.names():
        rule = feedback.get(name)
        assert rule.name == name and rule.summary and rule.family in ("fa", "dfa", "bp")
        assert salcompile.SALConfig(feedback=name).feedback == name
        if rule.operand is not None:   # a derived operand must be exportable to ORT as well
            assert rule.onnx_operand is not None
    with pytest.raises(SalcompileError, match="kp"):
        salcompile.SALConfig(feedback="kolen")


@pytest.mark.parametrize("rule", ["usf", "brsf"])
def test_weights_init_is_refused_where_nothing_is_stored(rule):
    with pytest.raises(SalcompileError, match="derived from W"):
        salcompile.SALConfig(feedback=rule, feedback_init="weights")


def test_fa_is_unchanged_by_the_registry():
    """The FA B is the same draw as before the registry (same seed, same key)."""
    sal, x, y = _mlp("fa", areas=1)
    from salcompile.feedback_init import draw_uniform
    w = sal.get_parameter("layers.0.weight")
    want = draw_uniform(tuple(w.shape), w.shape[1], 0, "layers.0.weight", w)
    torch.testing.assert_close(sal.get_buffer("layers.0.weight_feedback"), want, rtol=0, atol=0)


# ---------------------------------------------------------------- oracles
@pytest.mark.parametrize("config", list(AREA_CONFIGS))
def test_kp_from_b_equal_w_trains_exactly_as_backprop(config):
    """B = W at the start and the same SGD step with weight decay on both: B stays W, so KP is
    backprop for every step (its B is never read from W)."""
    fields = AREA_CONFIGS[config]
    kp, x, y = _mlp("kp", feedback_init="weights", **fields)
    bp, _, _ = _mlp("bp", **fields)
    bp.load_state_dict(kp.state_dict(), strict=False)
    got, want = _sgd_run(kp, x, y), _sgd_run(bp, x, y)
    for n, p in want.items():
        torch.testing.assert_close(got[n], p, rtol=1e-10, atol=1e-12, msg=n)
    for l in kp.sal_plan.layers:
        torch.testing.assert_close(kp.get_parameter(l.feedback_buffer), got[l.weight])
    assert kp.sal_plan.roles[kp.sal_plan.layers[0].feedback_buffer] == "feedback"


@pytest.mark.parametrize("config", list(AREA_CONFIGS))
def test_kp_b_gradient_is_the_layers_weight_gradient(config):
    sal, x, y = _mlp("kp", **AREA_CONFIGS[config])
    g = _grads(sal, x, y)
    for l in sal.sal_plan.layers:
        assert torch.equal(g[l.feedback_buffer], g[l.weight]), l.name
    b = sal.get_parameter(sal.sal_plan.layers[0].feedback_buffer)
    w = sal.get_parameter(sal.sal_plan.layers[0].weight)
    assert b.grad.data_ptr() != w.grad.data_ptr()   # copies: an in-place clip of one spares the other


class _Kinds(nn.Module):
    """Every FA op kind: linear, conv, matmul with a weight, einsum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.w = nn.Parameter(torch.randn(12, 8) / 4)
        self.e = nn.Parameter(torch.randn(8, 5) / 3)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)[:, :12]
        h = torch.tanh(h @ self.w)
        h = torch.tanh(torch.einsum("bi,io->bo", h, self.e))
        return self.head(h)


def test_kp_b_gradient_equals_w_gradient_for_every_op_kind():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 6, dtype=D)
    sal = salcompile.transform(_Kinds().to(D), (x,), feedback="kp", areas=1)
    assert {l.op for l in sal.sal_plan.layers} >= {"linear", "conv1d", "matmul", "einsum"}
    y = torch.randint(0, 3, (5,))
    g = _grads(sal, x, y)
    for l in sal.sal_plan.layers:
        assert torch.equal(g[l.feedback_buffer], g[l.weight]), l.name


@pytest.mark.parametrize("config", list(AREA_CONFIGS))
def test_frsf_from_b_equal_w_gives_the_backprop_gradients(config):
    """|B| = |W| at transform time: |B|·sign(W) = W, so the first step is backprop's."""
    fields = AREA_CONFIGS[config]
    sal, x, y = _mlp("frsf", feedback_init="weights", **fields)
    bp, _, _ = _mlp("bp", **fields)
    bp.load_state_dict(sal.state_dict(), strict=False)
    got, want = _grads(sal, x, y), _grads(bp, x, y)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-10, atol=1e-12, msg=n)


def _constant_magnitude(module, bound=None):
    """Every weight W = c·sign(R): sign(W) is W up to the scale c."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and "sal_gates" not in name and "_feedback" not in name:
                c = bound if bound is not None else 0.3
                p.copy_(torch.sign(torch.randn_like(p)) * (c or 1 / p.shape[-1] ** 0.5))


@pytest.mark.parametrize("scale", ["match", "none"])
@pytest.mark.parametrize("config", ["dense", "partition_fused", "replicate"])
def test_usf_with_constant_magnitude_weights_is_backprop(config, scale):
    """With W = c·sign(R), usf's B = sign(W)/sqrt(fan_in) is W up to scale: with "match" exactly
    W; with "none" exactly W when c = 1/sqrt(fan_in)."""
    fields = dict(AREA_CONFIGS[config], feedback_scale=scale)
    sal, x, y = _mlp("usf", **fields)
    torch.manual_seed(3)
    _constant_magnitude(sal, None if scale == "none" else 0.3)
    if scale == "none":   # c = the rule's scale 1/sqrt(fan_in), per layer
        with torch.no_grad():
            for l in sal.sal_plan.layers:
                w = sal.get_parameter(l.weight)
                w.copy_(torch.sign(w) * l.feedback_bound)
    bp, _, _ = _mlp("bp", **AREA_CONFIGS[config])
    bp.load_state_dict(sal.state_dict(), strict=False)
    got, want = _grads(sal, x, y), _grads(bp, x, y)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-9, atol=1e-12, msg=n)


def test_brsf_feedback_is_sign_concordant_bounded_and_fresh_every_step():
    """y = x Wᵀ alone: dX for the one-hot error e_i is row i of B = |R|·sign(W), |R| <= 1/sqrt(in)."""
    torch.manual_seed(0)
    lin = nn.Linear(7, 4).to(D)
    x = torch.randn(4, 7, dtype=D)
    sal = salcompile.transform(lin, (x,), feedback="brsf", areas=1, feedback_scale="none")
    w = sal.get_parameter("weight").detach()
    rows = []
    for _ in range(2):
        xi = torch.zeros(4, 7, dtype=D, requires_grad=True)
        sal(xi).backward(torch.eye(4, dtype=D))
        b = xi.grad   # row i = e_i · B = B[i]
        assert torch.equal(torch.sign(b), torch.sign(w))
        assert (b.abs() <= 7 ** -0.5 + 1e-12).all() and (b.abs() > 0).all()
        rows.append(b)
    assert not torch.equal(rows[0], rows[1])   # drawn afresh


@pytest.mark.parametrize("rule", FA_FAMILY)
def test_every_rule_differs_from_backprop_on_hidden_layers(rule):
    """Not silently backprop: the hidden layers' updates are not backprop's (random init)."""
    sal, x, y = _mlp(rule, areas=1)
    got = _grads(sal, x, y)
    want = _grads(metrics.backprop_reference(sal), x, y)
    first, head = _weights(sal)[0], _weights(sal)[-1]
    assert not torch.allclose(got[first], want[first], rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(got[head], want[head])   # the head's own dW is exact


def test_weight_alignment_covers_every_rule_and_kp_aligns_with_weight_decay():
    angles = {}
    for rule in FA_FAMILY:
        sal, x, y = _mlp(rule, areas=1)
        a = metrics.weight_alignment(sal)
        assert set(a) == set(_weights(sal)) and all(0 <= v <= 180 for v in a.values())
        angles[rule] = a
    sign_rules = [r for r in ("usf", "brsf", "frsf")]
    for r in sign_rules:   # the sign rules share W's signs: far closer than random B
        assert max(angles[r].values()) < min(angles["fa"].values())
    sal, x, y = _mlp("kp", areas=1)
    before = metrics.weight_alignment(sal)
    _sgd_run(sal, x, y, steps=40, lr=0.1, wd=0.1)
    after = metrics.weight_alignment(sal)
    assert all(after[w] < before[w] - 5 for w in before), (before, after)


# ---------------------------------------------------------------- every rule, every path
def _same_grads(a, b, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("rule", FA_FAMILY)
def test_save_load_keeps_the_rule_in_train_and_eval_mode(tmp_path, rule):
    sal, x, y = _mlp(rule, dtype=torch.float32, areas=4)
    path = tmp_path / "m.pt2"
    salcompile.save(sal, (x,), path)
    loaded = salcompile.load(path)
    assert loaded.sal_plan.config["feedback"] == rule
    if rule == "brsf":   # a fresh draw per step: replay the RNG
        torch.manual_seed(5)
        want = _grads(sal, x, y)
        torch.manual_seed(5)
        got = _grads(loaded, x, y)
    else:
        want, got = _grads(sal, x, y), _grads(loaded, x, y)
    _same_grads(got, want)
    sal.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sal(x))


@pytest.mark.parametrize("rule", ["usf", "frsf", "kp"])
def test_compiled_rule_gives_the_eager_gradients(rule):
    sal, x, y = _mlp(rule, dtype=torch.float32, areas=4)
    want = _grads(sal, x, y)
    torch._dynamo.reset()
    got = _grads(salcompile.compile(sal), x, y, owner=sal)
    _same_grads(got, want, rtol=1e-4, atol=1e-6)


def test_compiled_brsf_trains_sign_concordant():
    sal, x, y = _mlp("brsf", dtype=torch.float32, areas=1)
    torch._dynamo.reset()
    g = _grads(salcompile.compile(sal), x, y, owner=sal)
    eager = _grads(sal, x, y)
    assert all(torch.isfinite(v).all() for v in g.values())
    head, first = _weights(sal)[-1], _weights(sal)[0]
    torch.testing.assert_close(g[head], eager[head])   # the head's dW reads no feedback
    bp = _grads(metrics.backprop_reference(sal), x, y)
    assert not torch.allclose(g[first], bp[first], rtol=1e-3)


@pytest.mark.parametrize("rule", FA_FAMILY)
def test_export_onnx_of_every_rule_equals_eager(tmp_path, rule):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    sal, x, y = _mlp(rule, dtype=torch.float32, areas=4)
    path = tmp_path / "m.onnx"
    salcompile.export_onnx(sal, (x,), path)
    sess = ort.InferenceSession(str(path))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    sal.eval()
    with torch.no_grad():
        np.testing.assert_allclose(got, sal(x).numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- ONNX Runtime training
def _ort_grads(d, x, y):
    api = pytest.importorskip("onnxruntime.training.api")
    state = api.CheckpointState.load_checkpoint(str(d / "checkpoint"))
    module = api.Module(str(d / "training_model.onnx"), state, str(d / "eval_model.onnx"))
    module.train()
    module(x.numpy(), y.numpy())
    return {n: np.array(p.grad) for n, p in state.parameters}


@pytest.mark.parametrize("rule,config", [("usf", "dense"), ("frsf", "dense"),
                                         ("usf", "partition_fused"), ("brsf", "dense")])
def test_ort_training_computes_the_rules_gradients(tmp_path, rule, config):
    pytest.importorskip("onnxruntime.training.api")
    sal, x, y = _mlp(rule, dtype=torch.float32, **AREA_CONFIGS[config])
    info = salcompile.export_ort_training(sal, (x,), tmp_path / "art")
    assert info["redirected"] >= 2
    got = _ort_grads(tmp_path / "art", x, y)
    want = _grads(sal, x, y)
    bp = _grads(metrics.backprop_reference(sal), x, y)
    first = _weights(sal)[0]
    if rule == "brsf":   # random magnitudes: check the head exactly, the rest is not backprop
        head = _weights(sal)[-1]
        np.testing.assert_allclose(got[head], want[head].numpy(), rtol=1e-5, atol=1e-7)
        assert np.abs(got[first] - bp[first].numpy()).max() > 1e-4
        return
    for n, g in want.items():
        np.testing.assert_allclose(got[n], g.numpy(), rtol=1e-4, atol=1e-6, err_msg=n)
    assert np.abs(got[first] - bp[first].numpy()).max() > 1e-4


def test_ort_training_refuses_kp_and_says_what_to_do(tmp_path):
    pytest.importorskip("onnxruntime.training.api")
    sal, x, y = _mlp("kp", dtype=torch.float32, areas=1)
    with pytest.raises(SalcompileError, match="export_train_step"):
        salcompile.export_ort_training(sal, (x,), tmp_path / "art")
    assert not (tmp_path / "art").exists() or not any((tmp_path / "art").iterdir())


@pytest.mark.parametrize("rule", ["usf", "frsf", "kp"])
def test_train_step_export_equals_torch_sgd(tmp_path, rule):
    sal, x, y = _mlp(rule, dtype=torch.float32, areas=1)
    assert_train_step_matches_sgd(sal, x, y, tmp_path / "step.onnx")


def test_layer_ops_pass_opcheck_with_a_trainable_feedback():
    """Kolen-Pollack's B requires grad: the ops' autograd registration covers that input."""
    from torch.library import opcheck
    s = torch.ops.salcompile
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=D, requires_grad=True)
    w = torch.randn(3, 5, dtype=D, requires_grad=True)
    b = torch.randn(3, 5, dtype=D, requires_grad=True)
    opcheck(s.fa_linear.default, (x, w, None, b, True))
    opcheck(s.fa_matmul.default, (x, w.t().detach().requires_grad_(), b.t().detach()
                                  .requires_grad_(), False, False))
    opcheck(s.fa_einsum.default, ("bi,oi->bo", x, w, b, False, True))
    xc = torch.randn(2, 2, 6, dtype=D, requires_grad=True)
    wc = torch.randn(3, 2, 3, dtype=D, requires_grad=True)
    opcheck(s.fa_conv.default, (xc, wc, None, torch.randn_like(wc).requires_grad_(), [1], [1],
                                [1], False, [0], 1, True))
