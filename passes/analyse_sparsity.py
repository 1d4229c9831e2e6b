"""Sparsity propagation (DESIGN §1): which values are area-sparse under which gate.

A partition-gated layer's output is *area-sparse under gate g*: for a row routed to area k, only
block k of its feature dimension (last dim for linear layers, channels for convolutions) can be
non-zero. Elementwise ops with f(0)=0 keep that, so does adding two values sparse under the same
gate, and per-channel spatial pooling keeps channel sparsity; anything else makes a value dense.

The pass reads the graph (mirrored in a networkx DiGraph, walked in topological order) and changes
nothing: it returns {node name: SparseState or None}.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, Optional

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten


@dataclass(frozen=True)
class SparseState:
    gate: str
    dim: int  # the blocked dimension: -1 (linear features) or 1 (conv channels)

    def __str__(self) -> str:
        return f"area-sparse({self.gate})"


# f(0) = 0, applied elementwise.
_ZERO_PRESERVING_ATEN = {
    "relu", "relu_", "gelu", "silu", "tanh", "leaky_relu", "hardtanh", "relu6", "elu", "mish",
    "hardswish", "dropout", "native_dropout", "feature_dropout", "clone",
    "detach", "alias", "neg", "abs", "_to_copy", "contiguous", "sin", "sgn", "sign", "square",
}
_ZERO_PRESERVING_FUNCTIONS = {
    F.relu, torch.relu, F.gelu, F.silu, torch.tanh, F.tanh, F.leaky_relu, F.hardtanh, F.relu6,
    F.elu, F.mish, F.hardswish, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    torch.neg, torch.abs, operator.neg,
}
_ZERO_PRESERVING_METHODS = {"relu", "tanh", "neg", "abs", "clone", "detach", "contiguous", "float",
                            "double", "half", "bfloat16", "to"}
_ZERO_PRESERVING_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU, nn.Hardtanh, nn.ReLU6,
                            nn.ELU, nn.Mish, nn.Hardswish, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                            nn.Dropout3d, nn.Identity)
# alpha dropout is not here: it maps 0 to a non-zero value in training.
# Pool each channel over space: channel sparsity survives.
_CHANNEL_LOCAL_ATEN_PREFIXES = ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool",
                                "_adaptive_avg_pool")
_CHANNEL_LOCAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                          nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                          nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                          nn.AdaptiveMaxPool3d)
_CHANNEL_LOCAL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                            F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                            F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                            F.adaptive_max_pool3d}


def _aten_name(node: fx.Node) -> Optional[str]:
    t = node.target
    return t._opname if node.op == "call_function" and isinstance(t, torch._ops.OpOverload) else None


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _hardtanh_bounds(gm: fx.GraphModule, node: fx.Node):
    """(min_val, max_val) of a hardtanh node, or None if it is not one."""
    mod = _module(gm, node)
    if isinstance(mod, nn.Hardtanh):
        return mod.min_val, mod.max_val
    if _aten_name(node) in ("hardtanh", "hardtanh_") or (
            node.op == "call_function" and node.target is F.hardtanh):
        args = list(node.args[1:3]) + [-1.0, 1.0][len(node.args[1:3]):]
        return node.kwargs.get("min_val", args[0]), node.kwargs.get("max_val", args[1])
    return None


def zero_preserving(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An elementwise op of one tensor with f(0)=0 (activation, dropout, scaling by a number)."""
    bounds = _hardtanh_bounds(gm, node)
    if bounds is not None:   # clamps 0 to min_val or max_val unless min_val <= 0 <= max_val
        return all(isinstance(b, (int, float)) for b in bounds) and bounds[0] <= 0 <= bounds[1]
    name = _aten_name(node)
    if name is not None:
        if name in _ZERO_PRESERVING_ATEN:
            return True
        if name in ("mul", "div"):  # by a plain number
            return len(node.args) > 1 and isinstance(node.args[1], (int, float))
        return False
    if node.op == "call_function":
        if node.target in _ZERO_PRESERVING_FUNCTIONS:
            return True
        if node.target in (operator.mul, operator.truediv, torch.mul, torch.div):
            return len(node.args) > 1 and isinstance(node.args[1], (int, float))
        return False
    if node.op == "call_method":
        return node.target in _ZERO_PRESERVING_METHODS
    return isinstance(_module(gm, node), _ZERO_PRESERVING_MODULES)


def _channel_local(gm: fx.GraphModule, node: fx.Node) -> bool:
    name = _aten_name(node)
    if name is not None:
        return name.startswith(_CHANNEL_LOCAL_ATEN_PREFIXES)
    if node.op == "call_function":
        return node.target in _CHANNEL_LOCAL_FUNCTIONS
    return isinstance(_module(gm, node), _CHANNEL_LOCAL_MODULES)


def _is_add(node: fx.Node) -> bool:
    name = _aten_name(node)
    if name is not None:
        return name in ("add", "add_") and len(node.args) == 2 and len(node.kwargs) == 0
    return node.op == "call_function" and node.target in (operator.add, torch.add) \
        and not node.kwargs


def _first_node_arg(node: fx.Node) -> Optional[fx.Node]:
    a = node.args[0] if node.args else None
    return a if isinstance(a, fx.Node) else None


def analyse_sparsity(gm: fx.GraphModule, sources: Dict[str, SparseState]) -> Dict[str, SparseState]:
    """sources: {node name of a partition-gated layer: its output state}. Returns the state of
    every area-sparse value (nodes absent from the result are dense)."""
    from salcompile.plan import dataflow_graph

    nodes = {n.name: n for n in gm.graph.nodes}
    flow = dataflow_graph(gm.graph)
    state: Dict[str, SparseState] = {}
    for name in nx.topological_sort(flow):
        if name in sources:
            state[name] = sources[name]
            continue
        node = nodes[name]
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if _is_add(node):
            a, b = node.args
            sa = state.get(a.name) if isinstance(a, fx.Node) else None
            sb = state.get(b.name) if isinstance(b, fx.Node) else None
            if sa is not None and sa == sb:
                state[name] = sa
            continue
        x = _first_node_arg(node)
        s = state.get(x.name) if x is not None else None
        if s is None:
            continue
        if zero_preserving(gm, node) or (s.dim == 1 and _channel_local(gm, node)):
            state[name] = s
    return state
