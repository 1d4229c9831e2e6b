"""Bad input gets a SalcompileError that says what to do; the CLI never unpickles by default."""
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

import salcompile
from salcompile import SalcompileError
from salcompile.cli import main
from conftest import dense_transform, Functional, mlp


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value
            return self.l(x)
        return -self.l(x)


@pytest.mark.parametrize("example", [True, False], ids=["export", "symbolic_trace"])
def test_untraceable_model_names_the_construct_and_remedy(example):
    with pytest.raises(SalcompileError) as err:
        dense_transform(DataDependent(), (torch.randn(2, 4),) if example else None)
    msg = str(err.value)
    assert "could not capture" in msg
    assert ("control flow" in msg) or ("example_inputs" in msg)


@pytest.mark.parametrize("kwargs,needle", [
    ({"feedback": "magic"}, "['fa', 'dfa', 'bp', 'usf', 'brsf', 'frsf', 'kp']"),
    ({"feedback_init": "zeros"}, "kaiming_uniform"),
    ({"feedback_scale": "huge"}, "match"),
    ({"areas": 0}, ">= 1"),
    ({"areas": 3}, "layers.0 has 16 outputs, not divisible by K=3"),
    ({"area_mode": "moe"}, "['partition', 'replicate']"),
    ({"route_by": "pixel"}, "['auto', 'sample', 'token']"),
    ({"gate_layers": 5}, "gate_layers must be"),
    ({"gate_layers": ["nothing*"]}, "matches no layer"),
    ({"temperature": 0}, "temperature must be"),
    ({"feedback": "dfa", "feedback_init": "weights"}, "no weight"),
    ({"not_a_field": 1}, "unknown SALConfig field"),
])
def test_bad_configuration(kwargs, needle):
    with pytest.raises(SalcompileError, match=None) as err:
        dense_transform(mlp(), **kwargs)
    assert needle in str(err.value)


def test_not_a_module_and_already_transformed():
    with pytest.raises(SalcompileError, match="nn.Module"):
        dense_transform(lambda x: x)
    sal = dense_transform(mlp())
    with pytest.raises(SalcompileError, match="already been transformed"):
        dense_transform(sal)
    with pytest.raises(SalcompileError, match="salcompile.transform"):
        salcompile.feedback_matrices(mlp())


def test_dfa_without_shapes_or_with_misaligned_output():
    with pytest.raises(SalcompileError, match="example_inputs"):
        dense_transform(mlp(), feedback="dfa")
    with pytest.raises(SalcompileError, match="leading dimensions"):
        dense_transform(Functional(), (torch.randn(3, 5),), feedback="dfa")


def test_recurrent_layer_keeps_backprop_with_a_warning_and_is_in_the_plan():
    class RNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(4, 6, batch_first=True), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    with pytest.warns(UserWarning, match="rnn.*keeps backprop"):
        sal = dense_transform(RNN(), (torch.randn(2, 5, 4),))
    plan = sal.sal_plan
    assert [l.weight for l in plan.layers] == ["fc.weight"]
    assert plan.backprop and "recurrent" in plan.backprop[0].reason
    assert "left on backprop" in str(plan) and "rnn" in str(plan)


# ---------------------------------------------------------------- CLI
def _run(*args):
    return main([str(a) for a in args])


@pytest.fixture
def files(tmp_path):
    model, x = mlp(64, 256, 10, depth=2), torch.randn(2, 64)
    ep = torch.export.export(model, (x,))
    torch.export.save(ep, tmp_path / "model.pt2")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    return tmp_path


def test_cli_convert_export_archive_and_inspect(files, capsys):
    out = files / "out.sal.pt2"
    assert _run("convert", files / "model.pt2", "-o", out, "--feedback", "fa") == 0
    loaded = salcompile.load(out)
    x = torch.randn(5, 64)
    loaded(x).square().sum().backward()
    assert loaded.get_parameter("layers.0.weight").grad is not None
    capsys.readouterr()
    assert _run("inspect", out) == 0
    text = capsys.readouterr().out
    assert "layers.0.weight" in text and "fa" in text


