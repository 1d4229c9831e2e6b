"""The core correctness check: FA with B = W (no rescaling) is backprop, to float64 precision."""
import pytest
import torch

import salcompile
from conftest import assert_grads_equal, grads, model_cases

CASES = model_cases()


@pytest.mark.parametrize("name,make,inputs", CASES, ids=[c[0] for c in CASES])
def test_fa_with_weight_feedback_equals_backprop_export(name, make, inputs):
    model, x = make(), inputs()
    sal = salcompile.transform(model, (x,), feedback_init="weights", feedback_scale="none")
    assert len(sal.sal_plan.layers) >= 2 and all(l.feedback == "fa" for l in sal.sal_plan.layers)
    ops = {n.target for n in sal.graph.nodes if n.op == "call_function"}
    assert any("salcompile" in str(t) for t in ops), "no FA op was inserted"
    torch.testing.assert_close(sal(x), model(x), rtol=0, atol=0)
    assert_grads_equal(grads(sal, x), grads(model, x))


@pytest.mark.parametrize("name,make,inputs", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_fa_with_weight_feedback_equals_backprop_symbolic_trace(name, make, inputs):
    model, x = make(), inputs()
    sal = salcompile.transform(model, feedback_init="weights", feedback_scale="none")
    assert sal.sal_plan.capture == "symbolic_trace"
    assert not sal.sal_plan.backprop
    assert_grads_equal(grads(sal, x), grads(model, x))


def test_encoder_reaches_every_attention_and_ffn_projection():
    make, x = CASES[4][1], CASES[4][2]()
    sal = salcompile.transform(make(), (x,))
    weights = {l.weight for l in sal.sal_plan.layers}
    for i in range(2):
        for w in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
                  "linear2.weight"):
            assert f"enc.layers.{i}.{w}" in weights
    assert sal.sal_plan.head.weight == "head.weight"


def test_tied_parameter_gets_one_feedback_and_both_gradients():
    make, x = CASES[3][1], CASES[3][2]()
    sal = salcompile.transform(make(), (x,))
    fb = salcompile.feedback_matrices(sal)
    assert set(fb) == {"emb.weight", "mix.weight"}
    assert fb["emb.weight"].shape == sal.get_parameter("emb.weight").shape
