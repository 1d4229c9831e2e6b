"""The command line with a user's own models (issue 15): --model file.py:Class / module:Class,
--model-args, pickles whose class is missing, --input-dtype and several inputs, eval-mode and
static-batch archives, threads, help, CLI wording, train -o / --resume."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import salcompile
from salcompile import SalcompileError
from salcompile.cli import main

NET = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, in_features=4, hidden=16, num_classes=3):
            super().__init__()
            self.fc1 = nn.Linear(in_features, hidden)
            self.fc2 = nn.Linear(hidden, num_classes)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    class Tokens(nn.Module):
        """Token ids -> classes: an embedding, an MLP, mean over the sequence."""
        def __init__(self, vocab=50, dim=8, num_classes=3):
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.fc1 = nn.Linear(dim, 16)
            self.fc2 = nn.Linear(16, num_classes)

        def forward(self, ids):
            return self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4 + 4, 3)

        def forward(self, x, ids):
            return self.fc(torch.cat([x, self.emb(ids).mean(1)], 1))

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            raise ValueError("needs a config file")

    def not_a_module():
        return 3
''')


def run(*args):
    return main([str(a) for a in args])


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's directory holding net.py, as the working directory."""
    (tmp_path / "net.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))   # for building reference models in the test
    yield tmp_path
    for name in [m for m in sys.modules if m in ("net", "mypkg", "mypkg.models", "saved_here")]:
        del sys.modules[name]


def _net(**kw):
    from salcompile.model_source import build_model
    return build_model("net.py:Net", json.dumps(kw) if kw else None)


# ------------------------------------------------------------------ item 2: own classes
def test_convert_own_class_from_file_with_model_args_and_weights(project, capsys):
    torch.manual_seed(0)
    ref = _net(hidden=32)
    torch.save(ref.state_dict(), project / "weights.pt")
    assert run("convert", "weights.pt", "--model", "net.py:Net", "--model-args",
               '{"hidden": 32}', "--input-shape", "4", "--areas", "1") == 0
    out = project / "weights.sal.pt2"          # -o derived from the input's name
    assert out.exists() and f"wrote {out.name}" in capsys.readouterr().out
    sal = salcompile.load(out)
    assert sal.get_parameter("fc1.weight").shape == (32, 4)
    x = torch.randn(5, 4)
    sal.eval()
    torch.testing.assert_close(sal(x), ref(x))  # the weights were loaded
    sal.train()
    torch.nn.functional.cross_entropy(sal(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert sal.get_parameter("fc1.weight").grad is not None


def test_convert_package_module_class_and_fresh_weights(project):
    (project / "mypkg").mkdir()
    (project / "mypkg" / "__init__.py").write_text("")
    (project / "mypkg" / "models.py").write_text(NET)
    assert run("convert", "--model", "mypkg.models:Net", "--input-shape", "4", "--areas", "4",
               "-o", "p.sal.pt2") == 0
    sal = salcompile.load(project / "p.sal.pt2")
    assert salcompile.plan(sal).regions            # areas=4 gated fc1
    assert sal(torch.randn(3, 4)).shape == (3, 3)
    assert run("convert", "--model", "net.py:Net", "--input-shape", "4") == 0
    assert (project / "Net.sal.pt2").exists()      # no input: CLASS.sal.pt2


@pytest.mark.parametrize("args,needle", [
    (["--model", "missing.py:Net"], "no such file missing.py"),
    (["--model", "net.py:Nett"], "its nn.Module classes: Broken, Net, Tokens, TwoInputs"),
    (["--model", "no_such_pkg.mod:Net"], "no module named 'no_such_pkg'"),
    (["--model", "net.py:Net", "--model-args", "{hidden: 3}"], "not valid JSON"),
    (["--model", "net.py:Net", "--model-args", '"x"'], "expected a JSON object"),
    (["--model", "net.py:Net", "--model-args", '{"hiden": 3}'],
     "unexpected keyword argument 'hiden'. Its constructor takes (in_features=4"),
    (["--model", "net.py:Broken"], "constructing Broken failed: ValueError: needs a config"),
    (["--model", "net.py:not_a_module"], "built a int, not a torch.nn.Module"),
    (["--model", "net.py:Net"], "pass --input-shape"),
    (["--model", "net.py:Net", "--input-shape", "4,x"], "expected positive integers"),
    (["weights.pt", "--input-shape", "4"], "--model path/to/file.py:ClassName"),
    (["weights.pt", "--model", "net.py:Net", "--model-args", '{"hidden": 8}', "--input-shape",
      "4"], "does not fit --model net.py:Net"),
])
def test_own_model_errors_say_what_to_do(project, capsys, args, needle):
    torch.save(_net().state_dict(), project / "weights.pt")
    assert run("convert", *args, "-o", "o.pt2") == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.startswith("salcompile: error: ") and not (project / "o.pt2").exists()


def test_broken_model_file_names_the_file(project, capsys):
    (project / "bad.py").write_text("import torch\nraise RuntimeError('oops')\n")
    assert run("inspect", "--model", "bad.py:Net", "--input-shape", "4") == 2
    assert "running bad.py failed: RuntimeError: oops" in capsys.readouterr().err


# ------------------------------------------------------------------ item 3: pickles
def test_pickle_of_a_script_class_says_use_file_class(project, capsys):
    (project / "save_it.py").write_text(NET + textwrap.dedent('''
        if __name__ == "__main__":
            torch.save(Net(), "full.pt")
    '''))
    subprocess.run([sys.executable, "save_it.py"], check=True, cwd=project)
    assert run("convert", "full.pt", "--trust-pickle", "--input-shape", "4", "-o", "o.pt2") == 2
    err = capsys.readouterr().err
    assert "class Net of module __main__" in err and "--model path/to/file.py:ClassName" in err
    assert "--trust-pickle from the directory" in err and not (project / "o.pt2").exists()


def test_trust_pickle_finds_classes_in_the_working_directory(project, monkeypatch, capsys):
    (project / "saved_here.py").write_text(NET)
    import saved_here
    torch.save(saved_here.Net(), project / "full.pt")
    # as the installed `salcompile` script runs: the working directory is not on sys.path
    del sys.modules["saved_here"]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(project))])
    assert run("convert", "full.pt", "--trust-pickle", "--input-shape", "4", "--areas", "1") == 0
    assert salcompile.load(project / "full.sal.pt2")(torch.randn(2, 4)).shape == (2, 3)
    (project / "saved_here.py").unlink()    # the defining module is gone: say what to do
    del sys.modules["saved_here"]
    assert run("convert", "full.pt", "--trust-pickle", "--input-shape", "4", "-o", "x.pt2") == 2
    err = capsys.readouterr().err
    assert "module saved_here" in err and "state_dict" in err


