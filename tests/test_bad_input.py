"""Every bad input a new user can give gets a SalcompileError saying what is wrong and what to do,
with nothing half-written on disk. docs/bad_input.md lists the same cases (checked below)."""
import os
import pathlib
import re
import sys
import warnings

import pytest
import torch
from torch import nn

import salcompile
from salcompile import SalcompileError
import salcompile.data
import salcompile.files
from salcompile.cli import main
from salcompile.models import MLP
from salcompile.training import Recipe, fit

DOC = pathlib.Path(__file__).parents[1] / "docs" / "bad_input.md"


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        return self.l(x) if x.sum() > 0 else -self.l(x)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _x(n=2, d=8, **kw):
    return torch.randn(n, d, **kw)


def _transform(**kw):
    return lambda tmp: salcompile.transform(MLP(8, 16, 3), (_x(),), **kw)


def _saved(tmp, obj):
    torch.save(obj, tmp / "ckpt.pt")
    return tmp / "ckpt.pt"


def _archive(tmp):
    path = tmp / "m.pt2"
    sal = salcompile.transform(MLP(8, 16, 3), (_x(),), areas=4)
    salcompile.save(sal, (_x(),), path)
    return sal, path


def _write(tmp, name, data):
    (tmp / name).write_bytes(data)
    return tmp / name


