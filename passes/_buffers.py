"""Registering feedback buffers beside the parameter they serve."""
from __future__ import annotations

import torch
import torch.fx as fx


def register_beside(gm: fx.GraphModule, param: str, suffix: str, value: torch.Tensor,
                    parameter: bool = False) -> str:
    """Register `value` as a buffer (or, with `parameter`, a trainable parameter) on the module
    owning `param`; return its qualified name."""
    owner_path, _, leaf = param.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    name = f"{leaf}_{suffix}"
    i = 1
    while hasattr(owner, name):
        i += 1
        name = f"{leaf}_{suffix}{i}"
    if parameter:
        owner.register_parameter(name, torch.nn.Parameter(value))
    else:
        owner.register_buffer(name, value)
    return f"{owner_path}.{name}" if owner_path else name