# ------------------------------------------------------------------ item 4: inputs
def test_int64_token_inputs_with_default_and_given_vocab(project, capsys):
    assert run("convert", "--model", "net.py:Tokens", "--input-shape", "7", "--input-dtype",
               "int64", "--areas", "1", "-o", "t.sal.pt2") == 0
    sal = salcompile.load(project / "t.sal.pt2")
    ids = torch.randint(0, 50, (4, 7))       # the default vocab: the embedding's 50 rows
    assert sal(ids).shape == (4, 3)
    ep = torch.export.load(str(project / "t.sal.pt2"))
    x = ep.example_inputs[0][0]
    assert x.dtype == torch.int64 and int(x.max()) < 50
    assert run("convert", "--model", "net.py:Tokens", "--input-shape", "7", "--input-dtype",
               "int64", "--vocab", "3", "--areas", "1", "-o", "t3.sal.pt2") == 0
    x = torch.export.load(str(project / "t3.sal.pt2")).example_inputs[0][0]
    assert x.dtype == torch.int64 and int(x.max()) < 3


def test_several_inputs_and_shapes_from_the_archive(project):
    from net import TwoInputs
    torch.manual_seed(0)
    model = TwoInputs()
    assert run("convert", "--model", "net.py:TwoInputs", "--input-shape", "4",
               "--input-shape", "5", "--input-dtype", "float32", "--input-dtype", "int64",
               "--areas", "1", "-o", "two.sal.pt2") == 0
    sal = salcompile.load(project / "two.sal.pt2")
    assert sal(torch.randn(3, 4), torch.randint(0, 10, (3, 5))).shape == (3, 3)
    # a plain archive of it: shapes and dtypes come from the archive, no option needed
    ep = torch.export.export(model, (torch.randn(2, 4), torch.randint(0, 10, (2, 5))),
                             dynamic_shapes=({0: torch.export.Dim.AUTO},
                                             {0: torch.export.Dim.AUTO}))
    torch.export.save(ep, project / "two.pt2")
    assert run("convert", "two.pt2", "--areas", "1", "-o", "two2.sal.pt2") == 0
    sal = salcompile.load(project / "two2.sal.pt2")
    x, ids = torch.randn(6, 4), torch.randint(0, 10, (6, 5))
    sal.eval()
    torch.testing.assert_close(sal(x, ids), model(x, ids))


def test_archive_without_example_inputs_uses_its_signature(project):
    from salcompile.model_source import archive_inputs
    ep = torch.export.export(_net(), (torch.randn(3, 4),),
                             dynamic_shapes=({0: torch.export.Dim.AUTO},))
    ep._example_inputs = None
    got = archive_inputs(ep)
    assert got[0].shape == (2, 4) and got[0].dtype == torch.float32


