"""Reliability (issue 14): numbers are validated everywhere, archives carry a checksum, an
interrupted write leaves nothing that outlives the next write, concurrent writers are refused,
and input_block_gain never changes what other uses of a parameter compute."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salcompile
from salcompile import SalcompileError, SALConfig
from salcompile import validate
from salcompile.config import NUMERIC_FIELDS
from salcompile.files import CHECKSUM_FILE, atomic_write, check_output, lock_path, output_lock
from salcompile.models import MLP
from salcompile.training import RECIPE_FIELDS, Recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_NUMBERS = [float("nan"), float("inf"), -float("inf"), True, "1", None]


def _x(n=2):
    return torch.randn(n, 8)


@pytest.fixture(scope="module")
def sal():
    torch.manual_seed(0)
    return salcompile.transform(MLP(8, 16, 3), (_x(),), areas=4)


# ---- numbers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field", sorted(NUMERIC_FIELDS))
@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
def test_every_numeric_config_field_refuses_non_numbers_and_non_finite(field, value):
    with pytest.raises(SalcompileError, match=rf"{field}.* must be .*got"):
        SALConfig(**{field: value})


@pytest.mark.parametrize("field", sorted(RECIPE_FIELDS))
@pytest.mark.parametrize("value", BAD_NUMBERS + [-1], ids=repr)
def test_every_numeric_recipe_field_refuses_bad_values(field, value):
    with pytest.raises(SalcompileError, match=rf"Recipe: {field} must be"):
        Recipe(**{field: value})


@pytest.mark.parametrize("field,value", [("areas", 2.5), ("route_dim", 4.0), ("batch", 2.5),
                                         ("epochs", 1.5)])
def test_an_int_field_refuses_a_float(field, value):
    make = Recipe if field in RECIPE_FIELDS else SALConfig
    with pytest.raises(SalcompileError, match="not a whole number"):
        make(**{field: value})


def test_valid_numbers_still_pass_and_messages_give_the_range():
    SALConfig(areas=4, route_dim=8, balance_weight=0, temperature=1, feedback_seed=2 ** 40)
    Recipe(lr=1, batch=1, epochs=1, momentum=0.9, weight_decay=1e-4)
    import numpy as np
    assert validate.integer("n", np.int64(3), lo=1) == 3
    with pytest.raises(SalcompileError, match=r"in \[0, 10000\], got -1 \(out of range\)"):
        SALConfig(balance_weight=-1)


@pytest.mark.parametrize("kw", [dict(lr=float("nan")), dict(lr=True), dict(weight_decay=math.inf),
                                dict(eps=-1.0), dict(momentum=float("nan"), optimizer="sgd"),
                                dict(betas=(0.9, float("nan"))), dict(betas=(0.9,)),
                                dict(nesterov=1), dict(dynamic_batch="yes")])
def test_export_train_step_checks_its_numbers_before_any_work(sal, kw, tmp_path):
    with pytest.raises(SalcompileError, match="export_train_step: "):
        salcompile.export_train_step(sal, (_x(),), tmp_path / "s.onnx", **kw)
    assert not list(tmp_path.iterdir())


def test_data_and_models_and_experiment_arguments():
    import salcompile.data as data
    from salcompile.experiment import run_experiment
    for kw in (dict(split_seed=-1), dict(split_seed=1.5), dict(limit=0), dict(limit=2.0),
               dict(flatten="no")):
        with pytest.raises(SalcompileError, match="data.load: "):
            data.load("digits", **kw)
    for kw in (dict(hidden=0), dict(depth=2.5), dict(in_features=True)):
        with pytest.raises(SalcompileError, match="model 'mlp': "):
            salcompile.models.build("mlp", **kw)
    with pytest.raises(SalcompileError, match="multiple of heads"):
        salcompile.models.build("vit", dim=16, heads=3)
    with pytest.raises(SalcompileError, match="seeds must be an int >= 1"):
        run_experiment("mlp", "digits", SALConfig(), Recipe(), seeds=0)


def test_cli_helpers_for_shapes_and_memory():
    assert validate.shape("--input-shape", [3, 32, 32]) == (3, 32, 32)
    with pytest.raises(SalcompileError, match=r"--input-shape\[0\] must be an int >= 1"):
        validate.shape("--input-shape", [-1])
    with pytest.raises(SalcompileError, match="is available"):
        validate.shape("--input-shape", [1048576, 1048576])
    with pytest.raises(SalcompileError, match="needs 1.0 PiB"):
        validate.check_memory(2 ** 50, "a test")
    validate.check_memory(2 ** 50, "a tensor on meta", device="meta")   # nothing to check


# ---- archives carry a checksum ---------------------------------------------------------------

def test_saved_archive_carries_a_checksum_that_load_verifies(sal, tmp_path):
    path = tmp_path / "m.pt2"
    salcompile.save(sal, (_x(),), path)
    with zipfile.ZipFile(path) as z:
        (name,) = [n for n in z.namelist() if n.endswith("extra/" + CHECKSUM_FILE)]
        assert len(json.loads(z.read(name))["sha256"]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a checked archive loads without a note
        back = salcompile.load(path)
    x = _x(4)
    sal.eval(), back.eval()
    assert torch.allclose(back(x), sal(x))
    sal.train()


def test_changed_member_with_a_valid_crc_is_caught_by_the_checksum(sal, tmp_path):
    path, bad = tmp_path / "m.pt2", tmp_path / "bad.pt2"
    salcompile.save(sal, (_x(),), path)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data/weights/weight_0"):
                data = bytes(b ^ 0xFF for b in data[:8]) + data[8:]   # re-zipped: CRC is valid
            dst.writestr(info, data)
    with pytest.raises(SalcompileError, match="the archive is damaged: its contents hash"):
        salcompile.load(bad)


def test_an_archive_without_a_checksum_still_loads_with_a_note(sal, tmp_path):
    path, old = tmp_path / "m.pt2", tmp_path / "old.pt2"
    salcompile.save(sal, (_x(),), path)
    extra = {"salcompile/plan.json": ""}
    ep = torch.export.load(str(path), extra_files=extra)
    torch.export.save(ep, str(old), extra_files={"salcompile/plan.json":
                                                 extra["salcompile/plan.json"]})
    with pytest.warns(UserWarning, match="carries no checksum"):
        back = salcompile.load(old)
    assert isinstance(back, salcompile.SALModule)


# ---- interrupted writes and concurrent writers -----------------------------------------------

_CHILD = textwrap.dedent("""
    import sys, time, pathlib
    sys.path.insert(0, {root!r})
    from salcompile.files import atomic_write, output_lock
    out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
    def slow(tmp):
        pathlib.Path(tmp).write_bytes(b"x" * 4096)
        print("writing", flush=True)
        time.sleep(60)
    if mode == "write":
        atomic_write(out, slow)
    else:
        with output_lock(out):
            print("locked", flush=True)
            time.sleep(60)
