"""A plain classification training loop with the measurements SAL research needs.

`fit` trains with cross-entropy on shuffled mini-batches and records, per epoch: train loss and
accuracy, test accuracy, routing balance (SAL models), the mean angle between the SAL update and
the true backprop gradient (optional), and how many non-finite values the parameters hold.
A language model (outputs [batch, seq, vocab], targets [batch, seq] token ids) trains with the
next-token cross-entropy over every position; its accuracies count tokens.
`device` ("cpu", "cuda", "auto") and `precision` ("fp32"; "bf16" or "fp16": torch.autocast
around the forward and the loss, parameters, gradients and optimizer state stay float32) choose
where and how it runs.

fp16 adds loss scaling (torch.amp.GradScaler on the device: CPU or CUDA; on a CPU float16 is
emulated and much slower than float32 - `fit` warns - a way to rehearse a GPU recipe). A step
whose gradients hold inf/NaN (the scale was too high, or the data/loss is bad) is skipped - the
weights and the optimizer state are left as they were - and the scale is halved; the epoch record
counts those steps in `extra["skipped_steps"]` and shows the scale in `extra["loss_scale"]`.
With SALConfig(check_finite=True) the guards still check every layer's output and gradient: a
non-finite forward value (which no scaling fixes) raises as before; a non-finite gradient in a
scaled backward is treated as the scaler's overflow (the step is skipped, the scale halved) while
the scale is above 1, and raises the guard's error (naming the layer) once the scale is down to 1,
where the gradient is no longer amplified.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NonFiniteGradient, SalcompileError
from .routing import routing_counts_kept
from .validate import Int, Num, check_numbers

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALED = ("fp16",)   # the precisions that train with a torch.amp.GradScaler
FP16_ON_CPU = ("precision='fp16' on a CPU: torch emulates float16 matmuls there, much slower "
               "than fp32 (23x for a 1024-wide MLP on an AMD EPYC); on a CPU use "
               "precision='bf16' (native where the CPU has AVX512-BF16/AMX, no loss scaling), "
               "fp16 on CUDA.")


def resolve_device(device) -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; 'cuda' without one is a clear error."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or device.split(":")[0] not in DEVICES:
        raise SalcompileError(f"device={device!r}; choose one of {', '.join(DEVICES)} "
                              "(cuda:N for another GPU).")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        built = "without CUDA" if torch.version.cuda is None else \
            f"with CUDA {torch.version.cuda}, but no GPU is visible"
        raise SalcompileError(f"device={device!r}: torch {torch.__version__} was built {built}. "
                              "Use device='cpu' (or 'auto'), or install a CUDA build of torch on "
                              "a machine with a GPU.")
    return torch.device(device)


def autocast(device: torch.device, precision: str):
    """torch.autocast for `precision` ('bf16', 'fp16') on `device`'s type; a no-op context for
    fp32."""
    import contextlib
    if precision not in PRECISIONS:
        raise SalcompileError(f"precision={precision!r}; choose one of {', '.join(PRECISIONS)}.")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if not torch.amp.is_autocast_available(device.type):
        raise SalcompileError(f"precision={precision!r} needs torch.autocast, which torch "
                              f"{torch.__version__} does not offer on {device.type}; train on "
                              "cpu or cuda, or use precision='fp32'.")
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, precision: str, scaler=None):
    """The torch.amp.GradScaler that `precision` trains with on `device` (None: no loss scaling).
    fp16 gets `scaler` or a new torch.amp.GradScaler(device.type) with torch's defaults (initial
    scale 2**16, halved at an overflow, doubled after 2000 clean steps)."""
    if precision not in SCALED:
        if scaler is not None:
            raise SalcompileError(f"grad_scaler is for precision='fp16' (loss scaling keeps small "
                                  f"float16 gradients from flushing to zero); precision="
                                  f"{precision!r} trains without one.")
        return None
    if scaler is not None:
        if not isinstance(scaler, torch.amp.GradScaler):
            raise SalcompileError(f"grad_scaler must be a torch.amp.GradScaler, got "
                                  f"{type(scaler).__name__}.")
        return scaler
    if device.type not in ("cpu", "cuda"):
        raise SalcompileError(f"precision={precision!r} needs loss scaling (torch.amp.GradScaler), "
                              f"which salcompile supports on cpu and cuda, not {device.type}; use "
                              "precision='bf16' (no scaling needed) or 'fp32'.")
    return torch.amp.GradScaler(device.type)


def _scaled_step(loss, opt, scaler) -> bool:
    """loss.backward() and opt.step() through `scaler`; False when the step was skipped (a
    non-finite gradient: the weights and optimizer state are untouched, the scale is halved)."""
    before = scaler.get_scale()
    try:
        scaler.scale(loss).backward()
    except NonFiniteGradient as exc:   # SALConfig(check_finite=True) saw the scaled gradient
        if before <= 1.0:
            raise SalcompileError(f"{exc} (precision='fp16': the gradient scaler had backed off to "
                                  f"loss scale {before:g}, so the gradient is not an overflow of "
                                  "the scaling)") from exc
        opt.zero_grad(set_to_none=True)
        scaler.update(before * scaler.get_backoff_factor())
        return False
    scaler.step(opt)      # skips opt.step() when the unscaled gradients hold inf/NaN
    scaler.update()       # ...and then lowers the scale
    return scaler.get_scale() >= before


def task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: per sample for [batch, classes] outputs, per token for a language
    model's [batch, seq, vocab] logits against [batch, seq] targets."""
    if out.dim() == y.dim() + 1 and y.dim() > 1:
        return F.cross_entropy(out.flatten(0, -2).float(), y.flatten().long())
    return F.cross_entropy(out.float(), y.long())


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


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024, *,
             device=None, precision: str = "fp32") -> float:
    """Accuracy in % (of tokens for a language model), in eval mode (the model's mode is
    restored; routing counts untouched). Batches are moved to `device` (default: stay put)."""
    was = model.training
    model.eval()
    correct = 0
    dev = resolve_device(device) if device is not None else None
    with torch.no_grad(), routing_counts_kept(model):
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            if dev is not None:
                xb, yb = xb.to(dev), yb.to(dev)
            with autocast(dev or xb.device, precision):
                out = model(xb)
            correct += int((out.argmax(-1) == yb).sum())
    model.train(was)
    return 100.0 * correct / max(1, y.numel())


