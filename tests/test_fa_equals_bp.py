"""The core correctness check: FA with B = W (no rescaling) is backprop, to float64 precision."""
import pytest
import torch

import salcompile
from conftest import dense_transform, assert_grads_equal, grads, model_cases

CASES = model_cases()


@pytest.mark.parametrize("name,make,inputs", CASES, ids=[c[0] for c in CASES])
def test_fa_with_weight_feedback_equals_backprop_export(name, make, inputs):
    model, x = make(), inputs()
    sal = dense_transform(model, (x,), feedback_init="weights", feedback_scale="none")
    assert len(sal.sal_plan.layers) >= 2 and all(l.feedback == "fa" for l in sal.sal_plan.layers)
    ops = {n.target for n in sal.graph.nodes if n.op == "call_function"}
    assert any("salcompile" in str(t) for t in ops), "no FA op was inserted"
    torch.testing.assert_close(sal(x), model(x), rtol=0, atol=0)
    assert_grads_equal(grads(sal, x), grads(model, x))


@pytest.mark.parametrize("name,make,inputs", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_fa_with_weight_feedback_equals_backprop_symbolic_trace(name, make, inputs):
    model, x = make(), inputs()
    sal = dense_transform(model, feedback_init="weights", feedback_scale="none")
    assert sal.sal_plan.capture == "symbolic_trace"
    assert not sal.sal_plan.backprop
    assert_grads_equal(grads(sal, x), grads(model, x))


def test_encoder_reaches_every_attention_and_ffn_projection():
    make, x = CASES[4][1], CASES[4][2]()
    sal = dense_transform(make(), (x,))
    weights = {l.weight for l in sal.sal_plan.layers}
    for i in range(2):
        for w in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
                  "linear2.weight"):
            assert f"enc.layers.{i}.{w}" in weights
    assert sal.sal_plan.head.weight == "head.weight"


def test_tied_parameter_gets_one_feedback_and_both_gradients():
    make, x = CASES[3][1], CASES[3][2]()
    sal = dense_transform(make(), (x,))
    fb = salcompile.feedback_matrices(sal)
    assert set(fb) == {"emb.weight", "mix.weight"}
    assert fb["emb.weight"].shape == sal.get_parameter("emb.weight").shape


class PaddingForms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.same = torch.nn.Conv2d(2, 3, 3, padding="same")
        self.reflect = torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
        self.valid = torch.nn.Conv1d(2, 2, 3, padding="valid")

    def forward(self, x):
        h = torch.tanh(self.reflect(torch.tanh(self.same(x))))
        h = torch.nn.functional.conv_transpose2d(h, self.same.weight)  # tied, transposed use
        return self.valid(h.flatten(2))


@pytest.mark.parametrize("example", [True, False], ids=["export", "symbolic_trace"])
def test_conv_padding_forms(example):
    model, x = PaddingForms().double(), torch.randn(2, 2, 5, 5, dtype=torch.float64)
    sal = dense_transform(model, (x,) if example else None, feedback_init="weights",
                               feedback_scale="none")
    assert len(sal.sal_plan.layers) == 4 and not sal.sal_plan.backprop
    torch.testing.assert_close(sal(x), model(x))
    assert_grads_equal(grads(sal, x), grads(model, x))
