"""Routing statistics of a transformed model's gates: is the router balanced or collapsed?"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator

import torch
from torch import nn

from .errors import SalcompileError
from .module import SALModule

_PREFIX, _SUFFIX = "sal_gates.", ".counts"


def unwrap(module):
    """Strip torch.compile (`_orig_mod`) and DistributedDataParallel (`module`) wrappers."""
    from torch.nn.parallel import DistributedDataParallel
    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module, nn.Module):
            module = module._orig_mod
        else:
            return module


def _counters(module: nn.Module) -> Dict[str, torch.Tensor]:
    """{gate: its counts buffer} of a transformed module, a compiled, DDP-wrapped or reloaded one."""
    target = unwrap(module)
    if not isinstance(target, nn.Module):
        raise SalcompileError(f"expected a module returned by salcompile.transform() or "
                              f"salcompile.load(), got {type(module).__name__}.")
    return {n[len(_PREFIX):-len(_SUFFIX)]: b for n, b in target.named_buffers()
            if n.startswith(_PREFIX) and n.endswith(_SUFFIX)}


def routing_stats(module) -> Dict[str, dict]:
    """{gate: stats} over the rows routed since the last reset (training and evaluation alike);
    {} for a model without gates. Works on transformed, compiled and reloaded (salcompile.load)
    modules.

    counts/fractions: rows per area; active: areas that received a row; balance: normalised
    entropy of the fractions (1.0 = perfectly even, 0.0 = everything in one area); max_load: the
    busiest area's share over the even share 1/K (1.0 = even, K = collapsed); layers: the gated
    layers the gate routes.
    """
    target = unwrap(module)
    layers = {r["gate"]: list(r["layers"]) for r in target.sal_plan.regions} \
        if isinstance(target, SALModule) else {}
    out = {}
    for gate, buf in _counters(module).items():
        counts = buf.detach().double().cpu()
        k = counts.numel()
        total = float(counts.sum())
        frac = counts / total if total else torch.zeros_like(counts)
        nz = frac[frac > 0]
        entropy = float(-(nz * nz.log()).sum()) if total else 0.0
        out[gate] = {
            "rows": int(total),
            "counts": [int(c) for c in counts.tolist()],
            "fractions": [round(float(f), 6) for f in frac.tolist()],
            "active": int((counts > 0).sum()),
            "balance": entropy / math.log(k) if k > 1 and total else 1.0,
            "max_load": float(frac.max()) * k if total else 0.0,
            "layers": layers.get(gate, []),
        }
    return out


def reset_routing_stats(module) -> None:
    """Zero every gate's counts (e.g. at the start of an epoch or before an evaluation)."""
    for buf in _counters(module).values():
        buf.zero_()


@contextlib.contextmanager
def routing_counts_kept(module, zero: bool = False) -> Iterator[None]:
    """Leave the gates' routing counts as they were once the block ends (measurements, trial
    runs); with zero=True they read 0 inside the block (e.g. while writing an archive)."""
    saved = {n: b.clone() for n, b in _counters(module).items()}
    if zero:
        for b in _counters(module).values():
            b.zero_()
    try:
        yield
    finally:
        counters = _counters(module)
        for n, value in saved.items():
            counters[n].copy_(value)
