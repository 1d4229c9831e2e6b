"""The training loop, the experiment runner and `python -m salcompile train`."""
import csv
import json

import pytest
import torch

import salcompile
from salcompile import SALConfig, SalcompileError
from salcompile.cli import main
from salcompile.experiment import run_experiment
from salcompile.training import Recipe, fit
from conftest import mlp


def _toy(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


@pytest.mark.parametrize("fields", [dict(feedback="bp", areas=1), dict(feedback="dfa", areas=1),
                                    dict(areas=4), dict(areas=4, area_mode="replicate")])
def test_fit_records_each_epoch_and_learns(fields):
    train, test = _toy(96), _toy(64, seed=1)
    torch.manual_seed(0)
    sal = salcompile.transform(mlp(8, 32, 3, depth=2), (train[0][:2],), **fields)
    recs = fit(sal, train, test, Recipe(lr=1e-2, epochs=6), alignment=True)
    assert [r.epoch for r in recs] == list(range(1, 7))
    assert recs[-1].train_loss < recs[0].train_loss
    assert all(r.nonfinite == 0 and 0 <= r.test_acc <= 100 for r in recs)
    assert all(r.alignment is not None for r in recs)
    gated = fields.get("areas", 1) > 1
    assert (recs[-1].routing_balance is not None) == gated
    if gated:  # counted over the last epoch's training rows only (evaluation leaves no trace)
        assert salcompile.routing_stats(sal)["gate_0"]["rows"] == 96


def test_same_seed_same_run():
    train, test = _toy(), _toy(32, seed=1)
    accs = []
    for _ in range(2):
        torch.manual_seed(0)
        sal = salcompile.transform(mlp(8, 32, 3, depth=2), (train[0][:2],), areas=4)
        accs.append([r.train_loss for r in fit(sal, train, test, Recipe(epochs=2), seed=3)])
    assert accs[0] == accs[1]


def test_bad_recipe():
    with pytest.raises(SalcompileError, match="optimizer='rmsprop'"):
        Recipe(optimizer="rmsprop")
    with pytest.raises(SalcompileError, match="lr must be > 0"):
        Recipe(lr=0)


def test_experiment_writes_metrics_and_plot(tmp_path):
    r = run_experiment("mlp", "iris", SALConfig(areas=4), Recipe(epochs=3, lr=1e-2), seeds=2,
                       out=str(tmp_path), progress=False, log=None)
    assert len(r.runs) == 2 and len(r.accuracies) == 2
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["config"]["areas"] == 4 and len(data["runs"][1]["epochs"]) == 3
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 6 and rows[0]["routing_balance"] != ""
    assert (tmp_path / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_cli_train(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--data", "wine", "--feedback", "fa", "--areas", "4",
                 "--optimizer", "sgd", "--lr", "0.05", "--epochs", "2", "--seeds", "1",
                 "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "epoch   2/2" in text and "balance" in text and "align" in text and "test accuracy" in text
    assert (out / "metrics.json").exists() and (out / "learning_curve.png").exists()


def test_cli_train_errors(tmp_path, capsys):
    assert main(["train", "--model", "mlp", "--data", "nope", "--epochs", "1"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["train", "--model", "resnet20", "--data", "wine", "--epochs", "1",
                 "--no-progress"]) == 2
    assert "expects inputs shaped like" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", "--model", "mlp", "--data", "wine", "--out", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_zoo_recommendations_apply_where_the_config_keeps_its_defaults():
    from salcompile.experiment import with_model_defaults
    assert with_model_defaults("lenet5", SALConfig()).gate_layers == ("conv2",)
    assert with_model_defaults("lenet5", SALConfig(gate_layers=["fc1"])).gate_layers == ("fc1",)
    assert with_model_defaults("mlp", SALConfig(areas=4)) == SALConfig(areas=4)
