"""One experiment = a zoo model × a dataset × a SALConfig × a training recipe × seeds.

`run_experiment` fits the model to the dataset (input size, classes), transforms it, trains one run
per seed and, given `out`, writes metrics.json, metrics.csv and learning_curve.png there.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import torch

from .config import SALConfig
from .errors import SalcompileError
from .files import atomic_write_text
from .training import EpochRecord, Recipe, fit
from .validate import integer


@dataclass
class RunResult:
    seed: int
    records: List[EpochRecord]
    parameters: int

    @property
    def final_test_acc(self) -> float:
        return self.records[-1].test_acc if self.records else float("nan")


@dataclass
class ExperimentResult:
    model: str
    data: str
    config: dict
    recipe: dict
    runs: List[RunResult] = field(default_factory=list)

    @property
    def accuracies(self) -> List[float]:
        return [r.final_test_acc for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.mean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.runs) > 1 else 0.0

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "config": self.config,
                "recipe": self.recipe, "test_acc_mean": self.mean, "test_acc_std": self.std,
                "runs": [{"seed": r.seed, "parameters": r.parameters,
                          "final_test_acc": r.final_test_acc,
                          "epochs": [e.to_dict() for e in r.records]} for r in self.runs]}


def fit_model_to_data(model_name: str, dataset, **model_kwargs):
    """(model, x_train, x_test): the zoo model sized to the dataset's inputs and classes."""
    from .models import REGISTRY, build
    if model_name not in REGISTRY:
        build(model_name)  # raises the zoo's own error listing the names
    entry = REGISTRY[model_name]
    xtr, xte = dataset.x_train, dataset.x_test
    kwargs = {"num_classes": dataset.num_classes, **model_kwargs}
    if not entry.input_dtype.is_floating_point:
        raise SalcompileError(f"model {model_name!r} takes tokens; dataset {dataset.name!r} holds "
                              "features. Pick a classifier (see salcompile.models.REGISTRY).")
    if len(entry.input_shape) == 1:  # a flat-input model: flatten whatever the data is
        xtr, xte = xtr.flatten(1), xte.flatten(1)
        kwargs.setdefault("in_features", xtr.shape[1])
    else:
        if xtr.dim() != len(entry.input_shape) + 1:
            raise SalcompileError(
                f"model {model_name!r} expects inputs shaped like {entry.input_shape}; dataset "
                f"{dataset.name!r} gives {tuple(xtr.shape[1:])}. Use a flat model (mlp) or image "
                "data.")
        kwargs.setdefault("in_channels", xtr.shape[1])
    return build(model_name, **kwargs), xtr, xte


def with_model_defaults(model_name: str, config: SALConfig) -> SALConfig:
    """Apply the zoo entry's recommended SALConfig fields where `config` keeps the default
    (e.g. lenet5 gates only conv2: its other widths are not divisible by 16)."""
    from .models import REGISTRY
    entry = REGISTRY.get(model_name)
    default = SALConfig()
    picked = {k: v for k, v in (entry.sal if entry else {}).items()
              if getattr(config, k) == getattr(default, k)}
    return config.replace(**picked) if picked else config


def run_experiment(model: str, data: str, config: SALConfig, recipe: Recipe, *, seeds: int = 1,
                   data_dir: Optional[str] = None, grayscale: bool = False, flatten: bool = False,
                   limit: Optional[int] = None, alignment: bool = False, progress: bool = True,
                   out: Optional[str] = None, log: Optional[Callable[[str], None]] = print,
                   model_kwargs: Optional[dict] = None) -> ExperimentResult:
    from . import data as datasets
    from .pipeline import transform
    integer("seeds", seeds, lo=1, hint="how many seeded runs, e.g. 3")
    if not isinstance(config, SALConfig):
        raise SalcompileError(f"config must be a salcompile.SALConfig, got {type(config).__name__}.")
    if not isinstance(recipe, Recipe):
        raise SalcompileError(f"recipe must be a salcompile.training.Recipe, got "
                              f"{type(recipe).__name__}.")
    ds = datasets.load(data, data_dir=data_dir, grayscale=grayscale, flatten=flatten, limit=limit)
    config = with_model_defaults(model, config)
    result = ExperimentResult(model, data, config.to_dict(), asdict(recipe))
    for seed in range(seeds):
        torch.manual_seed(seed)
        net, xtr, xte = fit_model_to_data(model, ds, **(model_kwargs or {}))
        sal = transform(net, (xtr[:2],), config.replace(feedback_seed=config.feedback_seed + seed,
                                                       routing_seed=config.routing_seed + seed))
        if log and seed == 0:
            log(str(sal.sal_plan))

        def on_epoch(rec, seed=seed):
            if log:
                extra = "" if rec.routing_balance is None else \
                    f"  areas {rec.active_areas} balance {rec.routing_balance:.3f}"
                align = "" if rec.alignment is None else f"  align {rec.alignment:5.1f}°"
                log(f"seed {seed} epoch {rec.epoch:3d}/{recipe.epochs}  loss {rec.train_loss:.4f}  "
                    f"train {rec.train_acc:5.1f}%  test {rec.test_acc:5.1f}%{extra}{align}"
                    + (f"  NONFINITE {rec.nonfinite}" if rec.nonfinite else ""))

        records = fit(sal, (xtr, ds.y_train), (xte, ds.y_test), recipe, seed=seed,
                      alignment=alignment, progress=progress, desc=f"{model}/{data} seed {seed}",
                      on_epoch=on_epoch)
        result.runs.append(RunResult(seed, records, sum(p.numel() for p in sal.parameters())))
    if log:
        log(f"{model} on {data}: test accuracy {result.mean:.2f} ± {result.std:.2f} % "
            f"over {seeds} seed(s)")
    if out:
        write_results(result, out)
        if log:
            log(f"wrote {os.path.join(out, 'metrics.json')}, metrics.csv, learning_curve.png")
    return result


def write_results(result: ExperimentResult, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    text = json.dumps(result.to_dict(), indent=1, default=_json_default)
    atomic_write_text(os.path.join(out, "metrics.json"), text)
    buf = io.StringIO()
    cols = ["seed", "epoch", "train_loss", "train_acc", "test_acc", "seconds", "routing_balance",
            "active_areas", "alignment", "nonfinite"]
    w = csv.writer(buf)
    w.writerow(cols)
    for r in result.runs:
        for e in r.records:
            d = e.to_dict()
            w.writerow([r.seed] + ["" if d[c] is None else d[c] for c in cols[1:]])
    atomic_write_text(os.path.join(out, "metrics.csv"), buf.getvalue())
    from .plots import learning_curve
    learning_curve(result, os.path.join(out, "learning_curve.png"))


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return repr(v)
