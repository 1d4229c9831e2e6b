"""Fixed random feedback tensors, deterministic given the seed and the weight's name."""
from __future__ import annotations

import math
import zlib

import torch


def _generator(seed: int, key: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))
    return g


def draw_uniform(shape, fan_in: int, seed: int, key: str, like: torch.Tensor) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): nn.Linear's default init (kaiming_uniform, a=sqrt(5))."""
    if like.is_meta:
        return torch.empty(shape, dtype=like.dtype, device="meta")
    bound = 1.0 / math.sqrt(max(1, fan_in))
    t = torch.empty(shape, dtype=torch.float64).uniform_(-bound, bound, generator=_generator(seed, key))
    return t.to(dtype=like.dtype, device=like.device)


def fan_in(kind: str, shape, weight_first: bool = False) -> int:
    """Inputs summed into one output, for each layer kind's weight layout."""
    if kind in ("linear", "conv"):
        return int(shape[1] * math.prod(shape[2:])) if len(shape) > 1 else int(shape[0])
    if kind == "grouped_mm":  # [experts, in, out]
        return int(shape[-2])
    if kind == "matmul":
        return int(shape[-1] if weight_first else shape[-2])
    return int(math.prod(shape)) // max(1, int(shape[0]))  # einsum: a neutral guess
