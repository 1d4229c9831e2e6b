"""A plain classification training loop with the measurements SAL research needs.

`fit` trains with cross-entropy on shuffled mini-batches and records, per epoch: train loss and
accuracy, test accuracy, routing balance (SAL models), the mean angle between the SAL update and
the true backprop gradient (optional), and how many non-finite values the parameters hold.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SalcompileError
from .routing import routing_counts_kept
from .validate import Int, Num, check_numbers

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


# Every numeric Recipe field: type and valid range (salcompile/validate.py).
RECIPE_FIELDS = {
    "lr": Num(lo=0, lo_open=True, hint="the learning rate, e.g. 3e-3"),
    "batch": Int(lo=1, hint="samples per step, e.g. 16"),
    "epochs": Int(lo=1, hint="passes over the training set, e.g. 25"),
    "momentum": Num(lo=0, hi=1, hint="SGD momentum, e.g. 0.9 (0: none)"),
    "weight_decay": Num(lo=0, hint="e.g. 0 or 1e-4"),
}


@dataclass(frozen=True)
class Recipe:
    optimizer: str = "adam"
    lr: float = 3e-3
    batch: int = 16
    epochs: int = 25
    momentum: float = 0.0       # SGD only
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise SalcompileError(f"optimizer={self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}.")
        check_numbers(self, RECIPE_FIELDS, who="Recipe")

    def make_optimizer(self, params):
        kw = dict(lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "sgd":
            kw["momentum"] = self.momentum
        return OPTIMIZERS[self.optimizer](params, **kw)

    def __str__(self) -> str:
        mom = f", momentum {self.momentum:g}" if self.optimizer == "sgd" and self.momentum else ""
        return f"{self.optimizer} lr {self.lr:g}{mom}, batch {self.batch}, {self.epochs} epochs"


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    seconds: float
    routing_balance: Optional[float] = None   # normalised entropy of the training routing
    active_areas: Optional[int] = None
    alignment: Optional[float] = None          # mean angle(update, BP gradient), degrees
    nonfinite: int = 0                         # NaN/inf entries in the parameters
    extra: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    """Accuracy in %, in eval mode (the model's mode is restored; routing counts untouched)."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad(), routing_counts_kept(model):
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    model.train(was)
    return 100.0 * correct / max(1, len(x))


def nonfinite_count(model: nn.Module) -> int:
    return sum(int((~torch.isfinite(p)).sum()) for p in model.parameters()
               if p.is_floating_point())


def _alignment(model, x, y) -> Optional[float]:
    from .metrics import gradient_alignment
    from .module import SALModule
    if not isinstance(getattr(model, "_orig_mod", model), SALModule):
        return None
    angles = [a for a in gradient_alignment(model, lambda o: F.cross_entropy(o, y), x).values()
              if not math.isnan(a)]
    return sum(angles) / len(angles) if angles else None


def _check_split(name, x, y) -> None:
    """Labels the loss can use, caught before the first step (not deep inside cross_entropy)."""
    for what, v, fix in (("inputs", x, "torch.from_numpy(x).float()"),
                         ("labels", y, "torch.from_numpy(y).long()")):
        if not isinstance(v, torch.Tensor):
            kind = f"a numpy array ({v.dtype})" if type(v).__module__ == "numpy" else \
                f"a {type(v).__module__}.{type(v).__name__}"
            raise SalcompileError(f"{name} {what} are {kind}; fit takes torch tensors: "
                                  f"convert with {fix}.")
    if len(x) != len(y):
        raise SalcompileError(f"{name} set: {len(x)} inputs but {len(y)} labels.")
    if len(x) == 0:
        raise SalcompileError(f"{name} set is empty.")
    if y.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
        raise SalcompileError(f"{name} labels must be integer class ids, got {y.dtype}; "
                              "convert with y.long().")
    if int(y.min()) < 0:
        raise SalcompileError(f"{name} labels must be >= 0, found {int(y.min())}.")


def _check_labels_fit(model, x, y) -> None:
    was = model.training
    model.eval()
    with torch.no_grad(), routing_counts_kept(model):
        classes = model(x[:2]).shape[-1]
    model.train(was)
    top = int(y.max())
    if top >= classes:
        raise SalcompileError(f"labels go up to {top}, but the model outputs {classes} classes; "
                              f"build the model with num_classes >= {top + 1}.")


def fit(model: nn.Module, train, test, recipe: Recipe = Recipe(), *, seed: int = 0,
        alignment: bool = False, progress: bool = False, desc: str = "",
        on_epoch: Optional[Callable[[EpochRecord], None]] = None) -> List[EpochRecord]:
    """Train `model` on `train` = (x, y), evaluate on `test` each epoch; returns the records.

    alignment: measure angle(SAL update, BP gradient) on 256 training samples each epoch.
    progress: a tqdm bar over the batches (on stderr).
    """
    from .routing import reset_routing_stats, routing_stats
    (xtr, ytr), (xte, yte) = train, test
    _check_split("train", xtr, ytr)
    _check_split("test", xte, yte)
    _check_labels_fit(model, xtr, torch.cat([ytr.long(), yte.long()]))
    opt = recipe.make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(xtr) / recipe.batch)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps * recipe.epochs, desc=desc, unit="step", leave=False,
                   dynamic_ncols=True)
    records = []
    try:
        for epoch in range(recipe.epochs):
            t0 = time.perf_counter()
            reset_routing_stats(model)
            order = torch.randperm(len(xtr), generator=gen)
            total_loss, correct = 0.0, 0
            for i in range(0, len(xtr), recipe.batch):
                idx = order[i:i + recipe.batch]
                opt.zero_grad(set_to_none=True)
                out = model(xtr[idx])
                loss = F.cross_entropy(out, ytr[idx].long())
                loss.backward()
                opt.step()
                total_loss += float(loss.detach()) * len(idx)
                correct += int((out.detach().argmax(-1) == ytr[idx]).sum())
                if bar is not None:
                    bar.update(1)
            stats = routing_stats(model)
            first = next(iter(stats.values()), None)
            rec = EpochRecord(
                epoch=epoch + 1, train_loss=total_loss / len(xtr),
                train_acc=100.0 * correct / len(xtr), test_acc=accuracy(model, xte, yte),
                seconds=time.perf_counter() - t0,
                routing_balance=None if first is None else round(first["balance"], 4),
                active_areas=None if first is None else first["active"],
                alignment=_alignment(model, xtr[:256], ytr[:256]) if alignment else None,
                nonfinite=nonfinite_count(model))
            records.append(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec.train_loss:.3f}", test=f"{rec.test_acc:.1f}%")
            if on_epoch is not None:
                on_epoch(rec)
    finally:
        if bar is not None:
            bar.close()
    return records
