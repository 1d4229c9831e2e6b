"""`salcompile --help` / `--version` answer without importing torch (issue 15: they took ~2.5 s),
the torch-free tables the parser shows equal the real ones, and the lazy `import salcompile`
behaves as the eager one did (every public name, the custom ops registered for archives)."""
import dataclasses
import importlib
import json
import subprocess
import sys

import pytest
import torch

import salcompile
from salcompile import cli

# Runs the command line in a fresh interpreter, then prints whether torch (or salcompile's
# torch-using modules) got imported. `module`: run as `python -m salcompile`; else the console
# script's `from salcompile.__main__ import main; main()`.
RUNNER = """
import json, runpy, sys
argv = json.loads(sys.argv[1])
sys.argv = ["salcompile", *argv]
code = None
try:
    if {module}:
        runpy.run_module("salcompile", run_name="__main__", alter_sys=True)
    else:
        from salcompile.__main__ import main
        code = main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")
               or m in ("numpy", "salcompile.ops", "salcompile.config", "salcompile.training"))
print(json.dumps({{"code": code, "heavy": heavy}}))
"""


def _run_cli(argv, module=True):
    r = subprocess.run([sys.executable, "-c", RUNNER.format(module=module), json.dumps(argv)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    *text, last = r.stdout.rstrip("\n").split("\n")
    return json.loads(last), "\n".join(text), r.stderr


@pytest.mark.parametrize("argv,module,code", [
    (["--help"], True, 0),
    (["train", "--help"], True, 0),
    (["--version"], False, 0),
    (["convert", "--help"], False, 0),
    (["train"], True, 2),                    # a usage error (--data missing) needs no torch either
])
def test_help_and_version_do_not_import_torch(argv, module, code):
    result, out, err = _run_cli(argv, module)
    assert result["code"] == code, (out, err)
    assert result["heavy"] == [], result["heavy"]
    if argv == ["train", "--help"]:
        text = " ".join(out.split())
        assert all(n in text for n in cli.ZOO_NAMES + cli.DATASET_NAMES)
        assert "{fp32,bf16,fp16}" in text and "{adam,adamw,sgd}" in text
    if argv == ["--version"]:
        assert out.strip() == f"salcompile {salcompile.__version__}"


def test_the_parser_tables_equal_the_real_ones():
    # a failure here: a table changed; update its torch-free copy at the top of salcompile/cli.py
    from salcompile import config, data, feedback, model_source, training
    from salcompile.models import REGISTRY
    assert cli.ZOO_NAMES == tuple(REGISTRY)
    assert cli.DATASET_NAMES == (*data.DATASETS, *data.LM_DATASETS)
    assert cli.DATA_FORMATS == data.FILE_FORMATS
    assert cli.DTYPE_NAMES == tuple(model_source.DTYPES)
    assert cli.OPTIMIZER_NAMES == tuple(sorted(training.OPTIMIZERS))
    assert cli.DEVICE_NAMES == tuple(training.DEVICES)
    assert cli.PRECISION_NAMES == tuple(training.PRECISIONS)
    assert cli.RECIPE_DEFAULTS == dataclasses.asdict(training.Recipe())
    assert cli.FEEDBACK_SUMMARIES == {n: feedback.get(n).summary for n in feedback.names()}
    assert cli.CONFIG_CHOICES == {
        "feedback": config.FEEDBACK_MODES, "feedback_init": config.FEEDBACK_INITS,
        "feedback_scale": config.FEEDBACK_SCALES, "area_mode": config.AREA_MODES,
        "route_by": config.ROUTE_BY, "area_impl": config.AREA_IMPLS,
        "input_block_gain": config.BLOCK_GAINS, "on_backprop": config.ON_BACKPROP}
    assert cli.CONFIG_DEFAULTS == dataclasses.asdict(config.SALConfig())


def test_lazy_package_gives_every_public_name():
    from salcompile import archive, backends, config, errors, module, onnx, pipeline, routing
    want = {"SALConfig": config.SALConfig, "SALModule": module.SALModule,
            "SalcompileError": errors.SalcompileError, "transform": pipeline.transform,
            "plan": pipeline.plan, "feedback_matrices": module.feedback_matrices,
            "compile": backends.compile, "metrics": importlib.import_module("salcompile.metrics"),
            "save": archive.save, "load": archive.load, "routing_stats": routing.routing_stats,
            "reset_routing_stats": routing.reset_routing_stats,
            "distributed": importlib.import_module("salcompile.distributed"),
            "export_onnx": onnx.export_onnx, "export_ort_training": onnx.export_ort_training,
            "export_train_step": onnx.export_train_step, "TrainStepSession": onnx.TrainStepSession,
            "__version__": "0.1.0"}
    assert set(salcompile.__all__) == set(want)
    for name, value in want.items():
        assert getattr(salcompile, name) == value, name
        assert name in dir(salcompile)
        if name != "__version__":
            assert getattr(salcompile, name) is value, name
    importlib.import_module("salcompile.plan")   # the submodule does not hide the function
    assert salcompile.plan is pipeline.plan
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        salcompile.nope


# A fresh process: `import salcompile` imports no torch; importing torch afterwards registers the
# custom ops, so a .sal.pt2 archive loads with torch.export.load and trains with its FA ops.
LOAD = """
import sys
import salcompile
assert "torch" not in sys.modules, "import salcompile imported torch"
import torch
assert hasattr(torch.ops.salcompile, "fa_linear")
ep = torch.export.load(sys.argv[1])
m = ep.module()
x = torch.randn(3, 4)
m(x).sum().backward()
print("ok", sorted({n.target.name() for n in ep.graph.nodes if n.op == "call_function"
                    and str(n.target).startswith("salcompile.")}))
"""


def test_import_salcompile_then_torch_loads_an_archive(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    sal = salcompile.transform(net, (x,), areas=1)
    path = tmp_path / "m.sal.pt2"
    salcompile.save(sal, (x,), path)
    r = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok") and "salcompile::fa_linear" in r.stdout, r.stdout
