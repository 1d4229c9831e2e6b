"""Issue 15, the rest of the new-user round: train --device / --precision / your own data /
the zoo gpt with an LM loss (10), readable ONNX names (17), trained weights back from ORT (18),
progress messages on long steps (13), `make test`'s summary (20), digits_sal.py's output (23),
the conv-net guidance and gradient_alignment's unit (25)."""
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salcompile
from salcompile import SalcompileError, data
from salcompile.cli import main
from salcompile.training import Recipe, fit, resolve_device

ROOT = Path(__file__).resolve().parents[1]


def run(*argv):
    """main(argv) in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _toy(n=60, features=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long() * (classes - 2)
    return x.numpy(), y.numpy()


# ------------------------------------------------------------------ (10) your own data
def test_npz_with_splits_and_with_x_y(tmp_path):
    x, y = _toy()
    np.savez(tmp_path / "s.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    ds = data.load_file(tmp_path / "s.npz")
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert (len(ds.y_train), len(ds.y_test), ds.num_classes) == (40, 20, 3)
    assert sorted(ds.x_test.tolist()) == sorted(torch.from_numpy(x[40:]).tolist())  # test kept
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    ds = data.load_file(tmp_path / "xy.npz", limit=10)
    assert (len(ds.y_train), len(ds.y_test)) == (10, 12)   # seeded 80/20 split, then the limit


def test_csv_with_a_label_column(tmp_path):
    x, y = _toy(n=30)
    rows = ["f0,f1,label,f2,f3,f4"] + [",".join(map(str, [*r[:2], int(l), *r[2:]]))
                                         for r, l in zip(x, y)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    ds = data.load_file(tmp_path / "t.csv")
    assert ds.input_shape == (5,) and len(ds.y_train) == 24 and len(ds.y_test) == 6
    assert torch.allclose(ds.x_train.mean(0), torch.zeros(5), atol=1e-5)   # standardised
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SalcompileError, match="no column named 'label'.*header: a, b"):
        data.load_file(tmp_path / "bad.csv")
    (tmp_path / "frac.csv").write_text("a,label\n1,0.5\n2,1\n")
    with pytest.raises(SalcompileError, match="integer class ids"):
        data.load_file(tmp_path / "frac.csv")


def test_folder_of_tensors(tmp_path):
    x, y = _toy()
    for k, v in (("x_train", x[:40]), ("y_train", y[:40]), ("x_test", x[40:]),
                 ("y_test", y[40:])):
        torch.save(torch.from_numpy(v), tmp_path / f"{k}.pt")
    ds = data.load_file(tmp_path)
    assert (len(ds.y_train), len(ds.y_test)) == (40, 20)
    (tmp_path / "y_test.pt").unlink()
    with pytest.raises(SalcompileError, match="lacks y_test.pt"):
        data.load_file(tmp_path)


def test_bad_data_files_say_what_they_must_hold(tmp_path):
    with pytest.raises(SalcompileError, match="no such file"):
        data.load_file(tmp_path / "nope.npz")
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(SalcompileError, match="unknown format '.json'"):
        data.load_file(tmp_path / "d.json")
    np.savez(tmp_path / "k.npz", inputs=np.zeros((3, 2)))
    with pytest.raises(SalcompileError, match="needs x_train, y_train, x_test, y_test"):
        data.load_file(tmp_path / "k.npz")
    np.savez(tmp_path / "f.npz", x=np.zeros((10, 2)), y=np.linspace(0, 1, 10))
    with pytest.raises(SalcompileError, match="must be integer class ids"):
        data.load_file(tmp_path / "f.npz")
    np.savez(tmp_path / "n.npz", x=np.zeros((10, 2)), y=np.full(10, -1))
    with pytest.raises(SalcompileError, match=">= 0"):
        data.load_file(tmp_path / "n.npz")
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}] * 10, dtype=object), y=np.zeros(10, int))
    with pytest.raises(SalcompileError, match="pickled objects are not read"):
        data.load_file(tmp_path / "o.npz")
    np.savez(tmp_path / "m.npz", x_train=np.zeros((4, 2)), y_train=np.zeros(3, int),
             x_test=np.zeros((2, 2)), y_test=np.zeros(2, int))
    with pytest.raises(SalcompileError, match="same N"):
        data.load_file(tmp_path / "m.npz")
    code, _, err = run("train", "--model", "mlp", "--data", "imagenet", "--no-progress")
    assert code == 2 and "unknown dataset 'imagenet'" in err and ".npz" in err


def test_train_own_npz_from_the_cli(tmp_path):
    x, y = _toy(n=120)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    code, out, err = run("train", "--model", "mlp", "--model-args", '{"hidden": 32}', "--data",
                         tmp_path / "mine.npz", "--areas", "4", "--epochs", "2", "--no-progress",
                         "--no-alignment", "-o", tmp_path / "m.sal.pt2")
    assert code == 0, err
    assert "epoch   2/2" in out and (tmp_path / "m.sal.pt2").is_file()


def test_text_file_is_a_character_lm(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 20
    (tmp_path / "t.txt").write_text(text)
    ds = data.load_file(tmp_path / "t.txt", seq_len=16)
    assert ds.num_classes == len(set(text)) and ds.x_train.shape[1:] == (16,)
    assert torch.equal(ds.x_train[:, 1:], ds.y_train[:, :-1])   # targets: the next character
    assert ds.vocab[int(ds.x_train[0, 0])] == "t"
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(SalcompileError, match="too short"):
        data.load_file(tmp_path / "short.txt", seq_len=16)


# ------------------------------------------------------------------ (10) device, precision
def test_device_choices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SalcompileError, match="choose one of auto, cpu, cuda"):
        resolve_device("tpu")


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run("train", "--model", "mlp", "--data", "digits", "--device", "cuda")
    assert code == 2 and "Traceback" not in err
    assert "--device 'cuda': torch" in err and "Use --device 'cpu' (or 'auto')" in err, err
    assert resolve_device("auto").type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_on_cuda_saves_a_cpu_archive(tmp_path):
    code, out, err = run("train", "--model", "mlp", "--data", "digits", "--areas", "4",
                         "--epochs", "1", "--device", "cuda", "--precision", "bf16",
                         "--no-progress", "-o", tmp_path / "m.sal.pt2")
    assert code == 0, err
    sal = salcompile.load(tmp_path / "m.sal.pt2")
    assert all(p.device.type == "cpu" for p in sal.parameters())


class _Probe(nn.Module):
    """Records whether its forward ran under CPU autocast (and in which dtype)."""
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 16), nn.Linear(16, 3)
        self.seen = []

    def forward(self, x):
        h = self.fc1(x)
        self.seen.append(h.dtype)
        return self.fc2(torch.relu(h))


def test_bf16_autocast_around_forward_and_loss():
    x, y = (torch.from_numpy(a) for a in _toy(n=64))
    x = x.float()
    probe = _Probe()
    records = fit(probe, (x, y), (x, y), Recipe(lr=1e-2, batch=16, epochs=3),
                  precision="bf16")
    assert torch.bfloat16 in probe.seen                        # the layers ran in bf16
    assert all(p.dtype == torch.float32 for p in probe.parameters())
    assert records[-1].train_loss < records[0].train_loss
    torch.manual_seed(0)
    sal = salcompile.transform(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)),
                               (x[:4],), areas=4)
    rec = fit(sal, (x, y), (x, y), Recipe(lr=1e-2, batch=16, epochs=3), precision="bf16")
    assert all(np.isfinite(r.train_loss) for r in rec) and rec[-1].nonfinite == 0
    with pytest.raises(SalcompileError, match="precision='fp8'"):
        fit(probe, (x, y), (x, y), Recipe(epochs=1), precision="fp8")


def test_cli_precision_bf16(tmp_path):
    code, out, err = run("train", "--model", "mlp", "--model-args", '{"hidden": 32}', "--data",
                         "iris", "--areas", "4", "--epochs", "2", "--precision", "bf16",
                         "--no-progress")
    assert code == 0, err
    assert "epoch   2/2" in out


# ------------------------------------------------------------------ (10) gpt with an LM loss
GPT_ARGS = '{"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}'


def test_zoo_gpt_trains_as_a_language_model(tmp_path):
    code, out, err = run("train", "--model", "gpt", "--model-args", GPT_ARGS, "--data",
                         "tokens", "--limit", "256", "--epochs", "3", "--areas", "4", "--lr",
                         "1e-2", "--no-progress", "-o", tmp_path / "g.sal.pt2")
    assert code == 0, err
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 3 and losses[-1] < losses[0], out
    sal = salcompile.load(tmp_path / "g.sal.pt2")
    tokens = data.synthetic_tokens().x_test[:3]
    assert sal(tokens).shape == (3, 32, 16)                   # logits per position
    code, out, err = run("train", "--resume", tmp_path / "g.sal.pt2", "--data", "tokens",
                         "--limit", "64", "--epochs", "1", "--no-progress")
    assert code == 0, err


def test_gpt_on_a_text_file_and_mismatched_data(tmp_path):
    (tmp_path / "t.txt").write_text("to be or not to be, that is the question. " * 30)
    code, out, err = run("train", "--model", "gpt", "--model-args",
                         GPT_ARGS[:-1] + ', "seq_len": 16}', "--data", tmp_path / "t.txt",
                         "--areas", "1", "--epochs", "1", "--no-progress", "--no-alignment")
    assert code == 0, err
    code, _, err = run("train", "--model", "gpt", "--data", "digits", "--no-progress")
    assert code == 2 and "takes token ids" in err and "--data tokens" in err
    code, _, err = run("train", "--model", "mlp", "--data", "tokens", "--no-progress")
    assert code == 2 and "holds token ids" in err


def test_fit_lm_loss_is_the_per_token_cross_entropy():
    from salcompile.training import task_loss
    out, y = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    assert torch.allclose(task_loss(out, y), F.cross_entropy(out.reshape(10, 7), y.reshape(10)))
    out, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    assert torch.allclose(task_loss(out, y), F.cross_entropy(out, y))


# ------------------------------------------------------------------ (17) ONNX names
def test_onnx_names_inputs_outputs_and_dims(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from salcompile.models import build, example_input
    kw = dict(vocab_size=12, seq_len=8, dim=16, depth=1, heads=2, mlp_dim=32)
    tokens = example_input("gpt", batch=3, **kw)
    sal = salcompile.transform(build("gpt", **kw), (tokens,), areas=4)
    salcompile.export_onnx(sal, (tokens,), tmp_path / "g.onnx")
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"))
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("tokens", ["batch", "sequence"])]
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [
        ("output", ["batch", "sequence", 12])]
    sal.eval()
    with torch.no_grad():
        want = sal(tokens[:, :5])
    got = sess.run(["output"], {"tokens": tokens[:, :5].numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    params = {p.dim_param for v in onnx.load(str(tmp_path / "g.onnx")).graph.value_info
              for p in v.type.tensor_type.shape.dim if p.dim_param}
    assert not any(re.search(r"\bs\d+\b", p) for p in params), params


def test_onnx_dict_outputs_take_their_keys(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, features):
            h = self.fc(features)
            return {"logits": h, "probs": h.softmax(-1)}

    x = torch.randn(4, 4)
    sal = salcompile.transform(Two(), (x,), areas=1)
    salcompile.export_onnx(sal, (x,), tmp_path / "t.onnx")
    sess = ort.InferenceSession(str(tmp_path / "t.onnx"))
    assert [i.name for i in sess.get_inputs()] == ["features"]
    assert [o.name for o in sess.get_outputs()] == ["logits", "probs"]
    assert sess.get_inputs()[0].shape == ["batch", 4]


# ------------------------------------------------------------------ (18) ORT weights back
def test_ort_trained_weights_load_back_into_torch(tmp_path):
    pytest.importorskip("onnxruntime.training")
    from onnxruntime.training import api
    from salcompile.models import MLP
    from salcompile.onnx import load_ort_checkpoint
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    sal = salcompile.transform(MLP(6, 16, 3), (x,), areas=4)
    before = {n: p.detach().clone() for n, p in sal.named_parameters()}
    salcompile.export_ort_training(sal, (x,), tmp_path / "art")
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "art" / "checkpoint"))
    step = api.Module(str(tmp_path / "art" / "training_model.onnx"), state,
                      str(tmp_path / "art" / "eval_model.onnx"))
    opt = api.Optimizer(str(tmp_path / "art" / "optimizer_model.onnx"), step)
    step.train()
    for _ in range(2):
        step(x.numpy(), y.numpy())
        opt.step()
        step.lazy_reset_grad()
    names = load_ort_checkpoint(sal, state)
    assert names == sorted(n for n, _ in sal.named_parameters())
    for n, p in sal.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), np.array(state.parameters[n].data))
    assert any(not torch.equal(before[n], p) for n, p in sal.named_parameters())
    # a saved checkpoint (path or its directory) loads the same
    api.CheckpointState.save_checkpoint(state, str(tmp_path / "trained.ckpt"))
    fresh = salcompile.transform(MLP(6, 16, 3), (x,), areas=4)
    load_ort_checkpoint(fresh, tmp_path / "trained.ckpt")
    for (n, p), q in zip(sal.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    step.eval()
    with torch.no_grad():
        sal.eval()
        want = sal(x)
    np.testing.assert_allclose(step(x.numpy(), y.numpy()), F.cross_entropy(want, y).item(),
                               rtol=1e-5)
    other = salcompile.transform(MLP(6, 8, 3), (x,), areas=4)
    with pytest.raises(SalcompileError, match=r"is \(16,.*\) in the checkpoint but \(8,"):
        load_ort_checkpoint(other, state)
    with pytest.raises(SalcompileError, match="not a checkpoint file"):
        load_ort_checkpoint(sal, tmp_path / "nothing")


# ------------------------------------------------------------------ (13) progress on long steps
def test_cli_exports_say_what_they_do_and_how_long(tmp_path, capsys):
    pytest.importorskip("onnx")
    x = torch.randn(4, 6)
    sal = salcompile.transform(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
                               (x,), areas=1)
    salcompile.save(sal, (x,), tmp_path / "m.sal.pt2")
    capsys.readouterr()
    salcompile.export_onnx(sal, (x,), tmp_path / "api.onnx")
    assert capsys.readouterr().err == ""                         # the Python API stays quiet
    code, out, err = run("export", tmp_path / "m.sal.pt2", "--to", "onnx")
    assert code == 0, err
    assert re.search(r"exporting .*m\.sal\.pt2 to ONNX \(this takes \d+-\d+ s\)", err), err
    assert re.search(r"done in \d+\.\d s", err), err


# ------------------------------------------------------------------ (20) make test's summary
def test_make_test_keeps_the_pass_summary_and_filters_the_rnn_notice():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    make = (ROOT / "Makefile").read_text()
    line = next(l for l in make.splitlines() if "-m pytest" in l).split("#")[0]
    quiet = line.split().count("-q") + cfg["addopts"].split().count("-q")
    assert quiet <= 1, "pytest -q twice hides the 'N passed' summary"
    assert any("_flat_weights" in f for f in cfg["filterwarnings"])


def test_pytest_q_once_prints_the_summary(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_ok():\n    assert True\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path / "test_one.py")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert "1 passed" in done.stdout, done.stdout


# ------------------------------------------------------------------ (23) digits_sal.py's output
def test_digits_benchmark_writes_under_runs_by_default():
    import importlib.util
    spec = importlib.util.spec_from_file_location("digits_sal", ROOT / "benchmarks" /
                                                  "digits_sal.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parser().parse_args([]).out == str(Path("runs") / "digits_sal.md")
    assert mod.parser().parse_args(["--out", "x.md"]).out == "x.md"


# ------------------------------------------------------------------ (25) units, conv guidance
def test_gradient_alignment_names_its_unit_and_readme_guides_conv_nets():
    doc = salcompile.metrics.gradient_alignment.__doc__
    assert "degrees" in doc and "90°" in doc
    readme = (ROOT / "README.md").read_text()
    assert "**Conv nets.**" in readme and "areas=1" in readme