def nonfinite_count(model: nn.Module) -> int:
    return sum(int((~torch.isfinite(p)).sum()) for p in model.parameters()
               if p.is_floating_point())


def _alignment(model, x, y) -> Optional[float]:
    from .metrics import gradient_alignment
    from .module import SALModule
    if not isinstance(getattr(model, "_orig_mod", model), SALModule):
        return None
    angles = [a for a in gradient_alignment(model, lambda o: task_loss(o, y), x).values()
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
    if len(x) != len(y) or (y.dim() > 1 and tuple(y.shape) != tuple(x.shape[:y.dim()])):
        raise SalcompileError(f"{name} set: inputs {tuple(x.shape)} but labels {tuple(y.shape)}; "
                              "give one class id per sample ([N]), or a language model's "
                              "next-token targets shaped like its token ids ([N, seq]).")
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
        on_epoch: Optional[Callable[[EpochRecord], None]] = None, device=None,
        precision: str = "fp32", grad_scaler=None) -> List[EpochRecord]:
    """Train `model` on `train` = (x, y), evaluate on `test` each epoch; returns the records.

    y: class ids [N] (cross-entropy per sample), or next-token targets [N, seq] for a language
    model returning [N, seq, vocab] (cross-entropy per token; accuracies count tokens).
    alignment: measure angle(SAL update, BP gradient) on 256 training samples each epoch.
    progress: a tqdm bar over the batches (on stderr).
    device: "cpu", "cuda", "auto" (cuda if available) or None (where the model is); the model is
    moved there, the data batch by batch. precision: "fp32", "bf16" or "fp16" (torch.autocast
    around the forward and the loss; parameters, gradients and optimizer state stay float32;
    fp16 adds loss scaling, see the module docstring for skipped steps and check_finite).
    grad_scaler: fp16 only, your own torch.amp.GradScaler (default: one with torch's settings).
    """
    from .routing import reset_routing_stats, routing_stats
    (xtr, ytr), (xte, yte) = train, test
    _check_split("train", xtr, ytr)
    _check_split("test", xte, yte)
    autocast(torch.device("cpu"), precision)   # validates precision before any work
    if device is not None:
        dev = resolve_device(device)
        model.to(dev)
    else:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    autocast(dev, precision)
    scaler = make_grad_scaler(dev, precision, grad_scaler)
    if scaler is not None and dev.type == "cpu":
        warnings.warn(FP16_ON_CPU, UserWarning, stacklevel=2)
    _check_labels_fit(model, xtr.to(dev), torch.cat([ytr.long().flatten(), yte.long().flatten()]))
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
            total_loss, correct, skipped = 0.0, 0, 0
            for i in range(0, len(xtr), recipe.batch):
                idx = order[i:i + recipe.batch]
                xb, yb = xtr[idx].to(dev), ytr[idx].to(dev)
                opt.zero_grad(set_to_none=True)
                with autocast(dev, precision):
                    out = model(xb)
                    loss = task_loss(out, yb)
                if scaler is None:
                    loss.backward()
                    opt.step()
                elif not _scaled_step(loss, opt, scaler):
                    skipped += 1
                total_loss += float(loss.detach()) * len(idx)
                correct += int((out.detach().argmax(-1) == yb).sum())
                if bar is not None:
                    bar.update(1)
            stats = routing_stats(model)
            first = next(iter(stats.values()), None)
            rec = EpochRecord(
                epoch=epoch + 1, train_loss=total_loss / len(xtr),
                train_acc=100.0 * correct / ytr.numel(),
                test_acc=accuracy(model, xte, yte, device=dev, precision=precision),
                seconds=time.perf_counter() - t0,
                routing_balance=None if first is None else round(first["balance"], 4),
                active_areas=None if first is None else first["active"],
                alignment=_alignment(model, xtr[:256].to(dev), ytr[:256].to(dev))
                if alignment else None,
                nonfinite=nonfinite_count(model),
                extra={} if scaler is None else {"skipped_steps": skipped,
                                                 "loss_scale": float(scaler.get_scale())})
            records.append(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec.train_loss:.3f}", test=f"{rec.test_acc:.1f}%")
            if on_epoch is not None:
                on_epoch(rec)
    finally:
        if bar is not None:
            bar.close()
    return records
