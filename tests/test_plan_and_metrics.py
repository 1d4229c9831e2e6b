"""The plan lists what was done; alignment metrics measure what FA researchers track."""
import math

import torch
import torch.nn.functional as F

import salcompile
from salcompile.plan import Plan
from conftest import dense_transform, ResCNN, mlp


def test_plan_of_plain_and_transformed_model_agree():
    model, x = ResCNN(), torch.randn(2, 3, 6, 6)
    before = salcompile.plan(model, (x,), areas=1)
    sal = dense_transform(model, (x,))
    after = salcompile.plan(sal)
    assert [l.weight for l in before.layers] == [l.weight for l in after.layers]
    ops = {l.op for l in after.layers}
    assert {"conv2d", "conv_transpose2d", "conv1d", "conv3d", "linear"} <= ops
    text = str(after)
    for needle in ("c1.weight", "8x3x3x3", "conv_transpose2d", "head"):
        assert needle in text
    assert Plan.from_json(after.to_json()).layers == after.layers


def test_plan_shows_weight_views():
    from conftest import Functional
    plan = salcompile.plan(Functional(), (torch.randn(2, 5),), areas=1)
    w2 = next(l for l in plan.layers if l.weight == "W2")
    assert w2.via and w2.op == "matmul"


def test_weight_alignment_is_zero_for_weight_feedback_and_near_ninety_for_random():
    model = mlp(32, 64, 10)
    same = salcompile.metrics.weight_alignment(
        dense_transform(model, feedback_init="weights"))
    assert all(abs(a) < 1e-4 for a in same.values()) and len(same) == 3
    rand = salcompile.metrics.weight_alignment(dense_transform(model))
    assert all(70 < a < 110 for a in rand.values())


def test_gradient_alignment_against_backprop():
    model, x, y = mlp(32, 64, 10), torch.randn(16, 32), torch.randint(0, 10, (16,))
    loss = lambda out: F.cross_entropy(out, y)
    exact = salcompile.metrics.gradient_alignment(
        dense_transform(model, feedback_init="weights", feedback_scale="none"), loss, x)
    assert all(a < 1e-3 for a in exact.values())
    fa = salcompile.metrics.gradient_alignment(dense_transform(model), loss, x)
    assert fa["layers.2.weight"] < 1e-3           # the head's update is the true gradient
    assert fa["layers.0.weight"] > 1.0            # hidden layers' are not
    assert all(not math.isnan(a) for a in fa.values())
    dfa = salcompile.metrics.gradient_alignment(
        dense_transform(model, (x,), feedback="dfa"), loss, x)
    assert dfa["layers.2.weight"] < 1e-3 and dfa["layers.1.weight"] > 1.0


def test_backprop_reference_shares_parameters():
    sal = dense_transform(mlp())
    ref = salcompile.metrics.backprop_reference(sal)
    assert ref.get_parameter("layers.0.weight") is sal.get_parameter("layers.0.weight")
    assert not any("salcompile" in str(n.target) for n in ref.graph.nodes)


def test_gradient_alignment_with_weight_matmul_layers():
    from conftest import Functional
    x = torch.randn(4, 5)
    sal = dense_transform(Functional(), (x,), feedback_init="weights", feedback_scale="none")
    angles = salcompile.metrics.gradient_alignment(sal, lambda o: o.square().sum(), x)
    assert angles and all(a < 1e-3 for a in angles.values()), angles
