"""In-place ops made explicit in the dataflow, and out-of-place wherever that is provably safe.

Models are full of in-place ops (`nn.ReLU(inplace=True)`, `out += identity`, `x.add_(...)`). Two
things go wrong with them in a rewritten graph:

  * symbolic_trace records `h.add_(1)` and then `fc(h)` as a read of `h`, the value *before* the
    mutation: every analysis (sparsity, regions, DFA taps) then follows a dataflow that is not the
    one that runs, and a gated layer can read an area block of a value that is no longer sparse;
  * an in-place op on the output of a custom op (the FA and area ops put in later) is fragile in
    autograd (a custom op whose output is a view cannot be modified in place).

This pass runs right after capture and does two things, in graph order:

  1. Rebind: every later read of a value that an in-place op mutated reads the op's result instead
     (an in-place op returns its own argument, so this renames only; nothing changes at run time).
     torch.export already records graphs this way; symbolic_trace does not.
  2. Out of place: `op_(s, ...)` becomes `op(s, ...)` when that is provably the same computation:
     `s` is private to the graph (made by an op whose output never shares storage with its
     inputs: not an input, parameter, buffer or view), every other reader of `s` neither aliases
     nor mutates it (so no one else can see the mutation), the out-of-place op gives `s`'s dtype,
     and the op is not random. aten ops are judged by their schema; symbolic_trace's torch-level
     calls by short lists of known ops, and only with plain-number operands. Mutations of inputs,
     parameters and buffers (batch norm's running statistics and counter), mutations through
     views, and in-place nn modules (`nn.ReLU(inplace=True)` under symbolic_trace, which the
     analyses know as modules) stay as they are, rebound.

It changes no value and no gradient of the module (tests/test_inplace_ops.py).
"""
from __future__ import annotations

import inspect
import operator
from typing import Dict, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from .context import PassContext

aten = torch.ops.aten

# CompositeImplicitAutograd ops may return an input itself despite their schema (dropout in eval
# mode, type_as): only these, known to always compute a new tensor, count as private producers.
_FRESH_COMPOSITES = {
    aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
    aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
    aten.batch_norm.default, aten.layer_norm.default, aten.group_norm.default,
    aten.instance_norm.default, aten.matmul.default, aten.max_pool1d.default,
    aten.max_pool2d.default, aten.max_pool3d.default, aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
    aten.scaled_dot_product_attention.default, aten.softmax.int, aten.log_softmax.int,
}

# symbolic_trace's torch-level calls that always return a new tensor and mutate nothing
_ELEMENTWISE = ("add", "sub", "mul", "div", "relu", "tanh", "sigmoid", "clamp", "clamp_min",
                "clamp_max", "neg", "abs", "exp", "sqrt", "rsqrt", "square", "pow")
_FRESH_METHODS = set(_ELEMENTWISE) | {"matmul", "softmax", "log_softmax", "sum", "mean"}
_FRESH_FUNCTIONS = {getattr(torch, n) for n in _ELEMENTWISE} | {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.matmul,
    operator.pow, torch.matmul, torch.cat, torch.stack, torch.softmax, F.linear, F.conv1d,
    F.conv2d, F.conv3d, F.gelu, F.silu, F.softmax, F.layer_norm, F.group_norm, F.batch_norm,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_FRESH_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                  nn.ConvTranspose2d, nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm2d,
                  nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.MaxPool1d,
                  nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                  nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.GELU,
                  nn.Tanh, nn.Sigmoid, nn.Softmax)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.CELU, nn.SELU, nn.SiLU,
                nn.Mish, nn.Hardswish)   # fresh unless inplace=True
# in-place elementwise methods / torch functions symbolic_trace records, made out of place
_PURE_OF = {n + "_": n for n in _ELEMENTWISE}
# F.relu(x, inplace=True) and friends: the same call with inplace=False
_INPLACE_FLAG_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.hardtanh, F.elu, F.celu, F.selu,
                           F.silu, F.mish, F.hardswish, F.threshold}


