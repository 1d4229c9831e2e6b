"""export_ort_training: one ONNX Runtime training step gives the torch FA gradients."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salcompile
from salcompile.errors import SalcompileError
from salcompile.models import MLP

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
api = pytest.importorskip("onnxruntime.training.api")

from salcompile.ort_training import ARTIFACTS, export_ort_training  # noqa: E402


def _mlp(**fields):
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    sal = salcompile.transform(MLP(16, 32, 4, depth=3), (x,), areas=1, feedback_scale="none",
                               **fields)
    return sal, x


def _torch_grads(sal, x, y):
    sal.train()
    sal.zero_grad()
    F.cross_entropy(sal(x), y).backward()   # mean cross-entropy, as ORT's loss
    return {n: p.grad.detach().clone() for n, p in sal.named_parameters()}


def _ort_grads(d, x, y):
    state = api.CheckpointState.load_checkpoint(str(d / "checkpoint"))
    module = api.Module(str(d / "training_model.onnx"), state, str(d / "eval_model.onnx"))
    module.train()
    loss = module(x.numpy(), y.numpy())
    return float(loss), {n: np.array(p.grad) for n, p in state.parameters}, state


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    return torch.randn(10, 16), torch.randint(0, 4, (10,))   # another batch size: dynamic batch


@pytest.mark.parametrize("init", ["kaiming_uniform", "weights"])
def test_one_step_matches_torch_fa(tmp_path, data, init):
    sal, x = _mlp(feedback_init=init)
    info = export_ort_training(sal, (x,), tmp_path / "art")
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == sorted(ARTIFACTS)
    assert info["redirected"] >= 2
    xb, yb = data
    want = _torch_grads(sal, xb, yb)
    loss, got, state = _ort_grads(tmp_path / "art", xb, yb)
    assert sorted(got) == sorted(n for n, _ in sal.named_parameters())
    for n, p in sal.named_parameters():   # checkpoint values are the module's parameters
        np.testing.assert_allclose(np.array(state.parameters[n].data), p.detach().numpy(),
                                   rtol=0, atol=0)
    with torch.no_grad():
        assert loss == pytest.approx(F.cross_entropy(sal(xb), yb).item(), rel=1e-5)
    for n, g in want.items():
        err = np.abs(got[n] - g.numpy()).max() / np.abs(g.numpy()).max()
        assert err < 1e-5, (n, err)


def test_fa_edit_really_changes_gradients(tmp_path, data):
    xb, yb = data
    fa, x = _mlp()
    bp, _ = _mlp(feedback_init="weights")   # same weights (same seed), B = W: backprop
    for n, p in fa.named_parameters():
        assert torch.equal(p, bp.get_parameter(n))
    export_ort_training(fa, (x,), tmp_path / "fa")
    export_ort_training(bp, (x,), tmp_path / "bp")
    _, g_fa, _ = _ort_grads(tmp_path / "fa", xb, yb)
    _, g_bp, _ = _ort_grads(tmp_path / "bp", xb, yb)
    w0 = "layers.0.weight"
    assert np.abs(g_fa[w0] - g_bp[w0]).max() > 1e-3 * np.abs(g_bp[w0]).max()
    w2 = "layers.2.weight"   # the head's weight gradient does not depend on feedback
    np.testing.assert_allclose(g_fa[w2], g_bp[w2], rtol=1e-5, atol=1e-7)
    # and backprop in torch agrees with the B = W artifact
    want_bp = _torch_grads(bp, xb, yb)
    np.testing.assert_allclose(g_bp[w0], want_bp[w0].numpy(), rtol=1e-5, atol=1e-6)


def test_training_graph_never_reads_fa_weights_after_loss(tmp_path):
    onnx = pytest.importorskip("onnx")
    sal, x = _mlp()
    export_ort_training(sal, (x,), tmp_path / "art")
    m = onnx.load(str(tmp_path / "art" / "training_model.onnx"))
    assert m.ir_version == 10
    nodes = list(m.graph.node)
    cut = next(i for i, n in enumerate(nodes) if n.op_type == "SoftmaxCrossEntropyLoss")
    weights = {l.weight for l in sal.sal_plan.layers}
    assert not [n.name for n in nodes[cut + 1:] if weights & set(n.input)]
    inits = {i.name for i in m.graph.initializer}
    assert "layers.1.weight_feedback" in inits and "layers.2.weight_feedback" in inits


def test_existing_artifacts_need_force(tmp_path):
    sal, x = _mlp()
    export_ort_training(sal, (x,), tmp_path)
    with pytest.raises(SalcompileError, match="force"):
        export_ort_training(sal, (x,), tmp_path)
    export_ort_training(sal, (x,), tmp_path, force=True, optimizer="sgd")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp left


def test_unsupported_configurations(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    match = salcompile.transform(MLP(16, 32, 4, depth=3), (x,), areas=1)   # scale="match"
    with pytest.raises(SalcompileError, match="not supported yet"):
        export_ort_training(match, (x,), tmp_path / "a")
    sal, _ = _mlp()
    with pytest.raises(SalcompileError, match="loss"):
        export_ort_training(sal, (x,), tmp_path / "b", loss="hinge")
    with pytest.raises(SalcompileError, match="optimizer"):
        export_ort_training(sal, (x,), tmp_path / "c", optimizer="lamb")
    drop = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    sd = salcompile.transform(drop, (x,), areas=1, feedback_scale="none")
    with pytest.raises(SalcompileError, match="dropout"):
        export_ort_training(sd, (x,), tmp_path / "d")
    with pytest.raises(SalcompileError, match="transform"):
        export_ort_training(nn.Linear(16, 4), (x,), tmp_path / "e")


def test_missing_ort_training_says_what_to_install(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("onnxruntime.training"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    sal, x = _mlp()
    with pytest.raises(SalcompileError, match="onnxruntime-training-cpu==1.19.2"):
        export_ort_training(sal, (x,), tmp_path)


class TransposedWeight(nn.Module):
    """A layer whose weight reaches its matmul through a forward chain (Transpose(W))."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(32, 16) / 4)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(torch.relu(self.inp(x)) @ self.w.t()))


def test_mse_and_weight_chain_mirrored(tmp_path, data):
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    model = TransposedWeight()
    model.head.weight.data.mul_(3)
    sal = salcompile.transform(model, (x,), areas=1, feedback_scale="none")
    info = export_ort_training(sal, (x,), tmp_path, loss="mse")
    assert info["redirected"] >= 2
    onnx = pytest.importorskip("onnx")
    m = onnx.load(str(tmp_path / "training_model.onnx"))
    mirrors = [n for n in m.graph.node if n.name.endswith("_feedback_mirror")]
    assert mirrors and all("w_feedback" in "".join(n.input) for n in mirrors)
    xb, _ = data
    target = torch.randn(xb.shape[0], 4)
    sal.train()
    sal.zero_grad()
    F.mse_loss(sal(xb), target).backward()
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    module = api.Module(str(tmp_path / "training_model.onnx"), state,
                        str(tmp_path / "eval_model.onnx"))
    module.train()
    module(xb.numpy(), target.numpy())
    got = {n: np.array(p.grad) for n, p in state.parameters}
    for n, p in sal.named_parameters():
        g = p.grad.numpy()
        assert np.abs(got[n] - g).max() / np.abs(g).max() < 1e-5, n
