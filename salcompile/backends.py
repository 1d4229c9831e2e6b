"""Backends: torch.compile (fullgraph, zero graph breaks)."""
from __future__ import annotations

from typing import Any

import torch

from .errors import SalcompileError
from .module import require_sal


def compile(module, **kwargs: Any):  # noqa: A001 - the public name is fixed
    """torch.compile the transformed module with fullgraph=True: a graph break is an error, not a
    silent slowdown. Extra keywords go to torch.compile (mode=, dynamic=, backend=)."""
    require_sal(module)
    if _sharded(module):
        raise SalcompileError(
            "salcompile.compile does not take a module sharded with salcompile.distributed."
            "fully_shard: dynamo cannot trace FSDP2's hooks in one graph (fullgraph=True). Train "
            "the sharded module eagerly, or call torch.compile(module) yourself (partial graphs).")
    kwargs.setdefault("fullgraph", True)
    if not kwargs["fullgraph"]:
        raise SalcompileError("salcompile.compile always uses fullgraph=True; call torch.compile "
                              "yourself for partial graphs.")
    return torch.compile(module, **kwargs)


def _sharded(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:   # a torch without FSDP2 shards nothing
        return False
    return isinstance(getattr(module, "_orig_mod", module), FSDPModule)