def test_cli_area_options_reach_the_plan(files, capsys):
    out = files / "sal.pt2"
    assert _run("convert", files / "model.pt2", "-o", out, "--areas", "8", "--area-mode",
                "replicate", "--balance-weight", "0.5") == 0
    capsys.readouterr()
    assert _run("inspect", out) == 0
    text = capsys.readouterr().out
    assert "areas=8 replicate" in text and "region gate_0: routes per sample" in text
    loaded = salcompile.load(out)
    assert loaded.get_parameter("layers.0.weight").shape == (8, 256, 64)
    assert _run("inspect", files / "model.pt2", "--areas", "3") == 2  # 256 % 3
    assert "not divisible by K=3" in capsys.readouterr().err
    assert _run("inspect", files / "model.pt2", "--areas", "1") == 0
    assert "region" not in capsys.readouterr().out


def test_cli_convert_state_dict_needs_model_name(files, capsys):
    out = files / "o.pt2"
    assert _run("convert", files / "weights.pt", "-o", out) == 2
    assert "--model" in capsys.readouterr().err and not out.exists()
    assert _run("convert", files / "weights.pt", "--model", "mlp", "-o", out, "--feedback", "dfa") == 0
    assert out.exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cli_refuses_a_pickle_that_would_run_code(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    torch.save({"model": _Evil()}, files / "evil.pt")
    for cmd in (["convert", files / "evil.pt", "-o", files / "x.pt2"], ["inspect", files / "evil.pt"]):
        assert _run(*cmd) == 2
        assert "runs code" in capsys.readouterr().err
    assert not (files / "PWNED").exists() and not (files / "x.pt2").exists()


def test_cli_trust_pickle_loads_a_pickled_module(files):
    torch.save(mlp(), files / "full.pt")
    assert _run("convert", files / "full.pt", "-o", files / "f.pt2", "--trust-pickle",
                "--input-shape", "8") == 0


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"hello, not a model", "not a model file"),
    (None, "truncated"),
])
def test_cli_bad_files(files, capsys, content, needle):
    bad = files / "bad.pt2"
    if content is None:  # a truncated export archive
        data = (files / "model.pt2").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        needle = "" if not zipfile.is_zipfile(bad) else needle
    else:
        bad.write_bytes(content)
    assert _run("convert", bad, "-o", files / "o.pt2") == 2
    assert needle in capsys.readouterr().err
    assert not (files / "o.pt2").exists()
    assert not [p for p in files.iterdir() if p.name.endswith(".tmp")]


def test_cli_existing_output_and_missing_input(files, capsys):
    (files / "o.pt2").write_bytes(b"precious")
    assert _run("convert", files / "model.pt2", "-o", files / "o.pt2") == 2
    assert "--force" in capsys.readouterr().err
    assert (files / "o.pt2").read_bytes() == b"precious"
    assert _run("convert", files / "nope.pt2", "-o", files / "p.pt2") == 2
    assert "no such file" in capsys.readouterr().err


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "salcompile", "convert", "--help"],
                       capture_output=True, text=True, check=True)
    assert "--trust-pickle" in r.stdout and "runs code" in r.stdout.replace("\n", " ")