# ------------------------------------------------------------------ item 6: eval-mode archives
class _BNDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop = nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def test_eval_mode_archive_warns_and_train_mode_switches_it(project, capsys):
    model = _BNDrop().eval()
    ep = torch.export.export(model, (torch.randn(4, 4),),
                             dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, project / "eval.pt2")
    assert run("convert", "eval.pt2", "--areas", "1", "-o", "frozen.sal.pt2") == 0
    err = capsys.readouterr().err
    assert "exported in eval mode" in err and "--train-mode" in err
    frozen = salcompile.load(project / "frozen.sal.pt2")
    x = torch.randn(8, 4)
    torch.testing.assert_close(frozen(x), frozen(x))          # no dropout, running statistics

    assert run("convert", "eval.pt2", "--areas", "1", "--train-mode", "-o", "t.sal.pt2") == 0
    assert "exported in eval mode" not in capsys.readouterr().err
    sal = salcompile.load(project / "t.sal.pt2")
    before = sal.get_buffer("bn.running_mean").clone()
    assert not torch.equal(sal(x), sal(x))                      # dropout is on in train mode
    assert not torch.equal(sal.get_buffer("bn.running_mean"), before)   # BN statistics move
    sal.eval()
    torch.testing.assert_close(sal(x), sal(x))


# ------------------------------------------------------------------ item 5: static batch
class _ViewNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = torch.relu(self.c(x))
        return self.fc(h.view(h.size(0), -1))


def test_static_batch_archive_warns_and_says_how(project, capsys):
    torch.export.save(torch.export.export(_ViewNet(), (torch.randn(3, 1, 8, 8),)),
                      project / "static.pt2")
    assert run("convert", "static.pt2", "--areas", "1") == 0
    err = capsys.readouterr().err
    assert "runs only at batch size 3" in err and "dynamic_shapes" in err
    ep = torch.export.export(_ViewNet(), (torch.randn(3, 1, 8, 8),),
                             dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, project / "dyn.pt2")
    assert run("convert", "dyn.pt2", "--areas", "1") == 0
    assert "batch size" not in capsys.readouterr().err
    assert salcompile.load(project / "dyn.sal.pt2")(torch.randn(5, 1, 8, 8)).shape == (5, 3)


# ------------------------------------------------------------------ item 11: threads
def test_threads_default_one_and_option(project, monkeypatch):
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    before = torch.get_num_threads()
    assert run("inspect", "--model", "net.py:Net", "--input-shape", "4") == 0
    assert calls[0] == 1 and torch.get_num_threads() == before   # restored for the caller
    calls.clear()
    assert run("inspect", "--model", "net.py:Net", "--input-shape", "4", "--threads", "2") == 0
    assert calls[0] == 2
    calls.clear()
    assert run("inspect", "--model", "net.py:Net", "--input-shape", "4", "--threads", "0") == 0
    assert calls == [before]                                     # 0: torch's own default


# ------------------------------------------------------------------ item 14: help
def test_help_describes_every_option_with_defaults_and_names(capsys):
    from salcompile.cli import _parser
    from salcompile.data import DATASETS
    from salcompile.models import REGISTRY
    ap = _parser()
    subs = next(a for a in ap._actions if isinstance(a, type(ap._subparsers._group_actions[0])))
    for name, p in subs.choices.items():
        for a in p._actions:
            assert a.help, f"{name} {a.option_strings or a.dest} has no help"
        text = p.format_help()
        assert "DESIGN" not in text and "notes" not in text.lower()
        assert "threads" in text
    train = subs.choices["train"].format_help()
    assert all(n in train for n in REGISTRY) and all(n in train for n in DATASETS)
    assert "(default: 3e-3)" in train.replace("0.003", "3e-3")
    assert "{fa,dfa,bp" in subs.choices["convert"].format_help().replace("\n", "")
    with pytest.raises(SystemExit):
        run("--version")
    assert capsys.readouterr().out.strip() == f"salcompile {salcompile.__version__}"


def test_python_dash_m_help_and_version_run():
    r = subprocess.run([sys.executable, "-m", "salcompile", "--version"], capture_output=True,
                       text=True, check=True)
    assert r.stdout.startswith("salcompile ")


# ------------------------------------------------------------------ item 16: inspect, wording
def test_inspect_of_a_converted_archive_warns_about_ignored_options(project, capsys):
    assert run("convert", "--model", "net.py:Net", "--input-shape", "4", "--areas", "4") == 0
    capsys.readouterr()
    assert run("inspect", "Net.sal.pt2", "--areas", "8", "--feedback", "dfa") == 0
    captured = capsys.readouterr()
    assert "--feedback, --areas ignored" in captured.err and "areas=4" in captured.out


