"""bp mode is the original model; every mode keeps the forward; seeds; train/eval behaviour."""
import pytest
import torch
from torch import nn

import salcompile
from conftest import dense_transform, ResCNN, assert_grads_equal, grads, mlp, model_cases

CASES = model_cases()


@pytest.mark.parametrize("name,make,inputs", CASES, ids=[c[0] for c in CASES])
def test_bp_mode_is_the_original_model(name, make, inputs):
    model, x = make(), inputs()
    sal = dense_transform(model, (x,), feedback="bp")
    torch.testing.assert_close(sal(x), model(x), rtol=0, atol=0)
    assert_grads_equal(grads(sal, x), grads(model, x))


# DFA needs the output's leading dims on every tapped activation: the Functional model's
# (batch, 2, 1) output does not fit, and test_errors checks that it says so.
MODE_CASES = [(fb, *c) for fb in ("fa", "dfa", "bp") for c in CASES[:4]
              if not (fb == "dfa" and c[0] == "functional")]


@pytest.mark.parametrize("feedback,name,make,inputs", MODE_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in MODE_CASES])
def test_forward_unchanged_in_every_mode(feedback, name, make, inputs):
    model, x = make(), inputs()
    sal = dense_transform(model, (x,), feedback=feedback)
    torch.testing.assert_close(sal(x), model(x), rtol=0, atol=0)
    g_sal, g_bp = grads(sal, x), grads(model, x)
    assert g_sal.keys() == g_bp.keys()
    if feedback != "bp":  # random feedback really changes the hidden layers' updates
        assert any(not torch.allclose(g_sal[n], g_bp[n]) for n in g_sal)


def test_same_seed_same_feedback_other_seed_other_feedback():
    model = mlp()
    a = salcompile.feedback_matrices(dense_transform(model, feedback_seed=3))
    b = salcompile.feedback_matrices(dense_transform(model, feedback_seed=3))
    c = salcompile.feedback_matrices(dense_transform(model, feedback_seed=4))
    for n in a:
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n])


def test_dfa_matrices_deterministic():
    model, x = mlp(), torch.randn(4, 8)
    a = salcompile.feedback_matrices(dense_transform(model, (x,), feedback="dfa"))
    b = salcompile.feedback_matrices(dense_transform(model, (x,), feedback="dfa"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.bn, self.drop, self.l2 = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.l1(x))))
        return self.l2(torch.nn.functional.dropout(h, 0.2, self.training))  # functional form too


@pytest.mark.parametrize("example", [True, False], ids=["export", "symbolic_trace"])
def test_train_eval_switch_batch_norm_and_dropout_like_the_original(example):
    model, x = DropNet(), torch.randn(6, 4)
    sal = dense_transform(model, (x,) if example else None)
    sal.load_state_dict(model.state_dict())
    for mode in ("train", "eval", "train"):
        getattr(model, mode)(), getattr(sal, mode)()
        torch.manual_seed(1); out_m = model(x)
        torch.manual_seed(1); out_s = sal(x)
        torch.testing.assert_close(out_s, out_m)
        for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
            assert torch.equal(sal.get_buffer(k), model.get_buffer(k)), (mode, k)
    model.eval(), sal.eval()
    assert torch.equal(sal(x), sal(x))  # no dropout in eval
    model.train(), sal.train()
    assert not torch.equal(sal(x), sal(x))  # dropout in train


def test_state_dict_of_the_original_loads_and_names_survive():
    model = ResCNN()
    sal = dense_transform(model, (torch.randn(2, 3, 6, 6),))
    assert set(model.state_dict()) <= set(sal.state_dict())
    assert any(k.endswith("weight_feedback") for k in sal.state_dict())
    result = sal.load_state_dict(model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys


def test_outputs_keep_their_structure():
    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x, scale=2.0):
            h = self.a(x)
            return {"logits": self.b(torch.relu(h)), "extra": (h * scale, h.sum())}

    model, x = Multi(), torch.randn(3, 3)
    for sal in (dense_transform(model, (x,)), dense_transform(model)):
        out, ref = sal(x), model(x)
        assert set(out) == {"logits", "extra"} and isinstance(out["extra"], tuple)
        torch.testing.assert_close(out["logits"], ref["logits"])
        torch.testing.assert_close(out["extra"][0], ref["extra"][0])


def test_transformed_model_is_independent_of_the_original():
    model = mlp()
    sal = dense_transform(model)
    with torch.no_grad():
        sal.get_parameter("layers.0.weight").add_(1.0)
    assert not torch.equal(sal.get_parameter("layers.0.weight"), model.layers[0].weight)
