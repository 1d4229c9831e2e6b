"""PyTorch Lightning with a transformed model (docs/integrations.md).

A transformed module is an ordinary nn.Module: hold it as a LightningModule's attribute and
train it in `training_step` as any model. Two helpers:
- `log_routing_stats(lm, sal)`: `salcompile.routing_stats` as scalars through `lm.log_dict`
  (`routing/<gate>/balance`, `active`, `max_load`), over the rows routed since the last call (the
  counters are then reset);
- `SALLightningModule(sal, loss_fn=None, lr=1e-3)`: a ready LightningModule: batches that are
  dicts go in as keyword inputs and the model's own `loss` is used (`labels=` in the batch); `(x,
  y)` batches use `loss_fn(sal(x), y)` (default cross-entropy). Adam; routing statistics logged
  every `log_routing_every` steps.

Lightning's checkpoints hold the LightningModule's state_dict (torch.save: tied weights and the
feedback buffers included); `SALLightningModule.load_from_checkpoint` needs the transformed
module again (`SALLightningModule.load_from_checkpoint(path, sal=salcompile.transform(...))`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

from ..routing import reset_routing_stats
from . import flat_routing_stats

__all__ = ["log_routing_stats", "SALLightningModule"]


def log_routing_stats(lm: "pl.LightningModule", sal, prefix: str = "routing", reset: bool = True,
                      **log_kwargs) -> dict:
    """Log the routing statistics of `sal` through `lm.log_dict` (from a LightningModule's hook
    or step); returns what was logged. `reset`: zero the counters after logging."""
    stats = flat_routing_stats(sal, prefix)
    if stats:
        lm.log_dict(stats, **{"on_step": True, "on_epoch": False, **log_kwargs})
    if reset:
        reset_routing_stats(sal)
    return stats


def _loss(out):
    if isinstance(out, dict) or hasattr(out, "keys"):
        if "loss" in out and out["loss"] is not None:
            return out["loss"]
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: pass labels in the batch (a dict), or give "
                         "(x, y) batches and a loss_fn.")
    return loss


class SALLightningModule(pl.LightningModule):
    """A LightningModule around a module returned by salcompile.transform (module docstring)."""

    def __init__(self, sal: torch.nn.Module, loss_fn: Optional[Callable] = None, lr: float = 1e-3,
                 log_routing_every: int = 1):
        super().__init__()
        self.model = sal
        self.loss_fn = loss_fn or F.cross_entropy
        self.lr = lr
        self.log_routing_every = max(1, int(log_routing_every))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def _step_loss(self, batch):
        if isinstance(batch, dict):
            return _loss(self.model(**batch))
        x, y = batch
        out = self.model(x)
        logits = getattr(out, "logits", out)
        return self.loss_fn(logits, y)

    def training_step(self, batch, batch_idx):
        loss = self._step_loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        if (batch_idx + 1) % self.log_routing_every == 0:
            log_routing_stats(self, self.model)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._step_loss(batch)
        self.log("val_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)
