"""The region gate ("learned-frozen decoupled routing", DESIGN §1) and its routing counter.

    z = normalize(features · Pᵀ),   area = argmax_k ⟨z, c_k⟩

`P` (route_dim × features) learns; the prototypes `c_k` (K × route_dim, unit rows) are fixed. The
gate's forward returns the areas and an `anchor`, a 0-dim zero that every area op of the region
reads and hands a zero gradient back through. That is what makes autograd run the gate's backward,
which ignores the incoming gradient and returns dL_local/dP for the gate's own local rule:

    L_local = mean_t CE(softmax(⟨z_t, c⟩/τ), winner_t) + α·K·Σ_k f_k·p̄_k

(f_k: fraction of rows routed to k, a constant; p̄_k: mean probability of k). No error of the
network loss reaches P, and no gradient flows from the gate into the activations it reads.

f_k and the mean's row count are batch-global. Under data parallelism (torch.distributed
initialised, e.g. DistributedDataParallel) the backward sums the per-area counts over the process
group (`salcompile::global_route_counts`, an opaque op: torch.compile keeps the collective out of
its graphs) and returns world/N_global · Σ_own rows, so that DDP's average over the ranks is the
gradient of one process on the concatenated batch. One process: the same numbers, bit for bit.
`salcompile.distributed.sync_gates` chooses the group or turns this off.

Top-k routing (SALConfig(route_top_k=k), our extension, not the paper's): `region_gate_topk`
returns each row's k best areas [..., k], best first; the local rule's target is the k winners'
mean one-hot, and f_k counts selections (each row k times). k=1 gives region_gate's numbers.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

_TINY = 1e-12

# What the gates' local rule sums its batch statistics over (salcompile.distributed.sync_gates):
# group None = the default (WORLD) group, the one DistributedDataParallel averages over by default.
_SYNC = {"enabled": True, "group": None}


def sync_group():
    """The process group the gates' statistics are summed over, or None (one process)."""
    if not (_SYNC["enabled"] and dist.is_available() and dist.is_initialized()):
        return None
    return _SYNC["group"] if _SYNC["group"] is not None else dist.group.WORLD


@torch.library.custom_op("salcompile::global_route_counts", mutates_args=())
def global_route_counts(counts: Tensor) -> Tensor:
    """counts [K] (this process's rows per area) → [K + 1]: the counts summed over the gates'
    process group, then the group's size (the input and 1 without a process group)."""
    group = sync_group()
    if group is None:
        return torch.cat([counts, counts.new_ones(1)])
    total = counts.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return torch.cat([total, total.new_full((1,), float(dist.get_world_size(group)))])


@global_route_counts.register_fake
def _(counts):
    return counts.new_empty(counts.shape[0] + 1)


_ROUTE_COUNTS = global_route_counts   # the op itself (tests stand in for it with fixed statistics)


def _cast(t: Tensor, dtype) -> Tensor:
    """t.to(dtype), without the call where it is that dtype already (the same tensor)."""
    return t if t.dtype == dtype else t.to(dtype)


def _row_norms(u: Tensor) -> Tensor:
    """‖u‖ per row, clamped (Tensor.norm's own kernel, without its Python wrapper)."""
    return torch.linalg.vector_norm(u, 2, -1, True).clamp_min(_TINY)


def _logits(features: Tensor, proj: Tensor, prototypes: Tensor):
    """(z, ‖u‖, ⟨z, c⟩): the routed features, their norms and the prototype logits."""
    # F.linear without a bias is matmul(x, w.t()), the transpose inside one call
    u = F.linear(_cast(features, proj.dtype), proj)
    n = _row_norms(u)
    z = u / n   # F.normalize, one op fewer
    return z, n, F.linear(z, prototypes)


def route(features: Tensor, proj: Tensor, prototypes: Tensor) -> Tensor:
    return _logits(features, proj, prototypes)[2].argmax(-1)


@torch.library.custom_op("salcompile::region_gate", mutates_args=())
def region_gate(features: Tensor, proj: Tensor, prototypes: Tensor, temperature: float,
                balance_weight: float) -> Tuple[Tensor, Tensor]:
    """features [..., F] → (area int64 [...], one per row; anchor, a 0-dim zero)."""
    return route(features, proj, prototypes), proj.new_zeros(())


@region_gate.register_fake
def _(features, proj, prototypes, temperature, balance_weight):
    return features.new_empty(features.shape[:-1], dtype=torch.long), proj.new_empty(())


