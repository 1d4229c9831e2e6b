"""A plain classification training loop: what examples and benchmarks share."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SalcompileError

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in %, in eval mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(was)
    return 100 * acc


def fit(model: nn.Module, train, test, *, optimizer: str = "adam", lr: float = 1e-3,
        epochs: int = 25, batch: int = 16, seed: int = 0,
        on_epoch: Optional[Callable[[int, float], None]] = None) -> List[float]:
    """Cross-entropy training with shuffled mini-batches; returns the test accuracy per epoch."""
    if optimizer not in OPTIMIZERS:
        raise SalcompileError(f"optimizer={optimizer!r}; choose one of {sorted(OPTIMIZERS)}.")
    (xtr, ytr), (xte, yte) = train, test
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        history.append(accuracy(model, xte, yte))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    return history
