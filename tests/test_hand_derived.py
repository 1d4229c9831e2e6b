"""FA and DFA gradients against hand-written formulas that use the module's own B and D."""
import pytest
import torch
import torch.nn.functional as F

import salcompile
from conftest import dense_transform, D, mlp


def _setup(feedback, scale="none"):
    model = mlp(8, 16, 3, depth=3).double()
    x, y = torch.randn(6, 8, dtype=D), torch.randint(0, 3, (6,))
    sal = dense_transform(model, (x,), feedback=feedback, feedback_scale=scale)
    loss = F.cross_entropy(sal(x), y)
    loss.backward()
    W = [sal.get_parameter(f"layers.{i}.weight").detach() for i in range(3)]
    b = [sal.get_parameter(f"layers.{i}.bias").detach() for i in range(3)]
    # forward by hand
    h1 = x @ W[0].T + b[0]; a1 = h1.relu()
    h2 = a1 @ W[1].T + b[1]; a2 = h2.relu()
    out = a2 @ W[2].T + b[2]
    e = (out.softmax(-1) - F.one_hot(y, 3)) / len(y)  # ∂loss/∂logits
    return sal, x, (h1, a1, h2, a2), e


@pytest.mark.parametrize("scale", ["none", "match"])
def test_fa_mlp_matches_hand_derived(scale):
    sal, x, (h1, a1, h2, a2), e = _setup("fa", scale)
    fb = salcompile.feedback_matrices(sal)
    W = [sal.get_parameter(f"layers.{i}.weight").detach() for i in range(3)]
    B = [fb[f"layers.{i}.weight"] for i in range(3)]
    if scale == "match":
        B = [b * (w.norm() / b.norm()) for b, w in zip(B, W)]
    d3 = e
    d2 = (d3 @ B[2]) * (h2 > 0)          # backprop would use W[2]
    d1 = (d2 @ B[1]) * (h1 > 0)
    expected = {"layers.2.weight": d3.T @ a2, "layers.1.weight": d2.T @ a1,
                "layers.0.weight": d1.T @ x, "layers.2.bias": d3.sum(0),
                "layers.1.bias": d2.sum(0), "layers.0.bias": d1.sum(0)}
    for n, g in expected.items():
        torch.testing.assert_close(sal.get_parameter(n).grad, g, msg=n)
    # and it is not backprop
    bp = (d3 @ W[2]) * (h2 > 0)
    assert not torch.allclose(d2, bp)


def test_dfa_mlp_matches_hand_derived():
    sal, x, (h1, a1, h2, a2), e = _setup("dfa")
    fb = salcompile.feedback_matrices(sal)
    D1, D2 = fb["layers.1.weight"], fb["layers.2.weight"]  # D for the inputs of layers 1 and 2
    assert D1.shape == (3, 16) and D2.shape == (3, 16)
    d3 = e
    d2 = (e @ D2) * (h2 > 0)             # the error reaches a2 directly: e·D
    d1 = (e @ D1) * (h1 > 0)
    expected = {"layers.2.weight": d3.T @ a2, "layers.1.weight": d2.T @ a1,
                "layers.0.weight": d1.T @ x, "layers.1.bias": d2.sum(0), "layers.0.bias": d1.sum(0)}
    for n, g in expected.items():
        torch.testing.assert_close(sal.get_parameter(n).grad, g, msg=n)


def test_dfa_graph_form_has_one_output_op_and_no_hooks():
    sal, *_ = _setup("dfa")
    targets = [n.target for n in sal.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.salcompile.dfa_output.default) == 1
    assert targets.count(torch.ops.aten.detach.default) == 2
    assert not sal._forward_hooks and not sal._backward_hooks
    assert len(sal.sal_plan.dfa_taps) == 2
