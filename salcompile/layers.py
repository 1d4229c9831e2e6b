"""Recognise weight-carrying linear maps in an aten-level FX graph.

A *layer* is a linear map with one activation operand and one weight operand, where the weight
operand is a parameter or a chain of ops on exactly one parameter (t, chunk, slicing, views: the
chain is mirrored onto B). Everything here reads the graph; nothing changes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set

import torch
import torch.fx as fx

aten = torch.ops.aten

LINEAR = {aten.linear.default}
CONV_ND = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
           aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}
CONV_T_ND = {aten.conv_transpose1d.default: 1, aten.conv_transpose2d.input: 2,
             aten.conv_transpose3d.input: 3}
CONVOLUTION = {aten.convolution.default}
MATMUL = {aten.matmul.default, aten.mm.default, aten.bmm.default}
EINSUM = {aten.einsum.default}
RECURRENT = {aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input,
             aten.lstm.data, aten.gru.data, aten.rnn_tanh.data, aten.rnn_relu.data}
# Ops whose parameters learn from their true local gradient and transport no weight backward.
LOCAL_PREFIXES = ("embedding", "layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm",
                  "native_layer_norm", "native_batch_norm", "_native_batch_norm", "native_group_norm",
                  "add", "sub", "mul", "div", "where", "cat", "stack", "index", "select", "slice",
                  "prelu", "_prelu", "gather", "clamp", "addcmul", "lerp")


@dataclass
class LayerSpec:
    """One recognised layer, in the normal form the FA ops take."""
    node: fx.Node
    kind: str                      # "linear" | "conv" | "matmul" | "einsum"
    op: str                        # human name: linear, conv2d, conv_transpose1d, matmul, einsum...
    x: fx.Node
    weight: fx.Node                # the weight operand (a param or a chain on one)
    param: str                     # qualified name of the parameter behind it
    bias: Optional[fx.Node] = None
    conv: Optional[Dict[str, Any]] = None   # stride, padding, dilation, transposed, output_padding, groups
    equation: Optional[str] = None
    weight_first: bool = False
    area: bool = False             # turned into an area op (its feedback slot filled by attach_fa)


@dataclass
class Unsupported:
    node: fx.Node
    op: str
    params: List[str]
    reason: str


def bind(node: fx.Node) -> Dict[str, Any]:
    """Arguments of an OpOverload call by schema name, defaults filled in."""
    schema = node.target._schema
    out: Dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def param_names(gm: fx.GraphModule) -> Dict[str, torch.nn.Parameter]:
    return dict(gm.named_parameters(remove_duplicate=False))


class WeightTracer:
    """Dataflow facts per node: which parameters it derives from, whether it reads an input."""

    def __init__(self, gm: fx.GraphModule):
        self.params = param_names(gm)
        self.sources: Dict[fx.Node, Set[str]] = {}
        self.reads_input: Dict[fx.Node, bool] = {}
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                self.sources[n], self.reads_input[n] = set(), True
            elif n.op == "get_attr":
                self.sources[n] = {n.target} if n.target in self.params else set()
                self.reads_input[n] = False
            else:
                ins = n.all_input_nodes
                self.sources[n] = set().union(*(self.sources[i] for i in ins)) if ins else set()
                self.reads_input[n] = any(self.reads_input[i] for i in ins)

    def weight_of(self, n: Any) -> Optional[str]:
        """The parameter `n` is derived from, if `n` is a weight operand (one parameter, no input)."""
        if not isinstance(n, fx.Node) or self.reads_input.get(n, True):
            return None
        src = self.sources.get(n, set())
        if len(src) != 1:
            return None
        (p,) = src
        return p if self.params[p].is_floating_point() else None

    def chain(self, w: fx.Node) -> List[fx.Node]:
        """The nodes between the parameter and the operand `w`, in graph order (w included)."""
        seen, stack = set(), [w]
        while stack:
            n = stack.pop()
            if n in seen or n.op != "call_function":
                continue
            seen.add(n)
            stack.extend(i for i in n.all_input_nodes if not self.reads_input[i])
        return [n for n in w.graph.nodes if n in seen]


def _ntuple(v, n) -> List[int]:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 else v


def _conv_params(node, a, nd, transposed, w_shape):
    """(params dict, reason-if-unsupported)."""
    stride = _ntuple(a.get("stride", 1), nd)
    dilation = _ntuple(a.get("dilation", 1), nd)
    padding = a.get("padding", 0)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0] * nd
        else:  # "same": symmetric padding exists only when dilation*(k-1) is even
            total = [d * (k - 1) for d, k in zip(dilation, w_shape[2:])]
            if any(t % 2 for t in total):
                return None, "padding='same' with an even kernel pads asymmetrically"
            padding = [t // 2 for t in total]
    return dict(stride=stride, padding=_ntuple(padding, nd), dilation=dilation,
                transposed=transposed, output_padding=_ntuple(a.get("output_padding", 0), nd),
                groups=int(a.get("groups", 1))), None


def recognise(node: fx.Node, tracer: WeightTracer, gm: fx.GraphModule):
    """A LayerSpec, an Unsupported, or None (not a parameter-carrying op)."""
    if node.op == "call_module":
        return _leaf_module(node, gm)
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    t = node.target
    if t in LINEAR or t in CONV_ND or t in CONV_T_ND or t in CONVOLUTION:
        a = bind(node)
        x, w = a["input"], a["weight"]
        p = tracer.weight_of(w)
        if p is None or tracer.weight_of(x) is not None:
            return _maybe_unsupported(node, tracer)
        if t in LINEAR:
            return LayerSpec(node, "linear", "linear", x, w, p, bias=a.get("bias"))
        w_shape = tuple(w.meta["val"].shape) if "val" in w.meta else tuple(tracer.params[p].shape)
        if t in CONVOLUTION:
            nd = len(w_shape) - 2
            conv, why = _conv_params(node, a, nd, bool(a["transposed"]), w_shape)
            name = ("conv_transpose" if a["transposed"] else "conv") + f"{nd}d"
        else:
            nd = CONV_ND.get(t) or CONV_T_ND[t]
            transposed = t in CONV_T_ND
            conv, why = _conv_params(node, a, nd, transposed, w_shape)
            name = ("conv_transpose" if transposed else "conv") + f"{nd}d"
        if conv is None:
            return Unsupported(node, name, [p], why)
        return LayerSpec(node, "conv", name, x, w, p, bias=a.get("bias"), conv=conv)
    if t in MATMUL:
        a0, a1 = node.args[0], node.args[1]
        p0, p1 = tracer.weight_of(a0), tracer.weight_of(a1)
        if (p0 is None) == (p1 is None):
            return None  # activation × activation, or weight × weight
        w, x, p = (a0, a1, p0) if p0 is not None else (a1, a0, p1)
        if tracer.params[p].dim() < 2 and ("val" not in w.meta or w.meta["val"].dim() < 2):
            return Unsupported(node, t._opname, [p], "a vector parameter in a matmul")
        return LayerSpec(node, "matmul", t._opname, x, w, p, weight_first=p0 is not None)
    if t in EINSUM:
        from .ops.fa import parse_einsum
        eq, operands = node.args[0], list(node.args[1])
        ps = [tracer.weight_of(o) for o in operands]
        if len(operands) != 2 or (ps[0] is None) == (ps[1] is None):
            if any(ps):
                return Unsupported(node, "einsum", [p for p in ps if p],
                                   "einsum needs exactly one weight and one activation operand")
            return None
        if parse_einsum(eq) is None:
            return Unsupported(node, "einsum", [p for p in ps if p],
                               f"einsum equation {eq!r} (implicit output, '...' or repeated index)")
        wf = ps[0] is not None
        w, x, p = (operands[0], operands[1], ps[0]) if wf else (operands[1], operands[0], ps[1])
        return LayerSpec(node, "einsum", "einsum", x, w, p, equation=eq, weight_first=wf)
    return _maybe_unsupported(node, tracer)


def _leaf_module(node: fx.Node, gm: fx.GraphModule):
    """symbolic_trace keeps torch.nn modules whole: their weights never reach the FA pass."""
    mod = gm.get_submodule(node.target)
    ps = [f"{node.target}.{n}" for n, p in mod.named_parameters() if p.dim() >= 2]
    if not ps or isinstance(mod, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
        return None
    if isinstance(mod, torch.nn.RNNBase):
        return Unsupported(node, type(mod).__name__, ps, "recurrent layer: kept on backprop (FA "
                                                         "not implemented for its fused kernel)")
    return Unsupported(node, type(mod).__name__, ps,
                       "traced as one opaque module by symbolic_trace; pass example_inputs so "
                       "torch.export captures its inner layers")


def _is_size(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if val is not None:
        return not isinstance(val, torch.Tensor)
    return node.target in ("size", getattr) or "sym_size" in str(node.target)


def _maybe_unsupported(node: fx.Node, tracer: WeightTracer):
    """Ops that take an activation and a >=2-D weight but are not linear maps we rewrite."""
    if not tracer.reads_input.get(node, False):
        return None
    # An input size alone (x.shape[0] in `cls.expand(B, -1, -1)`) is not an activation.
    if not any(tracer.reads_input.get(i, False) and not _is_size(i) for i in node.all_input_nodes):
        return None
    ps = sorted({p for i in node.all_input_nodes if (p := tracer.weight_of(i)) is not None
                 and tracer.params[p].dim() >= 2})
    if not ps:
        return None
    name = node.target._opname if hasattr(node.target, "_opname") else str(node.target)
    if node.target in RECURRENT:
        return Unsupported(node, name, ps, "recurrent layer: kept on backprop (FA not implemented "
                                           "for its fused kernel)")
    if name.startswith(LOCAL_PREFIXES):
        return None
    return Unsupported(node, name, ps, f"aten.{name} is not a linear map salcompile rewrites")
