"""Routing statistics of a transformed model's gates: is the router balanced or collapsed?"""
from __future__ import annotations

import math
from typing import Dict

import torch

from .module import require_sal


def routing_stats(module) -> Dict[str, dict]:
    """{gate: stats} over the rows routed since the last reset (training and evaluation alike).

    counts/fractions: rows per area; active: areas that received a row; balance: normalised
    entropy of the fractions (1.0 = perfectly even, 0.0 = everything in one area); max_load: the
    busiest area's share over the even share 1/K (1.0 = even, K = collapsed); layers: the gated
    layers the gate routes.
    """
    sal = require_sal(module)
    out = {}
    for region in sal.sal_plan.regions:
        counts = sal.get_buffer(f"sal_gates.{region['gate']}.counts").detach().double().cpu()
        k = counts.numel()
        total = float(counts.sum())
        frac = counts / total if total else torch.zeros_like(counts)
        nz = frac[frac > 0]
        entropy = float(-(nz * nz.log()).sum()) if total else 0.0
        out[region["gate"]] = {
            "rows": int(total),
            "counts": [int(c) for c in counts.tolist()],
            "fractions": [round(float(f), 6) for f in frac.tolist()],
            "active": int((counts > 0).sum()),
            "balance": entropy / math.log(k) if k > 1 and total else 1.0,
            "max_load": float(frac.max()) * k if total else 0.0,
            "layers": list(region["layers"]),
        }
    return out


def reset_routing_stats(module) -> None:
    """Zero every gate's counts (e.g. at the start of an epoch or before an evaluation)."""
    sal = require_sal(module)
    for region in sal.sal_plan.regions:
        sal.get_buffer(f"sal_gates.{region['gate']}.counts").zero_()
