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
    """Inputs summed into one output, for each layer kind's weight layout (salcompile/families.py;
    a kind without an entry: all but the first dimension, a neutral guess)."""
    from .families import FAMILIES
    if kind in FAMILIES:
        return FAMILIES[kind].fan_in(tuple(shape), weight_first)
    return int(math.prod(shape)) // max(1, int(shape[0]))
