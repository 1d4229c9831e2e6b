"""Layer families: one entry per kind of weight-carrying op, everything the passes need to know.

A LayerSpec's `kind` (salcompile/layers.py `recognise` finds the op, its activation `x`, its
weight operand and bias) names its family here. A family says:
  * `fa_op`, `fa_args(spec, feedback, match_norm)`: the FA op that replaces the layer
    (passes/attach_fa.py) and its arguments;
  * `plain(args)`: for an FA op's own arguments (by name), the plain op and arguments computing
    its forward (salcompile/ops/plain.py: strip_feedback, the ONNX graphs);
  * `fan_in(shape, weight_first)`: the inputs summed into one output for its weight layout
    (feedback init and the sign rules' scale);
  * `area_op`: the area op a gated layer of this family becomes ("area_linear", "area_conv"), or
    None when the family has no area form (passes/make_area_ops.py).

Adding a family: recognise it in layers.py, give it an FA op in ops/fa.py, and add one entry
below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

aten = torch.ops.aten


@dataclass(frozen=True)
class Family:
    kind: str
    fa_op: str                                    # name under torch.ops.salcompile
    fa_args: Callable[[Any, Any, bool], tuple]    # (spec, feedback operand, match_norm)
    plain: Optional[Callable[[Dict[str, Any]], Tuple[Callable, tuple]]]
    fan_in: Callable[[tuple, bool], int]
    area_op: Optional[str] = None

    @property
    def op(self):
        return getattr(torch.ops.salcompile, self.fa_op).default


def conv(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """aten.convolution, also for an unbatched input (which aten.convolution refuses)."""
    if x.dim() == len(stride) + 1:
        return aten.convolution(x.unsqueeze(0), weight, bias, stride, padding, dilation,
                                transposed, output_padding, groups).squeeze(0)
    return aten.convolution(x, weight, bias, stride, padding, dilation, transposed,
                            output_padding, groups)


def _dense_fan_in(shape, weight_first=False) -> int:   # [out, in, *kernel]
    return int(shape[1] * math.prod(shape[2:])) if len(shape) > 1 else int(shape[0])


def _ordered(a):   # weight_first: W @ x, else x @ W
    return (a["weight"], a["x"]) if a["weight_first"] else (a["x"], a["weight"])


FAMILIES: Dict[str, Family] = {f.kind: f for f in (
    Family("linear", "fa_linear",
           fa_args=lambda s, b, m: (s.x, s.weight, s.bias, b, m),
           plain=lambda a: (aten.linear.default, (a["x"], a["weight"], a["bias"])),
           fan_in=_dense_fan_in, area_op="area_linear"),
    Family("conv", "fa_conv",
           fa_args=lambda s, b, m: (s.x, s.weight, s.bias, b, s.conv["stride"], s.conv["padding"],
                                    s.conv["dilation"], s.conv["transposed"],
                                    s.conv["output_padding"], s.conv["groups"], m),
           plain=lambda a: (conv, (a["x"], a["weight"], a["bias"], a["stride"], a["padding"],
                                   a["dilation"], a["transposed"], a["output_padding"],
                                   a["groups"])),
           fan_in=_dense_fan_in, area_op="area_conv"),
    Family("matmul", "fa_matmul",
           fa_args=lambda s, b, m: (s.x, s.weight, b, s.weight_first, m),
           plain=lambda a: (aten.matmul.default, _ordered(a)),
           fan_in=lambda shape, wf=False: int(shape[-1] if wf else shape[-2])),
    Family("einsum", "fa_einsum",
           fa_args=lambda s, b, m: (s.equation, s.x, s.weight, b, s.weight_first, m),
           plain=lambda a: (aten.einsum.default, (a["equation"], list(_ordered(a)))),
           # a neutral guess: all but the first dimension
           fan_in=lambda shape, wf=False: int(math.prod(shape)) // max(1, int(shape[0]))),
    # no plain form: it differs per consumer (strip_feedback keeps the op with B = W, whose own
    # backward is backprop's; ONNX has no grouped matmul and gets a masked-dense form)
    Family("grouped_mm", "fa_grouped_mm",
           fa_args=lambda s, b, m: (s.x, s.weight, s.offs, b, m),
           plain=None,
           fan_in=lambda shape, wf=False: int(shape[-2])),   # [experts, in, out]
)}


def family(kind: str) -> Family:
    return FAMILIES[kind]


def by_fa_op(target) -> Optional[Family]:
    """The family whose FA op is `target` (an OpOverload), or None."""
    for f in FAMILIES.values():
        if f.op is target:
            return f
    return None


__all__ = ["Family", "FAMILIES", "family", "by_fa_op", "conv"]