def _truncated(tmp):
    _, path = _archive(tmp)
    data = path.read_bytes()
    return salcompile.load(_write(tmp, "cut.pt2", data[: len(data) // 2]))


def _fit(y, n=8):
    sal = salcompile.transform(MLP(8, 16, 3), (_x(),), areas=4)
    return fit(sal, (_x(n), y), (_x(4), torch.zeros(4, dtype=torch.long)), Recipe(epochs=1))


def _no_sklearn(tmp, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    return salcompile.data.load("wine")


def _cli(*args):
    def run(tmp):
        rc = main([str(a).replace("TMP", str(tmp)) for a in args])
        assert rc == 2
        raise SalcompileError("cli")  # the message is checked from stderr by the test
    return run


# (case id as in docs/bad_input.md, what the user does, a phrase the error must contain)
CASES = [
    ("not-a-module", lambda tmp: salcompile.transform(lambda x: x), "needs a torch.nn.Module"),
    ("untraceable-control-flow", lambda tmp: salcompile.transform(DataDependent(), (_x(2, 4),)),
     "control flow"),
    ("example-inputs-wrong-shape", lambda tmp: salcompile.transform(MLP(8, 16, 3), (_x(2, 5),)),
     "example_inputs match"),
    ("example-inputs-missing-argument", lambda tmp: salcompile.transform(MLP(8, 16, 3), ()),
     "missing a required argument"),
    ("example-inputs-too-many", lambda tmp: salcompile.transform(MLP(8, 16, 3), (_x(), _x())),
     "too many positional arguments"),
    ("integer-input-to-a-layer",
     lambda tmp: salcompile.transform(MLP(8, 16, 3), (torch.randint(0, 3, (2, 8)),)),
     "needs floating-point input"),
    ("dtype-mix", lambda tmp: salcompile.transform(MLP(8, 16, 3), (_x(dtype=torch.float64),)),
     "cast one to the other"),
    ("device-mix", lambda tmp: salcompile.transform(MLP(8, 16, 3), (_x(device="meta"),)),
     "move one to the other"),
    ("width-not-divisible-by-k", _transform(areas=3), "not divisible by K=3"),
    ("k-below-1", _transform(areas=0), "areas (K) must be an int >= 1"),
    ("unknown-config-value", _transform(area_mode="moe"), "['partition', 'replicate']"),
    ("unknown-config-field", _transform(aeras=4), "unknown SALConfig field"),
    ("gate-layers-match-nothing", _transform(gate_layers=["conv*"]), "matches no layer"),
    ("gate-layers-ineligible", _transform(areas=4, gate_layers=["layers.1"]),
     "not divisible by K=4"),
    ("dfa-with-weight-init", _transform(feedback="dfa", feedback_init="weights"), "no weight"),
    ("already-transformed",
     lambda tmp: salcompile.transform(salcompile.transform(MLP(8, 16, 3), (_x(),))),
     "already been transformed"),
    ("empty-archive", lambda tmp: salcompile.load(_write(tmp, "e.pt2", b"")), "empty"),
    ("truncated-archive", _truncated, "truncated"),
    ("not-an-archive", lambda tmp: salcompile.load(_write(tmp, "m.onnx", b"\x08\x07\x12\x04abc")),
     "not a readable torch.export archive"),
    ("output-exists", lambda tmp: salcompile.save(_archive(tmp)[0], (_x(),), tmp / "m.pt2"),
     "pass --force"),
    ("output-directory-missing",
     lambda tmp: salcompile.save(_archive(tmp)[0], (_x(),), tmp / "nope" / "m.pt2"),
     "does not exist"),
    ("untrusted-pickle", _cli("convert", "TMP/evil.pt", "-o", "TMP/x.pt2"), "runs code"),
    ("state-dict-without-model", _cli("convert", "TMP/w.pt", "-o", "TMP/x.pt2"), "--model"),
    ("missing-optional-dependency", _no_sklearn, "pip install"),
    ("unknown-dataset", lambda tmp: salcompile.data.load("imagenet"), "digits"),
    ("dataset-files-missing", lambda tmp: salcompile.data.load("mnist", data_dir=str(tmp)),
     "train-images-idx3-ubyte"),
    ("unknown-model", lambda tmp: salcompile.models.build("resnet1000"), "resnet20"),
    ("labels-out-of-range", lambda tmp: _fit(torch.arange(8)), "num_classes >= 8"),
    ("labels-not-integer", lambda tmp: _fit(torch.zeros(8)), "integer class ids"),
    ("inputs-and-labels-differ", lambda tmp: _fit(torch.zeros(7, dtype=torch.long)),
     "inputs (8, 8) but labels (7,)"),
    ("bad-recipe", lambda tmp: Recipe(optimizer="lbfgs"), "choose one of"),
    ("nan-in-training-data",
     lambda tmp: salcompile.transform(MLP(8, 16, 3), (_x(),), areas=4, check_finite=True)(
         torch.full((2, 8), float("nan"))), "non-finite value in the model input"),
    ("inf-weight-during-training", lambda tmp: _inf_weight(), "layer layers.1"),
    ("export-unknown-loss", lambda tmp: salcompile.export_train_step(
        _archive(tmp)[0], (_x(),), tmp / "s.onnx", loss="hinge"), "cross_entropy, mse"),
    ("export-unknown-optimizer", lambda tmp: salcompile.export_ort_training(
        _archive(tmp)[0], (_x(),), tmp / "artifacts", optimizer="lamb"), "adamw, sgd"),
    ("train-step-with-alpha-dropout", lambda tmp: salcompile.export_train_step(
        salcompile.transform(Dropped(), (_x(),), areas=1), (_x(),), tmp / "s.onnx"),
     "Set its probability to 0"),
    ("corrupt-onnx-file", lambda tmp: salcompile.TrainStepSession(
        _write(tmp, "m.onnx", b"\x08\x07garbage"), {}), "Write it again"),
    ("not-a-train-step-graph", lambda tmp: salcompile.TrainStepSession(_inference_onnx(tmp), {}),
     "not a train-step graph"),
    # numbers: finite, in range, of the right type (salcompile/validate.py)
    ("config-not-finite", _transform(balance_weight=float("nan")), "finite number in [0, 10000]"),
    ("config-out-of-range", _transform(temperature=1e-300), "in [0.0001, 10000]"),
    ("bool-is-not-a-number", _transform(temperature=True), "a bool, not a number"),
    ("route-dim-absurd", _transform(route_dim=2 ** 40), "route_dim must be an int in [1, 65536]"),
    ("recipe-not-integer", lambda tmp: Recipe(batch=2.5), "not a whole number"),
    ("recipe-not-finite", lambda tmp: Recipe(weight_decay=float("inf")), "finite number"),
    ("export-lr-not-finite", lambda tmp: salcompile.export_train_step(
        _archive(tmp)[0], (_x(),), tmp / "s.onnx", lr=float("nan")), "lr must be >= 0"),
    ("split-seed-not-integer", lambda tmp: salcompile.data.load("digits", split_seed="x"),
     "split_seed must be an int"),
    ("model-size-negative", lambda tmp: salcompile.models.build("mlp", hidden=-1),
     "hidden must be an int in [1, 2**24]"),
    # sizes the machine cannot hold: estimated before allocating
    ("absurd-size", _transform(areas=10 ** 9, area_mode="replicate"), "is available"),
    ("model-too-big", lambda tmp: salcompile.models.build("mlp", hidden=2 ** 24,
                                                          in_features=2 ** 24), "is available"),
    # paths
    ("output-is-a-directory",
     lambda tmp: salcompile.save(_archive(tmp)[0], (_x(),), tmp, force=True), "is a directory"),
    ("onnx-output-is-a-directory",
     lambda tmp: salcompile.export_onnx(_archive(tmp)[0], (_x(),), tmp), "is a directory"),
    ("path-not-a-path", lambda tmp: salcompile.save(_archive(tmp)[0], (_x(),), None),
     "must be a file path"),
    ("load-path-not-a-path", lambda tmp: salcompile.load(123), "must be a file path"),
    ("output-unwritable-file-system",
     lambda tmp: salcompile.save(_archive(tmp)[0], (_x(),), "/proc/m.pt2"),
     "choose a directory on a writable disk"),
    ("not-a-regular-file", lambda tmp: salcompile.load("/dev/null"), "not a regular file"),
    # archives and concurrent writers
    ("corrupt-archive", lambda tmp: salcompile.load(_corrupt(tmp)), "the archive is damaged"),
    ("another-writer", lambda tmp: _while_locked(tmp), "another process is writing"),
    # arguments of the other entry points
    ("example-inputs-empty-batch",
     lambda tmp: salcompile.transform(MLP(8, 16, 3), (_x(0),)), "empty batch"),
    ("gradient-alignment-non-scalar-loss", lambda tmp: salcompile.metrics.gradient_alignment(
        _archive(tmp)[0], lambda out: out, _x()), "scalar tensor"),
    ("data-parallel-without-process-group",
     lambda tmp: salcompile.distributed.data_parallel(_archive(tmp)[0]), "init_process_group"),
    ("onnx-opset-out-of-range", lambda tmp: salcompile.export_onnx(
        _archive(tmp)[0], (_x(),), tmp / "o.onnx", opset=10 ** 6), "opset must be an int in"),
    ("checkpoint-without-weights", lambda tmp: salcompile.files.load_state_dict(
        _saved(tmp, {"epoch": 3})), "holds no state_dict"),
    ("top-k-above-areas", lambda tmp: salcompile.SALConfig(areas=4, route_top_k=5),
     "exceeds areas"),
    ("shared-fraction-out-of-range", lambda tmp: salcompile.SALConfig(shared_fraction=1.5),
     "shared_fraction must be"),
    ("unknown-feedback-rule", lambda tmp: salcompile.SALConfig(feedback="kolen"),
     "'usf', 'brsf', 'frsf', 'kp'"),
]


def _corrupt(tmp):
    """8 flipped bytes inside a saved archive's weights."""
    import zipfile
    _, path = _archive(tmp)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/weights/weight_" in i.filename),
                   key=lambda i: i.file_size)
    h = info.header_offset   # the local header's own name and extra lengths (torch pads it)
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + \
        int.from_bytes(data[h + 28:h + 30], "little")
    for i in range(8):
        data[start + 16 + i] ^= 0xFF
    return _write(tmp, "cut.pt2", bytes(data))


def _while_locked(tmp):
    from salcompile.files import output_lock
    sal, _ = _archive(tmp)
    with output_lock(tmp / "x.pt2"):  # as another process writing x.pt2 would
        salcompile.save(sal, (_x(),), tmp / "x.pt2")


class Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.d = nn.Linear(8, 4), nn.AlphaDropout(0.5)

    def forward(self, x):
        return self.d(self.l(x))


def _inference_onnx(tmp):
    salcompile.export_onnx(_archive(tmp)[0], (_x(),), tmp / "m.onnx")
    return tmp / "m.onnx"


def _inf_weight():
    sal = salcompile.transform(MLP(8, 16, 3, depth=3), (_x(),), areas=4, check_finite=True)
    with torch.no_grad():
        sal.get_parameter("layers.1.weight")[0, 0] = float("inf")
    return sal(_x())


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": _Evil()}, tmp_path / "evil.pt")
    torch.save(MLP(8, 16, 3).state_dict(), tmp_path / "w.pt")
    return tmp_path


@pytest.mark.parametrize("case,action,phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_and_leaves_nothing_behind(case, action, phrase, tmp,
                                                              monkeypatch, capsys):
    before = set(tmp.rglob("*"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SalcompileError) as err:
            if action.__code__.co_argcount == 2:
                action(tmp, monkeypatch)
            else:
                action(tmp)
    message = str(err.value) if str(err.value) != "cli" else capsys.readouterr().err
    assert phrase in message, message
    assert len(message) > 30  # says what to do, not just what failed
    left = {p for p in set(tmp.rglob("*")) - before
            if p.name not in ("m.pt2", "e.pt2", "cut.pt2", "m.onnx", "ckpt.pt")}
    assert not left, f"left behind: {left}"
    assert not (tmp / "PWNED").exists()


def test_docs_table_lists_exactly_the_tested_cases():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), re.M)
    assert sorted(rows) == sorted(c[0] for c in CASES)