def test_cli_export_to_onnx_matches_the_archive(files, capsys):
    import onnxruntime as ort
    sal_path, onnx_path = files / "sal.pt2", files / "m.onnx"
    assert _run("convert", files / "model.pt2", "-o", sal_path, "--areas", "4") == 0
    loaded = salcompile.load(sal_path)
    assert isinstance(loaded, salcompile.SALModule)  # the plan travels in the archive
    assert salcompile.plan(loaded).regions[0]["gate"] == "gate_0"
    assert _run("export", sal_path, "--to", "onnx", "-o", onnx_path) == 0
    x = torch.randn(5, 64)
    session = ort.InferenceSession(str(onnx_path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    loaded.eval()
    torch.testing.assert_close(torch.from_numpy(got), loaded(x).detach(), rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert _run("export", sal_path, "-o", onnx_path) == 2  # exists
    assert "--force" in capsys.readouterr().err
    assert _run("export", files / "model.pt2", "-o", files / "plain.onnx") == 2
    assert "convert the model first" in capsys.readouterr().err
    assert not (files / "plain.onnx").exists()


def _archive_and_torch_grads(files, *convert_args):
    sal_path = files / "sal.pt2"
    assert _run("convert", files / "model.pt2", "-o", sal_path, *convert_args) == 0
    loaded = salcompile.load(sal_path)
    torch.manual_seed(3)
    x, y = torch.randn(6, 64), torch.randint(0, 10, (6,))
    loss = torch.nn.functional.cross_entropy(loaded(x), y)
    grads = dict(zip([n for n, _ in loaded.named_parameters()],
                     torch.autograd.grad(loss, list(loaded.parameters()))))
    return sal_path, x, y, float(loss.detach()), grads


def test_cli_export_to_ort_training_gives_the_archive_gradients(files, capsys):
    pytest.importorskip("onnxruntime.training", reason="onnxruntime-training: Python <= 3.11")
    import numpy as np
    from onnxruntime.training import api
    sal_path, x, y, loss, grads = _archive_and_torch_grads(files, "--areas", "4", "--feedback",
                                                           "dfa")
    out = files / "artifacts"
    assert _run("export", sal_path, "--to", "ort-training", "-o", out, "--optimizer", "sgd") == 0
    state = api.CheckpointState.load_checkpoint(str(out / "checkpoint"))
    module = api.Module(str(out / "training_model.onnx"), state, str(out / "eval_model.onnx"))
    module.train()
    assert float(module(x.numpy(), y.numpy())) == pytest.approx(loss, rel=1e-5)
    got = {n: np.array(p.grad) for n, p in state.parameters}
    assert got.keys() == grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(torch.from_numpy(got[n]), g, rtol=1e-4, atol=1e-6, msg=n)
    capsys.readouterr()
    assert _run("export", sal_path, "--to", "ort-training", "-o", out) == 2   # artifacts exist
    assert "--force" in capsys.readouterr().err


def test_cli_export_to_train_step_trains_like_torch_sgd(files, capsys):
    sal_path, x, y, loss, grads = _archive_and_torch_grads(files, "--areas", "4")
    step_path = files / "step.onnx"
    assert _run("export", sal_path, "--to", "train-step", "-o", step_path, "--optimizer", "sgd",
                "--lr", "0.1") == 0
    loaded = salcompile.load(sal_path)
    sess = salcompile.TrainStepSession(step_path, loaded.state_dict())
    assert sess.step(x.numpy(), y.numpy()) == pytest.approx(loss, rel=1e-5)
    trained = sess.state_dict()
    for n, p in loaded.named_parameters():   # one SGD step: p - lr * (its SAL gradient)
        torch.testing.assert_close(trained[n], p.detach() - 0.1 * grads[n], rtol=1e-4,
                                   atol=1e-6, msg=n)
    capsys.readouterr()
    assert _run("export", sal_path, "--to", "train-step", "-o", step_path) == 2   # exists
    assert "--force" in capsys.readouterr().err


def test_every_salconfig_field_has_a_cli_option():
    import dataclasses
    import argparse
    from salcompile.cli import config_args, config_from
    p = argparse.ArgumentParser()
    config_args(p)
    assert {f.name for f in dataclasses.fields(salcompile.SALConfig)} <= \
        {a.dest for a in p._actions}
    assert config_from(p.parse_args([])) == salcompile.SALConfig()
    assert config_from(p.parse_args(["--no-fuse-regions"])).fuse_regions is False
