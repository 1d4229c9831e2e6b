"""Data-parallel training of a transformed model (DistributedDataParallel, one process per device).

What is batch-global in a transformed model, and how it is kept global (docs/distributed.md):
- layer weights, biases, FA/DFA feedback updates: per-row sums, averaged by DDP as usual;
- the region gates' local rule (per-area fractions f_k, the mean's row count): the gate's backward
  sums its per-area counts over the process group itself (salcompile/ops/gate.py), whenever
  torch.distributed is initialised; `sync_gates` picks the group or turns it off;
- the routing counters (`sal_gates.<gate>.counts`, non-persistent buffers written in forward): per
  process. `routing_stats` here sums them over the group; `data_parallel` (or
  `ignore_routing_counts`) keeps DDP's buffer broadcast from overwriting them.

    dist.init_process_group("nccl")
    sal = salcompile.transform(model, example_inputs=(x,))        # same seeds on every rank
    ddp = salcompile.distributed.data_parallel(sal, device_ids=[rank])
    ...train...
    stats = salcompile.distributed.routing_stats(ddp)             # every rank calls it

Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) for a model whose
parameters (and feedback matrices) do not fit on one device: `fully_shard`, implemented in
salcompile/fsdp.py and exported here.

    sal = salcompile.transform(model, example_inputs=(x,), areas=4, area_mode="replicate")
    sal = salcompile.distributed.fully_shard(sal)                 # every rank, same seeds
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import SalcompileError
from .ops import gate as _gate
from .routing import reset_routing_stats as _reset_local
from .routing import routing_counts_kept, unwrap
from .routing import routing_stats as _local_stats

__all__ = ["sync_gates", "data_parallel", "ignore_routing_counts", "routing_stats",
           "reset_routing_stats", "unwrap", "fully_shard", "shard_units", "ShardUnit"]


def sync_gates(enabled: bool = True, group: Optional["dist.ProcessGroup"] = None) -> None:
    """Which process group the gates' local rule takes its batch statistics over.

    Default: on, over the default (WORLD) group, which is what DistributedDataParallel averages
    over. Pass the group you gave DDP's `process_group=`, or `enabled=False` when the processes
    train independent models (each gate then uses its own batch only, as with one process)."""
    _gate._SYNC.update(enabled=bool(enabled), group=group)


def _count_names(module: nn.Module) -> List[str]:
    return [n for n, _ in module.named_buffers()
            if n.split(".")[0] == "sal_gates" and n.endswith(".counts")]


def ignore_routing_counts(module: nn.Module) -> nn.Module:
    """Exclude the routing counters from DDP's buffer syncs (call before wrapping): with
    `forward_sync_buffers=True` (`broadcast_buffers=True` before torch 2.13, the default) DDP would
    otherwise copy rank 0's counters over every other rank's at each forward. Returns `module`."""
    target = unwrap(module)
    names = _count_names(target)
    prefix = "" if target is module else _prefix(module, target)
    ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, sorted(ignored | {prefix + n for n in names}))
    return module


def _prefix(outer: nn.Module, inner: nn.Module) -> str:
    for name, sub in outer.named_modules():
        if sub is inner:
            return name + "." if name else ""
    return ""


def data_parallel(module: nn.Module, forward_sync_buffers: bool = False,
                  **ddp_kwargs) -> DistributedDataParallel:
    """`DistributedDataParallel(module, **ddp_kwargs)` for a transformed (or compiled) module: the
    routing counters stay per process (excluded from DDP's buffer syncs, so
    `forward_sync_buffers=True` is safe too, e.g. for batch norm's running statistics) and the
    gates are synchronised over DDP's `process_group`.

    `forward_sync_buffers=False` (default): buffers are broadcast from rank 0 once, when DDP is
    built, not at every forward; the feedback matrices and prototypes never change, so
    re-broadcasting them (as large as the weights) would only cost time. torch < 2.13 has no
    `forward_sync_buffers`; there it is passed as `broadcast_buffers`."""
    if not isinstance(module, nn.Module):
        raise SalcompileError(f"data_parallel needs the module salcompile.transform returned, got "
                              f"{type(module).__name__}.")
    if ddp_kwargs.get("process_group") is None and not (dist.is_available()
                                                        and dist.is_initialized()):
        raise SalcompileError(
            "data_parallel needs a torch.distributed process group, and none is initialised; "
            "call torch.distributed.init_process_group(...) in every process first (torchrun "
            "sets it up), or train the module directly in a single process.")
    sync_gates(True, ddp_kwargs.get("process_group"))
    ignore_routing_counts(module)
    if "broadcast_buffers" not in ddp_kwargs and "forward_sync_buffers" not in ddp_kwargs:
        key = "forward_sync_buffers" if _HAS_FORWARD_SYNC else "broadcast_buffers"
        ddp_kwargs[key] = forward_sync_buffers
    return DistributedDataParallel(module, **ddp_kwargs)


_HAS_FORWARD_SYNC = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters


def routing_stats(module: nn.Module, group: Optional["dist.ProcessGroup"] = None
                  ) -> Dict[str, dict]:
    """salcompile.routing_stats over the rows every process of `group` (default: the gates' group,
    see `sync_gates`) routed: the counters are summed with one all_reduce, so every rank of the
    group must call it. Without a process group it is salcompile.routing_stats. Accepts a
    transformed, compiled or DDP-wrapped module; the local counters are left as they were."""
    target = unwrap(module)
    group = group if group is not None else _gate.sync_group()
    if group is None:
        return _local_stats(target)
    bufs = [b for n, b in target.named_buffers() if n in set(_count_names(target))]
    if not bufs:
        return {}
    total = torch.cat([b.detach().reshape(-1) for b in bufs])
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    with torch.no_grad(), routing_counts_kept(target):
        for b, t in zip(bufs, total.split([b.numel() for b in bufs])):
            b.copy_(t.view_as(b))
        return _local_stats(target)


def reset_routing_stats(module: nn.Module) -> None:
    """Zero this process's routing counters (on a transformed, compiled or DDP-wrapped module)."""
    _reset_local(unwrap(module))


from .fsdp import ShardUnit, fully_shard, shard_units  # noqa: E402  (fsdp uses sync_gates above)
