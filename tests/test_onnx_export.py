"""export_onnx: the eval-mode forward of a transformed module runs in onnxruntime."""
import sys

import pytest
import torch
from torch import nn

import salcompile
from salcompile.errors import SalcompileError
from salcompile.models import MLP

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from salcompile.onnx import export_onnx, inference_graph  # noqa: E402
from conftest import BNCNN  # noqa: E402


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(x))


def _mlp(**fields):
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    return salcompile.transform(MLP(8, 16, 3, depth=3), (x,), **fields), x, torch.randn(11, 8)


def _cnn():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    sal = salcompile.transform(BNCNN(), (x,), areas=4)
    sal.train()
    with torch.no_grad():   # non-trivial running statistics for the eval-mode batch norm
        sal(torch.randn(8, 3, 6, 6) * 2 + 1)
    return sal, x, torch.randn(7, 3, 6, 6)


def _encoder():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    return salcompile.transform(Encoder(), (x,), areas=4), x, torch.randn(7, 5, 16)


CASES = {
    "mlp-dense-fa": lambda: _mlp(areas=1),
    "mlp-dfa": lambda: _mlp(areas=1, feedback="dfa"),
    "mlp-sal4-partition": lambda: _mlp(areas=4, check_finite=True),
    "mlp-sal4-replicate": lambda: _mlp(areas=4, area_mode="replicate"),
    "mlp-sal4-reference": lambda: _mlp(areas=4, area_impl="reference"),
    "cnn-bn-sal4-partition": _cnn,
    "encoder-sal4-tokens": _encoder,
    # symbolic_trace capture: call_module nodes (BatchNorm1d) in the graph
    "traced-bn-mlp-sal4": lambda: (salcompile.transform(nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)), areas=4),
        torch.randn(4, 8), torch.randn(7, 8)),
}


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_matches_torch_eval(case, tmp_path):
    torch.set_num_threads(1)
    sal, x, other = CASES[case]()
    path = tmp_path / "m.onnx"
    export_onnx(sal, (x,), path)
    assert sal.training   # the module's own mode is left alone

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "custom ops left"
    inits = {i.name for i in model.graph.initializer}
    weights = {k for k, _ in sal.named_parameters() if not k.startswith("sal_gates.")}
    assert weights <= inits, weights - inits
    assert not any(k.endswith(("_feedback", "_dfa", ".counts")) for k in inits)

    sal.eval()
    salcompile.reset_routing_stats(sal)
    with torch.no_grad():
        want = sal(other)
    assert other.shape[0] != x.shape[0]   # a batch size the export did not see
    got = _run(path, other)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if sal.sal_plan.regions:   # the rows really went to several areas
        assert all(s["active"] > 1 for s in salcompile.routing_stats(sal).values())


def test_inference_graph_is_plain_aten():
    sal, x, other = _cnn()
    gm = inference_graph(sal)
    names = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not any("salcompile." in n and "onnx_export" not in n for n in names), names
    sal.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(other), sal(other), rtol=0, atol=1e-6)


def test_compiled_wrapper_and_static_batch(tmp_path):
    sal, x, _ = _mlp(areas=4)
    path = tmp_path / "m.onnx"
    export_onnx(torch.compile(sal), (x,), path, dynamic_batch=False)
    sal.eval()
    with torch.no_grad():
        torch.testing.assert_close(_run(path, x), sal(x), rtol=1e-4, atol=1e-4)


def test_existing_path_needs_force(tmp_path):
    sal, x, _ = _mlp(areas=4)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(SalcompileError, match="exists"):
        export_onnx(sal, (x,), path)
    assert path.read_bytes() == b"keep me"
    export_onnx(sal, (x,), path, force=True)
    onnx.checker.check_model(onnx.load(str(path)))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]   # no temporary file left


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(SalcompileError, match="salcompile.transform"):
        export_onnx(nn.Linear(2, 2), (torch.randn(2, 2),), tmp_path / "a.onnx")
    sal, x, _ = _mlp(areas=1)
    with pytest.raises(SalcompileError, match="does not run on example_inputs"):
        export_onnx(sal, (torch.randn(6, 9),), tmp_path / "c.onnx")
    monkeypatch.setitem(sys.modules, "onnxscript", None)   # import fails
    with pytest.raises(SalcompileError, match="pip install onnxscript"):
        export_onnx(sal, (x,), tmp_path / "b.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["rescnn", "functional", "tied_lm"])
def test_other_layer_forms(name, tmp_path):
    """Grouped/depthwise/transposed/1-d/3-d convs with BN, raw F.linear/@/einsum/W@x, a tied
    embedding head with int64 inputs (conftest's models, float32)."""
    from conftest import model_cases
    torch.set_num_threads(1)
    _, make, make_input = {c[0]: c for c in model_cases()}[name]
    model = make().float()
    x = make_input()
    x = x.float() if x.is_floating_point() else x
    sal = salcompile.transform(model, (x,), areas=2)
    export_onnx(sal, (x,), tmp_path / "m.onnx")
    other = torch.cat([x, x[:2]])
    sal.eval()
    with torch.no_grad():
        want = sal(other)
    torch.testing.assert_close(_run(tmp_path / "m.onnx", other), want, rtol=1e-4, atol=1e-4)
