"""Glue for the trainers people already use (docs/integrations.md).

- `salcompile.integrations.hf`: Hugging Face `transformers.Trainer` (`SALTrainer`: checkpoints of
  tied-weight models; routing statistics in the logs);
- `salcompile.integrations.lightning`: PyTorch Lightning (`log_routing_stats`, `SALLightningModule`);
- torchrun / DDP: `salcompile.distributed` (docs/distributed.md).

Each submodule imports its framework only when imported itself.
"""
from __future__ import annotations

from typing import Dict

from ..routing import routing_stats

__all__ = ["flat_routing_stats"]


def flat_routing_stats(module, prefix: str = "routing") -> Dict[str, float]:
    """salcompile.routing_stats as flat scalars for a logger: `{prefix}/{gate}/balance`,
    `.../active` (areas that received a row), `.../max_load`; {} for a model without gates."""
    out = {}
    for gate, s in routing_stats(module).items():
        if not s["rows"]:
            continue
        for key in ("balance", "active", "max_load"):
            out[f"{prefix}/{gate}/{key}"] = float(s[key])
    return out