""")


def _child(tmp_path, out, mode):
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=ROOT))
    p = subprocess.Popen([sys.executable, str(script), str(out), mode], stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = p.stdout.readline()
    assert line.strip() in ("writing", "locked"), line
    return p


def test_a_write_killed_midway_leaves_a_temp_the_next_write_removes(tmp_path):
    out = tmp_path / "model.pt2"
    p = _child(tmp_path, out, "write")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    stale = [f for f in os.listdir(tmp_path) if f.startswith(".model.pt2.") and ".tmp" in f]
    assert len(stale) == 1 and not out.exists()
    (tmp_path / ".model.pt2.notours.tmp.pt2").write_text("keep")   # not our naming pattern
    with pytest.warns(UserWarning, match="removed 1 stale temporary file"):
        atomic_write(out, lambda tmp: open(tmp, "wb").write(b"ok"))
    assert out.read_bytes() == b"ok"
    left = sorted(os.listdir(tmp_path))
    assert left == [".model.pt2.notours.tmp.pt2", "child.py", "model.pt2"], left


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(sal, tmp_path):
    out = tmp_path / "same.pt2"
    p = _child(tmp_path, out, "lock")
    try:
        with pytest.raises(SalcompileError, match="another process is writing"):
            salcompile.save(sal, (_x(),), out)
        assert not out.exists()
    finally:
        p.kill()
        p.wait()
    # the holder died: its lock went with it; the next writer succeeds and removes the lock file
    salcompile.save(sal, (_x(),), out)
    assert out.exists() and not lock_path(out).exists()


def test_concurrent_converts_to_one_path_one_wins_the_others_are_refused(tmp_path):
    torch.save(salcompile.models.build("mlp").state_dict(), tmp_path / "w.pt")
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        from salcompile.cli import main
        sys.exit(main(["convert", "w.pt", "--model", "mlp", "--input-shape", "64",
                       "-o", "same.pt2"]))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    ok = [r for r in results if r[0] == 0]
    assert len(ok) <= 1, results       # never two successes for one file
    for rc, err in results:
        assert rc in (0, 2), err
        if rc == 2:
            assert ("another process is writing" in err or "exists" in err
                    or "created by another process" in err), err
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f or f.endswith(".lock")]


def test_a_file_created_meanwhile_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "o.bin"
    check_output(out, force=False)
    out.write_bytes(b"theirs")              # another process finished first
    with pytest.raises(SalcompileError, match="created by another process"):
        atomic_write(out, lambda tmp: open(tmp, "wb").write(b"mine"))
    assert out.read_bytes() == b"theirs"
    check_output(out, force=True)
    atomic_write(out, lambda tmp: open(tmp, "wb").write(b"mine"))
    assert out.read_bytes() == b"mine"


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with output_lock(tmp_path / "a"):
        with pytest.raises(SalcompileError, match="another process"):
            with output_lock(tmp_path / "a"):
                pass
        with output_lock(tmp_path / "b"):    # another path: independent
            pass
    assert not os.listdir(tmp_path)


def test_written_files_get_the_usual_permissions(sal, tmp_path):
    salcompile.save(sal, (_x(),), tmp_path / "m.pt2")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "m.pt2").stat().st_mode & 0o777 == 0o666 & ~mask


# ---- empty batches ---------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_area_ops_take_an_empty_batch(impl):
    s = salcompile.transform(MLP(8, 16, 3), (_x(),), areas=4, area_impl=impl)
    out = s(torch.randn(0, 8))
    assert out.shape == (0, 3)
    out.sum().backward()


# ---- input_block_gain keeps other uses of a parameter ----------------------------------------

class TiedLM(nn.Module):
    """Embedding tied to the head; the head reads the gated layer's area block."""

    def __init__(self, vocab=16, dim=16):
        super().__init__()
        self.emb, self.fc0, self.fc1 = nn.Embedding(vocab, dim), nn.Linear(dim, dim), \
            nn.Linear(dim, dim)

    def forward(self, t):
        e = self.emb(t)
        h = torch.relu(self.fc1(self.fc0(e)))
        return F.linear(h, self.emb.weight), e


class HeadAlsoElementwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = torch.relu(self.fc1(torch.relu(self.fc0(x))))
        return self.head(h), x.sum(-1, keepdim=True) * self.head.weight[0]


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("make,x", [(TiedLM, lambda: torch.randint(0, 16, (2, 5))),
                                    (HeadAlsoElementwise, lambda: torch.randn(2, 8))],
                         ids=["tied-embedding-head", "head-weight-elementwise"])
def test_input_block_gain_changes_only_the_block_reading_layer(make, x, impl, tmp_path):
    torch.manual_seed(0)
    model, x = make(), x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = salcompile.transform(model, (x,), areas=4, gate_layers=["fc1"], area_impl=impl)
        dense = salcompile.transform(model, (x,), areas=4, gate_layers=["fc1"], area_impl=impl,
                                     input_block_gain="none")
    head = s.sal_plan.layers[-1]
    assert head.input_block                                # the gain applies to this layer
    logits, other = s(x)
    assert torch.allclose(other, model(x)[1])             # the other use computes as before
    assert not torch.allclose(logits, dense(x)[0])        # ... while the head is scaled
    (logits.sum() + other.sum()).backward()
    salcompile.save(s, (x,), tmp_path / "m.pt2")
    assert torch.allclose(salcompile.load(tmp_path / "m.pt2")(x)[1], model(x)[1])


# ---------------------------------------------------------------- round-2 leftovers
def test_legacy_torch_save_and_checkpoint_dicts_are_state_dicts(tmp_path):
    from salcompile import files
    from salcompile.models import MLP
    model = MLP(8, 16, 3)
    sd = model.state_dict()
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"model": sd, "epoch": 3, "lr": 0.1}, tmp_path / "ckpt.pt")
    torch.save({"epoch": 3}, tmp_path / "no_weights.pt")
    for name in ("legacy.pt", "ckpt.pt"):
        assert files.detect_format(tmp_path / name) == files.STATE_DICT, name
        got = files.load_state_dict(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    with pytest.raises(SalcompileError, match="holds no state_dict"):
        files.load_state_dict(tmp_path / "no_weights.pt")


def test_export_onnx_checks_the_opset(tmp_path):
    pytest.importorskip("onnxscript")
    from salcompile.models import MLP
    x = torch.randn(4, 8)
    sal = salcompile.transform(MLP(8, 16, 3), (x,), areas=1)
    for bad in (-1, 10 ** 6, 2.5, True):
        with pytest.raises(SalcompileError, match=r"opset must be an int in \[18, "):
            salcompile.export_onnx(sal, (x,), tmp_path / "m.onnx", opset=bad)
    assert not (tmp_path / "m.onnx").exists()


def test_replicate_mode_loads_the_original_state_dict_into_every_copy():
    from salcompile.models import MLP
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    model = MLP(8, 16, 3, depth=3)
    sal = salcompile.transform(model, (x,), areas=4, area_mode="replicate")
    other = MLP(8, 16, 3, depth=3)   # other weights, the original's shapes
    result = sal.load_state_dict(other.state_dict(), strict=False)
    assert not result.unexpected_keys
    w = sal.get_parameter("layers.0.weight")
    assert w.shape[0] == 4
    for k in range(4):
        torch.testing.assert_close(w[k], other.get_parameter("layers.0.weight"))
        torch.testing.assert_close(sal.get_parameter("layers.0.bias")[k],
                                   other.get_parameter("layers.0.bias"))


def test_a_wrong_shape_capture_prints_no_torch_traceback(capfd):
    from salcompile.models import MLP
    with pytest.raises(SalcompileError, match="could not capture"):
        salcompile.transform(MLP(8, 16, 3), (torch.randn(4, 5),))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "fake_tensor" not in err