@pytest.mark.parametrize("args,needle", [
    (["convert", "--model", "net.py:Net", "--input-shape", "4", "--areas", "0"], "--areas (K)"),
    (["convert", "--model", "net.py:Net", "--input-shape", "4", "--temperature", "0"],
     "--temperature must be"),
    (["train", "--model", "net.py:Net", "--data", "iris", "--lr", "0"], "--lr must be"),
    (["convert", "--model", "net.py:Net", "--input-shape", "4", "--gate-layers", "zz*"],
     "--gate-layers"),
])
def test_cli_errors_use_flag_names(project, capsys, args, needle):
    assert run(*args, "--no-progress" if args[0] == "train" else "--force") == 2
    err = capsys.readouterr().err
    assert needle in err and "SALConfig:" not in err and "Recipe:" not in err, err


# ------------------------------------------------------------------ item 10: train -o, --resume
def test_train_own_model_saves_and_resumes(project, capsys):
    args = ["--data", "iris", "--epochs", "2", "--batch", "32", "--areas", "1",
            "--no-progress", "--no-alignment"]
    assert run("train", "--model", "net.py:Net", "--model-args", '{"hidden": 16}', *args,
               "-o", "iris.sal.pt2", "--out", "run1") == 0
    out = capsys.readouterr().out
    assert "seed 0 epoch   2/2" in out and "wrote iris.sal.pt2" in out
    assert (project / "run1" / "metrics.json").exists()
    trained = salcompile.load(project / "iris.sal.pt2")
    assert isinstance(trained, salcompile.SALModule)
    w = trained.get_parameter("fc1.weight").detach().clone()
    assert run("train", "--resume", "iris.sal.pt2", *args, "-o", "iris2.sal.pt2") == 0
    resumed = salcompile.load(project / "iris2.sal.pt2")
    w2 = resumed.get_parameter("fc1.weight").detach()
    assert not torch.equal(w, w2) and (w - w2).abs().max() < 1.0   # continued, not restarted
    assert run("train", "--resume", "iris.sal.pt2", *args, "--areas", "4", "-o",
               "iris2.sal.pt2") == 2      # exists
    assert "--force" in capsys.readouterr().err
    assert run("train", "--model", "net.py:Net", *args, "--seeds", "2", "-o", "x.pt2") == 2
    assert "--seeds 1" in capsys.readouterr().err


def test_train_zoo_model_with_out_keeps_the_model(project, capsys):
    assert run("train", "--model", "mlp", "--model-args", '{"hidden": 32}', "--data", "iris",
               "--epochs", "1", "--areas", "4", "--no-progress", "--no-alignment",
               "--out", "run") == 0
    sal = salcompile.load(project / "run" / "model.sal.pt2")
    assert sal(torch.randn(3, 4)).shape == (3, 3)


# ------------------------------------------------------------------ item 21: numpy in fit
def test_fit_with_numpy_arrays_says_numpy():
    from salcompile.training import Recipe, fit
    x, y = np.random.randn(8, 4).astype("float32"), np.arange(8) % 3
    with pytest.raises(SalcompileError, match=r"numpy array \(int64\).*torch.from_numpy\(y\)"):
        fit(nn.Linear(4, 3), (torch.from_numpy(x), y), (torch.from_numpy(x), y), Recipe(epochs=1))
    with pytest.raises(SalcompileError, match=r"inputs are a numpy array \(float32\)"):
        fit(nn.Linear(4, 3), (x, torch.from_numpy(y)), (x, torch.from_numpy(y)), Recipe(epochs=1))


# ------------------------------------------------------------------ the README's own-model block
def test_readme_own_model_commands_run(tmp_path, monkeypatch, capsys):
    import pathlib
    import re
    import shlex
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "cat > net.py" in b)
    source = re.search(r"cat > net.py <<'EOF'\n(.*?)\nEOF\n", block, re.S).group(1)
    (tmp_path / "net.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    commands = block.split("\nEOF\n", 1)[1].replace("\\\n", " ")
    try:
        for line in commands.splitlines():
            words = shlex.split(line, comments=True)
            assert words[:3] == ["python", "-m", "salcompile"], line
            extra = ["--no-progress", "--no-alignment"] if words[3] == "train" else []
            assert main(words[3:] + extra) == 0, line
    finally:
        sys.modules.pop("net", None)
    out = capsys.readouterr().out
    assert "epoch   3/3" in out and "region gate_0" in out
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "net.onnx"))
    x = torch.randn(3, 64)
    sal = salcompile.load(tmp_path / "net.sal.pt2").eval()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), sal(x).detach(), rtol=1e-4, atol=1e-4)
