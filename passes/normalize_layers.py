"""Bring torch-level layer calls (what symbolic_trace records) to the aten form torch.export gives.

nn.Linear / nn.ConvNd / nn.ConvTransposeNd modules, F.linear, F.convNd, torch.matmul, `@`, mm,
bmm and einsum all become the aten op, with the module's parameters read by get_attr, so the
layer finder deals with one form only. A graph from torch.export passes through unchanged.
"""
from __future__ import annotations

from typing import Optional

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from .context import PassContext

aten = torch.ops.aten

_SIGNATURES = {
    "linear": ("input", "weight", "bias"),
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
                       "dilation"),
    "matmul": ("input", "other"),
}
_FUNCTIONS = {
    F.linear: ("linear", aten.linear.default), torch._C._nn.linear: ("linear", aten.linear.default),
    torch.conv1d: ("conv", 1), torch.conv2d: ("conv", 2), torch.conv3d: ("conv", 3),
    F.conv1d: ("conv", 1), F.conv2d: ("conv", 2), F.conv3d: ("conv", 3),
    torch.conv_transpose1d: ("conv_transpose", aten.conv_transpose1d.default),
    torch.conv_transpose2d: ("conv_transpose", aten.conv_transpose2d.input),
    torch.conv_transpose3d: ("conv_transpose", aten.conv_transpose3d.input),
    torch.matmul: ("matmul", aten.matmul.default), operator.matmul: ("matmul", aten.matmul.default),
    torch.mm: ("matmul", aten.mm.default), torch.bmm: ("matmul", aten.bmm.default),
}
_METHODS = {"matmul": aten.matmul.default, "__matmul__": aten.matmul.default,
            "mm": aten.mm.default, "bmm": aten.bmm.default}
_CONV_DEFAULT = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
_CONV_PADDING = {1: aten.conv1d.padding, 2: aten.conv2d.padding, 3: aten.conv3d.padding}


def _positional(names, args, kwargs):
    bound = dict(zip(names, args))
    bound.update(kwargs)
    out = []
    for n in names:
        if n not in bound:
            break
        out.append(bound[n])
    return out


def normalize_layers(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    g = gm.graph
    for node in list(g.nodes):
        new = None
        with g.inserting_before(node):
            if node.op == "call_module":
                new = _from_module(gm, g, node)
            elif node.op == "call_function" and node.target in _FUNCTIONS:
                kind, target = _FUNCTIONS[node.target]
                args = _positional(_SIGNATURES[kind], node.args, node.kwargs)
                if kind == "conv":
                    padding = args[4] if len(args) > 4 else 0
                    target = (_CONV_PADDING if isinstance(padding, str) else _CONV_DEFAULT)[target]
                new = g.call_function(target, tuple(args))
            elif node.op == "call_function" and node.target is torch.einsum:
                operands = node.args[1:]
                if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
                    operands = operands[0]
                new = g.call_function(aten.einsum.default, (node.args[0], list(operands)))
            elif node.op == "call_method" and node.target in _METHODS and not node.kwargs:
                new = g.call_function(_METHODS[node.target], tuple(node.args))
        if new is not None:
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
    g.lint()
    gm.recompile()
    return gm


def _from_module(gm, g, node):
    mod = gm.get_submodule(node.target)
    if type(mod) not in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                         nn.ConvTranspose2d, nn.ConvTranspose3d) or len(node.args) != 1 or node.kwargs:
        return None
    x = node.args[0]
    w = g.get_attr(f"{node.target}.weight")
    b = g.get_attr(f"{node.target}.bias") if mod.bias is not None else None
    if isinstance(mod, nn.Linear):
        return g.call_function(aten.linear.default, (x, w, b))
    nd = len(mod.kernel_size)
    transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
    padding = mod.padding
    if not transposed and mod.padding_mode != "zeros":
        x = g.call_function(F.pad, (x, list(mod._reversed_padding_repeated_twice)),
                            {"mode": mod.padding_mode})
        padding = [0] * nd
    if isinstance(padding, str):
        return g.call_function(_CONV_PADDING[nd], (x, w, b, list(mod.stride), padding,
                                                   list(mod.dilation), mod.groups))
    out_pad = list(mod.output_padding) if transposed else [0] * nd
    return g.call_function(aten.convolution.default,
                           (x, w, b, list(mod.stride), list(padding), list(mod.dilation),
                            transposed, out_pad, mod.groups))
