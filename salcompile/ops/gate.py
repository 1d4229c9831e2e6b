"""The region gate ("learned-frozen decoupled routing", DESIGN §1) and its routing counter.

    z = normalize(features · Pᵀ),   area = argmax_k ⟨z, c_k⟩

`P` (route_dim × features) learns; the prototypes `c_k` (K × route_dim, unit rows) are fixed. The
gate's forward returns the areas and an `anchor`, a 0-dim zero that every area op of the region
reads and hands a zero gradient back through. That is what makes autograd run the gate's backward,
which ignores the incoming gradient and returns dL_local/dP for the gate's own local rule:

    L_local = mean_t CE(softmax(⟨z_t, c⟩/τ), winner_t) + α·K·Σ_k f_k·p̄_k

(f_k: fraction of rows routed to k, a constant; p̄_k: mean probability of k). No error of the
network loss reaches P, and no gradient flows from the gate into the activations it reads.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_TINY = 1e-12


def route(features: Tensor, proj: Tensor, prototypes: Tensor) -> Tensor:
    z = F.normalize(features.to(proj.dtype).matmul(proj.t()), dim=-1, eps=_TINY)
    return z.matmul(prototypes.t()).argmax(-1)


@torch.library.custom_op("salcompile::region_gate", mutates_args=())
def region_gate(features: Tensor, proj: Tensor, prototypes: Tensor, temperature: float,
                balance_weight: float) -> Tuple[Tensor, Tensor]:
    """features [..., F] → (area int64 [...], one per row; anchor, a 0-dim zero)."""
    return route(features, proj, prototypes), proj.new_zeros(())


@region_gate.register_fake
def _(features, proj, prototypes, temperature, balance_weight):
    return features.new_empty(features.shape[:-1], dtype=torch.long), proj.new_empty(())


def local_rule_grad(features: Tensor, proj: Tensor, prototypes: Tensor, area: Tensor,
                    temperature: float, balance_weight: float) -> Tensor:
    """dL_local/dP, written out (no autograd inside a backward, so it compiles)."""
    u = features.matmul(proj.t())
    n = u.norm(dim=-1, keepdim=True).clamp_min(_TINY)
    z = u / n
    k = prototypes.shape[0]
    p = torch.softmax(z.matmul(prototypes.t()) / temperature, dim=-1)
    y = F.one_hot(area, k).to(p.dtype)
    rows = max(1, features.shape[0])
    frac = y.mean(0) if features.shape[0] else y.sum(0)
    # d/ds of CE (p - y) and of the balance term α·K·Σ_k f_k p_k (softmax Jacobian applied to f).
    gs = (p - y + balance_weight * k * p * (frac - (p * frac).sum(-1, keepdim=True))) / rows
    gz = gs.matmul(prototypes) / temperature
    gu = (gz - z * (z * gz).sum(-1, keepdim=True)) / n
    return gu.t().matmul(features)


def _gate_setup(ctx, inputs, output):
    features, proj, prototypes, temperature, balance_weight = inputs
    ctx.save_for_backward(features, proj, prototypes, output[0])
    ctx.temperature, ctx.balance_weight = temperature, balance_weight


def _gate_backward(ctx, grad_area, grad_anchor):
    features, proj, prototypes, area = ctx.saved_tensors
    gp = None
    if ctx.needs_input_grad[1]:
        rows = features.reshape(-1, features.shape[-1]).to(proj.dtype)
        gp = local_rule_grad(rows, proj, prototypes.to(proj.dtype), area.reshape(-1),
                             ctx.temperature, ctx.balance_weight)
    return None, gp, None, None, None


region_gate.register_autograd(_gate_backward, setup_context=_gate_setup)


@torch.library.custom_op("salcompile::count_routes", mutates_args=("counts",))
def count_routes(area: Tensor, counts: Tensor) -> None:
    """counts[k] += number of rows routed to k (read by salcompile.routing_stats)."""
    counts.add_(torch.bincount(area.reshape(-1), minlength=counts.shape[0]).to(counts.dtype))


@count_routes.register_fake
def _(area, counts):
    return None