def functionalize_inplace(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    g = gm.graph
    changed = False
    order = {n: i for i, n in enumerate(g.nodes)}
    for node in list(g.nodes):
        target = _mutated(gm, node)
        if target is None:
            continue
        changed |= _rebind(node, target, order)
        new = _out_of_place(gm, node, target)
        if new is not None:
            order[new] = order[node]
            node.replace_all_uses_with(new)
            g.erase_node(node)
            changed = True
    if changed:
        g.lint()
        gm.recompile()
    return gm


# ---------------------------------------------------------------- which node an op mutates
def _mutated(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    """The node whose tensor `node` mutates in place and returns, or None."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        i = _self_write_index(node.target)
        if i is None:
            return None
        arg = node.args[i] if i < len(node.args) else \
            node.kwargs.get(node.target._schema.arguments[i].name)
        return arg if isinstance(arg, fx.Node) else None
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_method":
        return first if _inplace_name(node.target) and \
            callable(getattr(torch.Tensor, node.target, None)) else None
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if _inplace_name(name) and any(node.target is getattr(m, name, None)
                                       for m in (torch, torch.Tensor, F, torch._C._nn)):
            return first
        return first if _inplace_flag(node) else None
    if node.op == "call_module":
        mod = _module(gm, node)
        if mod is not None and type(mod).__module__.startswith("torch.nn.modules.") and \
                getattr(mod, "inplace", False) is True and len(node.args) == 1 and not node.kwargs:
            return first   # their forward mutates the input and returns it
    return None


def _inplace_name(name) -> bool:
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def _module(gm: fx.GraphModule, node: fx.Node):
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def _self_write_index(op) -> Optional[int]:
    """Index of the argument an aten-style in-place op writes and returns (`Tensor(a!) self` ->
    `Tensor(a!)`), or None."""
    s = op._schema
    if len(s.returns) != 1 or s.returns[0].alias_info is None or \
            not s.returns[0].alias_info.is_write:
        return None
    ret = s.returns[0].alias_info.before_set
    for i, a in enumerate(s.arguments):
        if a.alias_info is not None and a.alias_info.is_write and a.alias_info.before_set == ret:
            return i
    return None


def _bound(node: fx.Node):
    try:
        return inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None


def _inplace_flag(node: fx.Node) -> bool:
    """F.relu(x, inplace=True) and friends (F.dropout too), as symbolic_trace records them."""
    fn = node.target
    if getattr(fn, "__module__", None) != F.__name__ or not callable(fn):
        return False
    bound = _bound(node)
    return bound is not None and bound.arguments.get("inplace") is True


# ---------------------------------------------------------------- 1. rebind later reads
def _rebind(node: fx.Node, target: fx.Node, order: Dict[fx.Node, int]) -> bool:
    """Reads of `target` after `node` read `node` (the same tensor, mutated)."""
    later = [u for u in target.users if u is not node and order.get(u, -1) > order[node]]
    for u in later:
        u.args = fx.node.map_arg(u.args, lambda n: node if n is target else n)
        u.kwargs = fx.node.map_arg(u.kwargs, lambda n: node if n is target else n)
    return bool(later)


# ---------------------------------------------------------------- 2. out of place when safe
def _out_of_place(gm: fx.GraphModule, node: fx.Node, target: fx.Node) -> Optional[fx.Node]:
    made = _pure_call(node)
    if made is None or not _private(gm, target):
        return None
    # Every other reader of `target` (they all run before `node`: later ones were rebound) must
    # neither alias nor mutate it; then no one sees the mutation but through `node`'s result.
    if any(u is not node and not _no_alias(gm, u) for u in target.users):
        return None
    op, target_fn, args, kwargs, name = made
    if op == "call_function" and isinstance(target_fn, torch._ops.OpOverload):
        if not _same_dtype(node, target):
            return None
    elif not _numbers_only(args[1:], kwargs):
        # torch-level calls carry no dtypes: with plain-number operands, an in-place op that ran
        # gives the dtype the out-of-place op gives (a float on an int tensor fails in place)
        return None
    g = gm.graph
    with g.inserting_before(node):
        new = g.create_node(op, target_fn, args, kwargs, name=name)
    new.meta = dict(node.meta)
    return new


def _pure_call(node: fx.Node):
    """(op, target, args, kwargs, name) of the out-of-place form of in-place `node`, or None."""
    t = node.target
    if node.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        if _self_write_index(t) != 0 or torch.Tag.nondeterministic_seeded in t.tags:
            return None
        pure = _pure_overload(t)
        if pure is None:
            return None
        return "call_function", pure, node.args, node.kwargs, pure._schema.name.split("::")[-1]
    if node.op == "call_method" and t in _PURE_OF:
        return "call_method", _PURE_OF[t], node.args, node.kwargs, _PURE_OF[t]
    if node.op == "call_function":
        name = getattr(t, "__name__", "")
        if name in _PURE_OF and t in (getattr(torch, name, None),
                                      getattr(torch.Tensor, name, None)):
            pure = getattr(torch, _PURE_OF[name])
            return "call_function", pure, node.args, node.kwargs, _PURE_OF[name]
        if t in _INPLACE_FLAG_FUNCTIONS:
            bound = _bound(node)
            if bound is None:
                return None
            bound.arguments["inplace"] = False
            return "call_function", t, bound.args, bound.kwargs, t.__name__
    return None


def _pure_overload(op):
    """The out-of-place overload of an in-place op (relu_.default -> relu.default) with the same
    arguments, or None."""
    name = op._schema.name.split("::")[-1]
    if not _inplace_name(name):
        return None
    packet = getattr(getattr(torch.ops, op.namespace), name[:-1], None)
    pure = getattr(packet, op._overloadname, None) if packet is not None else None
    if not isinstance(pure, torch._ops.OpOverload):
        return None
    a, b = op._schema, pure._schema
    if [x.name for x in a.arguments] != [x.name for x in b.arguments] or len(b.returns) != 1:
        return None
    if any(x.alias_info is not None for x in b.arguments) or b.returns[0].alias_info is not None:
        return None
    return pure


def _no_alias(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A call whose output never shares storage with an input and that mutates nothing."""
    t = node.target
    if node.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        s = t._schema
        if any(a.alias_info is not None for a in s.arguments) or \
                any(r.alias_info is not None for r in s.returns):
            return False
        if t in _FRESH_COMPOSITES:
            return True
        return not torch._C._dispatch_has_kernel_for_dispatch_key(t.name(),
                                                                  "CompositeImplicitAutograd")
    if node.op == "call_function":
        if t in _INPLACE_FLAG_FUNCTIONS:
            bound = _bound(node)
            return bound is not None and bound.arguments.get("inplace", False) is False
        return t in _FRESH_FUNCTIONS and not node.kwargs.get("out")
    if node.op == "call_method":
        return t in _FRESH_METHODS
    if node.op == "call_module":
        mod = _module(gm, node)
        return type(mod) in _FRESH_MODULES or (type(mod) in _ACTIVATIONS and not mod.inplace)
    return False


def _private(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A tensor only the graph holds: made by a non-aliasing op (or an item of its tuple)."""
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        return isinstance(src, fx.Node) and isinstance(node.args[1], int) and \
            src.op == "call_function" and isinstance(src.target, torch._ops.OpOverload) and \
            _no_alias(gm, src)
    return node.op in ("call_function", "call_method", "call_module") and _no_alias(gm, node)


def _dtype(x):
    if isinstance(x, fx.Node):
        v = x.meta.get("val")
        return v.dtype if isinstance(v, torch.Tensor) else None
    return None


def _same_dtype(node: fx.Node, target: fx.Node) -> bool:
    """The out-of-place op gives target's dtype: every tensor operand has it, and every number
    stays within its kind (no float scalar on an integer tensor, no complex)."""
    dt = _dtype(target)
    if dt is None:
        return False
    for a in list(node.args[1:]) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            if _dtype(a) != dt:
                return False
        elif isinstance(a, complex) or (isinstance(a, float) and not dt.is_floating_point):
            return False
        elif isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
            return False
    return True


def _numbers_only(args, kwargs) -> bool:
    vals = list(args) + list(kwargs.values())
    return all(v is None or (isinstance(v, (bool, int, float)) and not isinstance(v, complex))
               for v in vals)
