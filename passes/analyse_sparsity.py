"""Sparsity propagation (DESIGN §1): which values are area-sparse under which gate.

A partition-gated layer's output is *area-sparse under gate g*: for a row routed to area k, only
block k of its feature dimension (last dim for linear layers, channels for convolutions) can be
non-zero. Elementwise ops with f(0)=0 keep that (activations, dropout, scaling by a number, a
power with a positive exponent), so does adding two values sparse under the same gate, and
per-channel spatial pooling keeps channel sparsity. A product keeps it too: of two values sparse
under the same gate, or of a sparse value and anything that broadcasts against it without adding
rows (the result has the sparse factor's shape; 0·finite = 0): the gated MLPs of Llama-style
models, down(act(gate(x)) * up(x)), and the tanh GELU 0.5·h·(1 + tanh(...)). Anything else makes
a value dense.

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
    "detach", "alias", "neg", "abs", "_to_copy", "to", "contiguous", "sin", "sgn", "sign", "square",
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


def _number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _scaled(node: fx.Node, div: bool) -> bool:
    """x * c, c * x (div=False) or x / c (div=True) by a plain number c."""
    a = node.args
    if len(a) != 2:
        return False
    if div:
        return isinstance(a[0], fx.Node) and _number(a[1])
    return (isinstance(a[0], fx.Node) and _number(a[1])) or \
        (_number(a[0]) and isinstance(a[1], fx.Node))


def _positive_power(node: fx.Node) -> bool:
    """x ** c with a plain number c > 0: 0 ** c = 0."""
    a = node.args
    return len(a) == 2 and isinstance(a[0], fx.Node) and _number(a[1]) and a[1] > 0


def zero_preserving(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An elementwise op of one tensor with f(0)=0 (activation, dropout, scaling by a number, a
    positive power)."""
    bounds = _hardtanh_bounds(gm, node)
    if bounds is not None:   # clamps 0 to min_val or max_val unless min_val <= 0 <= max_val
        return all(isinstance(b, (int, float)) for b in bounds) and bounds[0] <= 0 <= bounds[1]
    name = _aten_name(node)
    if name is not None:
        if name in _ZERO_PRESERVING_ATEN:
            return True
        if name in ("mul", "div"):  # by a plain number
            return _scaled(node, name == "div")
        if name == "pow":
            return _positive_power(node)
        return False
    if node.op == "call_function":
        if node.target in _ZERO_PRESERVING_FUNCTIONS:
            return True
        if node.target in (operator.mul, operator.truediv, torch.mul, torch.div):
            return _scaled(node, node.target in (operator.truediv, torch.div))
        if node.target in (operator.pow, torch.pow):
            return _positive_power(node)
        return False
    if node.op == "call_method":
        if node.target in ("mul", "div"):
            return _scaled(node, node.target == "div")
        if node.target == "pow":
            return _positive_power(node)
        return node.target in _ZERO_PRESERVING_METHODS
    return isinstance(_module(gm, node), _ZERO_PRESERVING_MODULES)


def tensor_operand(node: fx.Node) -> Optional[fx.Node]:
    """The tensor a one-tensor op (zero_preserving, pooling) applies to: its first node argument
    (`0.5 * h` has the number first)."""
    return next((a for a in node.args if isinstance(a, fx.Node)), None)


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


def is_product(node: fx.Node) -> bool:
    """a * b of two tensors (a product by a plain number is zero_preserving instead)."""
    name = _aten_name(node)
    if name is not None:
        ok = name in ("mul", "mul_") and not node.kwargs
    elif node.op == "call_function":
        ok = node.target in (operator.mul, torch.mul) and not node.kwargs
    else:
        ok = node.op == "call_method" and node.target == "mul" and not node.kwargs
    return ok and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)


def same_shape(a: fx.Node, b: fx.Node) -> bool:
    """Both shapes are known (meta["val"]) and equal."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and \
        [str(d) for d in va.shape] == [str(d) for d in vb.shape]


def product_state(node: fx.Node, state_of) -> Optional[SparseState]:
    """The sparsity of a product a * b given state_of(factor): sparse when both factors are sparse
    under one gate, or when one is and the product has its shape (the other factor broadcasts
    against it and adds no rows)."""
    a, b = node.args
    sa, sb = state_of(a), state_of(b)
    if sa is not None and sa == sb:
        return sa
    for s, f in ((sa, a), (sb, b)):
        if s is not None and same_shape(f, node):
            return s
    return None


def _is_view_op(t) -> bool:
    rets = t._schema.returns
    return bool(rets) and rets[0].alias_info is not None and not rets[0].alias_info.is_write


_TORCH_VIEW_METHODS = {"view", "reshape", "narrow", "select", "transpose", "t", "permute",
                       "squeeze", "unsqueeze", "expand", "flatten", "unflatten", "view_as",
                       "__getitem__", "split", "chunk", "unbind", "diagonal", "movedim"}


def _torch_view(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _TORCH_VIEW_METHODS
    return n.op == "call_function" and (n.target is operator.getitem or getattr(
        n.target, "__name__", "") in _TORCH_VIEW_METHODS)


def _mutated_through_views(gm: fx.GraphModule) -> set:
    """Names of values an in-place op mutates through a view of them (passes/
    functionalize_inplace.py rebinds direct mutations; these it must leave): they count as dense."""
    out = set()
    for n in gm.graph.nodes:
        t = n.target
        if n.op == "call_method" and t.endswith("_") and not t.startswith("_") and n.args:
            r = n.args[0]   # symbolic_trace: h[:, :3].add_(1) is getitem, then a method
            while isinstance(r, fx.Node) and _torch_view(r):
                r = r.args[0]
            if isinstance(r, fx.Node) and r is not n.args[0]:
                out.add(r.name)
            continue
        if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
            continue
        for i, a in enumerate(t._schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write or i >= len(n.args):
                continue
            r = n.args[i]
            while isinstance(r, fx.Node) and r.op == "call_function" and \
                    isinstance(r.target, torch._ops.OpOverload) and _is_view_op(r.target):
                r = r.args[0]
            if isinstance(r, fx.Node) and r is not n.args[i]:
                out.add(r.name)
    return out


def analyse_sparsity(gm: fx.GraphModule, sources: Dict[str, SparseState]) -> Dict[str, SparseState]:
    """sources: {node name of a partition-gated layer: its output state}. Returns the state of
    every area-sparse value (nodes absent from the result are dense)."""
    from salcompile.plan import dataflow_graph

    nodes = {n.name: n for n in gm.graph.nodes}
    flow = dataflow_graph(gm.graph)
    state: Dict[str, SparseState] = {}
    mutated = _mutated_through_views(gm)
    for name in nx.topological_sort(flow):
        if name in mutated:   # h[:, :3].add_(1): what h holds later is not what the graph says
            continue
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
        if is_product(node):
            s = product_state(node, lambda f: state.get(f.name))
            if s is not None:
                state[name] = s
            continue
        x = tensor_operand(node)
        s = state.get(x.name) if x is not None else None
        if s is None:
            continue
        if zero_preserving(gm, node) or (s.dim == 1 and _channel_local(gm, node)):
            state[name] = s
    return state