def local_rule_grad(features: Tensor, proj: Tensor, prototypes: Tensor, area: Tensor,
                    temperature: float, balance_weight: float, logits=None) -> Tensor:
    """dL_local/dP, written out (no autograd inside a backward, so it compiles).

    Under a process group (see the module docstring) it is world/N_global times the sum over this
    process's rows, with f_k the whole group's fractions: the group's mean of it is dL_local/dP
    of the concatenated batch.

    One winner per row and one process (the paper's setting) take the short way to the same
    statistics (f_k = counts/N, N rows, no float64 round trip: the same float values); the rest
    is shared (one winner: the one-hot's product with the prototypes is their rows C[area]), so
    a world of one gives the one-process numbers bit for bit.

    `logits`: (z, ‖u‖, ⟨z, c⟩) of these rows as the forward computed them (_logits; the eager
    fast path keeps them), instead of computing them again: the same values."""
    z, n, s = _logits(features, proj, prototypes) if logits is None else logits
    k = prototypes.shape[0]
    p = torch.softmax(s.div(temperature), dim=-1)
    topk = area.dim() == 2   # [N, choices] under top-k routing
    if not topk and global_route_counts is _ROUTE_COUNTS and sync_group() is None:
        rows = area.shape[0]
        # v = α·K·f_k, f_k = counts / N
        v = area_counts(area, k).to(p.dtype).div_(max(rows, 1)).mul_(balance_weight * k)
    else:
        hot = F.one_hot(area, k).to(p.dtype)   # [N, K], or [N, choices, K]
        choices = hot.shape[1] if topk else 1
        counts = hot.sum((0, 1) if topk else 0, dtype=torch.float64)   # selections
        stats = global_route_counts(counts)  # [counts over the group, world]
        total = stats[:-1].sum().clamp_min(1)
        v = (stats[:-1] / total).to(p.dtype).mul_(balance_weight * k)
        rows = total / stats[-1] / choices   # N_global / world (= N for one process)
    # d/ds of CE (p - y) and of the balance term α·K·Σ_k f_k p_k (the softmax Jacobian applied
    # to v = α·K·f): p·(1 + v - ⟨p, v⟩) - y, in as few ops as it takes (the step is op-bound at
    # the paper's size)
    gs = torch.addcmul(p, p, v - p.matmul(v).unsqueeze(-1))
    if topk:
        gs.sub_(hot.sum(1) / choices)   # y: the k winners' mean one-hot
        gz = gs.mm(prototypes)
    else:   # (gs - onehot)·C = gs·C - C[area]: two ops where the one-hot took four
        gz = torch.addmm(prototypes.index_select(0, area), gs, prototypes, beta=-1)
    gz = gz.div_(rows * temperature)
    # the normalisation's Jacobian: (gz - z⟨z, gz⟩) / ‖u‖
    gu = gz.sub_(z * (z * gz).sum(-1, keepdim=True)).div_(n)
    return gu.t().mm(features)


def area_counts(area: Tensor, k: int) -> Tensor:
    """int64 [k]: rows per area of a flat area tensor, on device (CUDA's bincount syncs with the
    host to size its output, and its size depends on the data where the graph is traced;
    scatter_add_ has neither problem)."""
    if area.device.type == "cpu" and type(area) is torch.Tensor and \
            not torch._C._len_torch_dispatch_stack():
        return torch.bincount(area, minlength=k)
    return torch.zeros(k, dtype=torch.int64, device=area.device).scatter_add_(
        0, area, torch.ones_like(area))


def _gate_setup(ctx, inputs, output):
    features, proj, prototypes, temperature, balance_weight = inputs[:5]
    ctx.save_for_backward(features, proj, prototypes, output[0])
    ctx.temperature, ctx.balance_weight = temperature, balance_weight
    ctx.top_k, ctx.n_inputs = len(inputs) == 6, len(inputs)   # region_gate_topk: one more


def _gate_backward(ctx, grad_area, grad_anchor):
    features, proj, prototypes, area = ctx.saved_tensors
    gp = None
    if ctx.needs_input_grad[1]:
        rows = _cast(features if features.dim() == 2 else
                     features.reshape(-1, features.shape[-1]), proj.dtype)
        if ctx.top_k:
            area = area if area.dim() == 2 else area.reshape(-1, area.shape[-1])
        elif area.dim() != 1:
            area = area.reshape(-1)
        gp = local_rule_grad(rows, proj, _cast(prototypes, proj.dtype), area, ctx.temperature,
                             ctx.balance_weight, getattr(ctx, "sal_logits", None))
    return (None, gp) + (None,) * (ctx.n_inputs - 2)


region_gate.register_autograd(_gate_backward, setup_context=_gate_setup)


def _gate_fast_forward(ctx, features, proj, prototypes, temperature, balance_weight):
    """region_gate on the eager fast path (fast.py): route()'s numbers, and the backward reuses
    the forward's z, ‖u‖ and logits (flat rows of the proj's dtype: exactly what
    local_rule_grad would compute from the saved inputs) instead of computing them again."""
    if features.dim() != 2 or prototypes.dtype != proj.dtype:
        out = route(features, proj, prototypes), proj.new_zeros(())   # region_gate's own
    else:
        logits = _logits(features, proj, prototypes)
        out = logits[2].argmax(-1), proj.new_zeros(())
        ctx.sal_logits = logits
    _gate_setup(ctx, (features, proj, prototypes, temperature, balance_weight), out)
    return out


region_gate.sal_fast_forward = _gate_fast_forward   # read by fast._register


def route_topk(features: Tensor, proj: Tensor, prototypes: Tensor, k: int) -> Tensor:
    z = F.normalize(features.to(proj.dtype).matmul(proj.t()), dim=-1, eps=_TINY)
    return z.matmul(prototypes.t()).topk(k, dim=-1).indices


@torch.library.custom_op("salcompile::region_gate_topk", mutates_args=())
def region_gate_topk(features: Tensor, proj: Tensor, prototypes: Tensor, temperature: float,
                     balance_weight: float, k: int) -> Tuple[Tensor, Tensor]:
    """features [..., F] → (areas int64 [..., k], each row's k best, best first; anchor)."""
    return route_topk(features, proj, prototypes, k), proj.new_zeros(())


@region_gate_topk.register_fake
def _(features, proj, prototypes, temperature, balance_weight, k):
    return (features.new_empty(features.shape[:-1] + (k,), dtype=torch.long),
            proj.new_empty(()))


region_gate_topk.register_autograd(_gate_backward, setup_context=_gate_setup)


@torch.library.custom_op("salcompile::count_routes", mutates_args=("counts",))
def count_routes(area: Tensor, counts: Tensor) -> None:
    """counts[k] += number of rows routed to k (read by salcompile.routing_stats)."""
    flat = area if area.dim() == 1 else area.reshape(-1)
    counts.add_(_cast(torch.bincount(flat, minlength=counts.shape[0]), counts.dtype))


@count_routes.register_fake
def _(area, counts):
    return None
