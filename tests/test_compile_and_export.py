"""Backends give the eager transformed model's gradients: torch.compile and export round trips."""
import pytest
import torch
from torch import nn

import salcompile
from conftest import dense_transform, ResCNN, assert_grads_equal, grads, mlp
from salcompile.models import REGISTRY, smoke_case


def _cases():
    return [("mlp", mlp(), torch.randn(6, 8)), ("cnn", ResCNN(), torch.randn(3, 3, 6, 6))]


@pytest.mark.parametrize("feedback", ["fa", "dfa"])
@pytest.mark.parametrize("name,model,x", _cases(), ids=["mlp", "cnn"])
def test_compile_fullgraph_zero_breaks_same_gradients(name, model, x, feedback):
    if name == "cnn" and feedback == "dfa":
        model = model.eval()  # keep one cnn compile per mode: the dfa variant runs in eval mode
    sal = dense_transform(model, (x,), feedback=feedback)
    eager = grads(sal, x)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(sal)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = salcompile.compile(sal)
    torch.testing.assert_close(compiled(x), sal(x), rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads(compiled, x), eager, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("feedback", ["fa", "dfa"])
def test_saved_archive_reloads_and_trains_with_feedback_not_backprop(tmp_path, feedback):
    model, x = mlp(), torch.randn(6, 8)
    sal = dense_transform(model, (x,), feedback=feedback)
    path = tmp_path / "m.pt2"
    salcompile.save(sal, (x,), path)
    loaded = salcompile.load(path)
    expected = grads(sal, x)
    got = grads(loaded, x)
    assert_grads_equal(got, expected, rtol=1e-5, atol=1e-6)
    bp = grads(salcompile.metrics.backprop_reference(sal), x)
    assert not torch.allclose(got["layers.0.weight"], bp["layers.0.weight"], atol=1e-4)
    # other batch sizes work (the batch dimension is exported dynamic)
    assert loaded(torch.randn(3, 8)).shape == (3, 3)
    # feedback buffers travel in the archive
    assert any(n.endswith("_feedback") or n.endswith("_dfa") for n, _ in loaded.named_buffers())


def test_save_refuses_to_overwrite_and_leaves_nothing_behind(tmp_path):
    sal, x = dense_transform(mlp()), torch.randn(2, 8)
    path = tmp_path / "m.pt2"
    path.write_bytes(b"keep me")
    with pytest.raises(salcompile.SalcompileError, match="exists"):
        salcompile.save(sal, (x,), path)
    assert path.read_bytes() == b"keep me"
    salcompile.save(sal, (x,), path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]


def test_transform_accepts_an_exported_program():
    model, x = mlp(), torch.randn(4, 8)
    ep = torch.export.export(model, (x,))
    sal = dense_transform(ep, feedback_init="weights", feedback_scale="none")
    assert sal.sal_plan.capture == "export"
    torch.testing.assert_close(sal(x), model(x))
    assert_grads_equal(grads(sal, x), grads(model, x), rtol=1e-5, atol=1e-6)


def test_compile_transformer_encoder_fa():
    from conftest import Encoder
    model, x = Encoder(), torch.randn(3, 5, 8)
    sal = dense_transform(model, (x,))
    eager = grads(sal, x)
    torch._dynamo.reset()
    assert_grads_equal(grads(salcompile.compile(sal), x), eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["partition", "replicate"])
def test_sal_areas_compile_and_reload_with_the_eager_gradients(tmp_path, mode):
    model, x = mlp(8, 32, 3, depth=3), torch.randn(12, 8)
    sal = salcompile.transform(model, (x,), areas=4, area_mode=mode)
    eager = grads(sal, x)
    assert any(k.startswith("sal_gates.") for k in eager)  # the gate's P trains too
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(sal)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert_grads_equal(grads(salcompile.compile(sal), x), eager, rtol=1e-4, atol=1e-6)
    salcompile.save(sal, (x,), tmp_path / "m.pt2")
    loaded = salcompile.load(tmp_path / "m.pt2")
    assert salcompile.routing_stats(loaded)["gate_0"]["rows"] == 0  # archives start fresh
    assert_grads_equal(grads(loaded, x), eager, rtol=1e-6, atol=1e-7)
    assert salcompile.routing_stats(loaded)["gate_0"]["rows"] == 12


def test_many_transformed_modules_compile_in_one_process():
    """Each SALModule is a class of its own: compiling more of them than dynamo's recompile limit
    (8) in one process must still give one full graph each, not a recompile-limit failure."""
    from torch._dynamo.utils import counters
    before = counters["stats"]["unique_graphs"]
    for i in range(10):
        torch.manual_seed(i)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        sal = salcompile.transform(model, example_inputs=(torch.randn(3, 4),), areas=1)
        x = torch.randn(3, 4)
        torch.testing.assert_close(salcompile.compile(sal, backend="aot_eager")(x), sal(x))
    assert counters["stats"]["unique_graphs"] - before == 10


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_reloaded_archive_follows_eval_and_train_like_the_saved_module(tmp_path, name):
    """Dropout and batch norm of a reloaded archive switch with .eval()/.train() (the archive
    records train mode as constants; load ties them to the module's flag again)."""
    sal, x = smoke_case(name, "sal-partition")
    sal(x)   # move batch-norm statistics away from their initial values
    salcompile.save(sal, (x,), tmp_path / "m.pt2")
    back = salcompile.load(tmp_path / "m.pt2")
    sal.eval()
    back.eval()
    torch.testing.assert_close(back(x), sal(x))
    torch.testing.assert_close(back(x), back(x))   # no dropout in eval mode
    sal.train()
    back.train()
    torch.manual_seed(0)
    a = sal(x)
    torch.manual_seed(0)
    torch.testing.assert_close(back(x), a)        # same dropout draws, batch statistics
    for (n, b0), (_, b1) in zip(sorted(sal.named_buffers()), sorted(back.named_buffers())):
        if "running" in n or "num_batches" in n:
            torch.testing.assert_close(b1, b0, msg=n)


def test_a_reloaded_cnn_with_dropout_evaluates_and_exports_in_eval_mode(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 3 * 3, 3))
    x = torch.randn(4, 1, 8, 8)
    sal = salcompile.transform(model, example_inputs=(x,), areas=1)
    sal(x)
    salcompile.save(sal, (x,), tmp_path / "m.pt2")
    back = salcompile.load(tmp_path / "m.pt2")
    back.eval()
    sal.eval()
    torch.testing.assert_close(back(x), sal(x))
    salcompile.export_onnx(back, (x,), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), sal(x).detach(), rtol=1e-4, atol=1e-5)
