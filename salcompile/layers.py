"""Recognise weight-carrying linear maps in an aten-level FX graph.

A *layer* is a linear map with one activation operand and one weight operand: a value computed
from parameters only (no input data). When that value is a parameter or a chain of view ops on
exactly one parameter (t, chunk, slicing, expand, dtype casts), the chain is mirrored onto B.
Otherwise the weight is *composed* (LoRA's `W + A@B`, weight_norm's `g·v/‖v‖`, `scale·W` with a
learnt scale): FA then uses a fixed B shaped like the effective weight, and every constituent
parameter receives its true gradient from dW_eff through its own chain. Everything here reads the
graph; nothing changes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import inspect
import operator
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
# Grouped matmuls (MoE experts): x [rows sorted by expert, in] @ W [E, in, out] with cumulative
# row offsets. Matched by op name: transformers registers its own CPU fallback op.
GROUPED_MM_NAMES = ("_grouped_mm", "grouped_mm", "grouped_mm_fallback")
EINSUM = {aten.einsum.default}
RECURRENT = {aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input,
             aten.lstm.data, aten.gru.data, aten.rnn_tanh.data, aten.rnn_relu.data}
# Ops whose parameters learn from their true local gradient and transport no weight backward:
# norms and embeddings by prefix, elementwise and indexing ops by exact name (a prefix "add" would
# also match addmm, "mul" would match multi_head_attention...).
LOCAL_PREFIXES = ("embedding", "layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm",
                  "native_layer_norm", "native_batch_norm", "_native_batch_norm", "native_group_norm",
                  "_native_batch_norm_legit", "_fused_rms_norm")
LOCAL_OPS = {"add", "sub", "rsub", "mul", "div", "where", "cat", "stack", "index", "select", "slice",
             "prelu", "_prelu_kernel", "gather", "clamp", "clamp_min", "clamp_max", "addcmul",
             "addcdiv", "lerp", "maximum", "minimum", "masked_fill", "index_select",
             "index_put", "scatter", "scatter_add", "copy", "expand_as", "type_as", "pow",
             "sqrt", "rsqrt", "neg", "exp", "log", "sigmoid", "tanh", "abs", "square",
             "logical_and", "logical_or", "eq", "ne", "lt", "le", "gt", "ge", "fill"}
# Weight operands reached through these ops only (one parameter) have B mirrored through them.
VIEW_OPS = {"t", "transpose", "permute", "view", "reshape", "_unsafe_view", "expand", "unsqueeze",
            "squeeze", "chunk", "split", "split_with_sizes", "slice", "select", "narrow", "unbind",
            "contiguous", "clone", "alias", "flatten", "unflatten", "_to_copy", "to", "detach",
            "lift_fresh_copy", "getitem", "sym_size", "size", "_assert_tensor_metadata",
            "movedim", "swapaxes", "mT", "T", "float", "double", "half", "bfloat16", "type_as"}
GATHER_OPS = VIEW_OPS | {"index", "index_select"}
# Matmul-like ops: a parameter-derived operand of one of these that is not a planned layer is a
# weight trained by backprop (the audit pass refuses it silently happening).
MATMUL_LIKE = {"mm", "addmm", "baddbmm", "addbmm", "bmm", "matmul", "linear", "conv1d", "conv2d",
               "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
               "convolution", "_convolution", "einsum", "_grouped_mm", "grouped_mm",
               "grouped_mm_fallback", "mv", "addmv", "dot", "vdot", "tensordot", "bilinear",
               "_scaled_mm", "outer", "ger", "addr", "kron", "inner", "chain_matmul",
               "multi_dot", "lstm", "gru", "rnn_tanh", "rnn_relu", "_thnn_fused_lstm_cell",
               "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
               "multi_head_attention_forward", "_native_multi_head_attention"}


def op_name(node: fx.Node) -> str:
    """A node's op name without namespace or overload: 'addmm', 'linear', 'getitem', 'relu'."""
    t = node.target
    if hasattr(t, "_opname"):
        return t._opname
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


@dataclass
class LayerSpec:
    """One recognised layer, in the normal form the FA ops take."""
    node: fx.Node
    kind: str                      # "linear" | "conv" | "matmul" | "einsum" | "grouped_mm"
    op: str                        # human name: linear, conv2d, conv_transpose1d, matmul, einsum...
    x: fx.Node
    weight: fx.Node                # the weight operand (a param, a view chain on one, or composed)
    param: str                     # qualified name of the (largest) parameter behind it
    bias: Optional[fx.Node] = None
    conv: Optional[Dict[str, Any]] = None   # stride, padding, dilation, transposed, output_padding, groups
    equation: Optional[str] = None
    weight_first: bool = False
    area: bool = False             # turned into an area op (its feedback slot filled by attach_fa)
    constituents: List[str] = field(default_factory=list)  # every parameter in the weight operand
    composed: bool = False         # weight computed from several parameters or through non-view ops
    offs: Optional[fx.Node] = None  # grouped_mm: cumulative row offsets per expert
    parts: List[fx.Node] = field(default_factory=list)  # shared path: the ops on weight slices


@dataclass
class Unsupported:
    node: fx.Node
    op: str
    params: List[str]
    reason: str


def bind(node: fx.Node) -> Dict[str, Any]:
    """Arguments of an OpOverload call node by schema name, defaults filled in."""
    return bind_call(node.target, node.args, node.kwargs)


def bind_call(target, args, kwargs=None) -> Dict[str, Any]:
    """Arguments of a call of OpOverload `target` by schema name, defaults filled in."""
    kwargs = kwargs or {}
    out: Dict[str, Any] = {}
    for i, a in enumerate(target._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def arg_names(target) -> List[str]:
    """Parameter names of a call target: an OpOverload's schema, else its Python signature (the
    masked-dense reference ops are plain functions with the same names as their custom ops)."""
    if isinstance(target, torch._ops.OpOverload):
        return [a.name for a in target._schema.arguments]
    return list(inspect.signature(target).parameters)


def get_arg(node: fx.Node, name: str) -> Any:
    """A call's argument by its parameter name (positional or keyword)."""
    i = arg_names(node.target).index(name)
    return node.args[i] if i < len(node.args) else node.kwargs.get(name)


def set_args(node: fx.Node, **values: Any) -> None:
    """Set a call's arguments by parameter name: passes edit ops by name, never by position."""
    names = arg_names(node.target)
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, value in values.items():
        i = names.index(name)
        if i < len(args):
            args[i] = value
        else:
            kwargs[name] = value
    node.args, node.kwargs = tuple(args), kwargs


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
            elif _is_size(n):  # x.size(0) in W.expand(x.size(0), -1, -1): shape, not data
                self.sources[n], self.reads_input[n] = set(), False
            else:
                ins = n.all_input_nodes
                self.sources[n] = set().union(*(self.sources[i] for i in ins)) if ins else set()
                self.reads_input[n] = any(self.reads_input[i] for i in ins)
        # Weights gathered by data-dependent integer indices (MoE experts: W[expert_ids] into a
        # bmm): view/index ops whose float inputs are weights, their other inputs indices.
        self.gathered: Dict[fx.Node, Set[str]] = {}
        for n in gm.graph.nodes:
            if n.op not in ("call_function", "call_method") or op_name(n) not in GATHER_OPS:
                continue
            weights, ok = set(), True
            for i in n.all_input_nodes:
                if not self.reads_input[i] and self.sources[i]:
                    weights |= self.sources[i]
                elif i in self.gathered:
                    weights |= self.gathered[i]
                elif not (_is_index(i) or _is_size(i)):
                    ok = False
            if ok and weights and self.reads_input[n]:
                self.gathered[n] = weights

    def gathered_params(self, n: Any) -> Optional[List[str]]:
        """The parameters of a weight gathered by data-dependent indices (W[ids]), or None."""
        src = [p for p in self.gathered.get(n, ()) if self.params[p].is_floating_point()]
        return sorted(src, key=lambda p: (-self.params[p].numel(), p)) if src else None

    def weight_params(self, n: Any) -> Optional[List[str]]:
        """The floating-point parameters `n` is computed from, largest first, if `n` is a weight
        operand (derived from parameters only, no input data); None otherwise."""
        if not isinstance(n, fx.Node) or self.reads_input.get(n, True):
            return None
        src = [p for p in self.sources.get(n, set()) if self.params[p].is_floating_point()]
        if not src:
            return None
        return sorted(src, key=lambda p: (-self.params[p].numel(), p))

    def weight_of(self, n: Any) -> Optional[str]:
        """The main parameter behind the weight operand `n` (the largest), or None."""
        ps = self.weight_params(n)
        return ps[0] if ps else None

    def is_view_chain(self, w: fx.Node) -> bool:
        """`w` is one parameter seen through view ops only (B can be mirrored through them)."""
        if w in self.gathered:
            return len(self.gathered[w]) == 1 and all(
                op_name(c) in GATHER_OPS for c in self.chain(w))
        ps = self.weight_params(w)
        return ps is not None and len(ps) == 1 and len(self.sources[w]) == 1 and all(
            op_name(c) in VIEW_OPS for c in self.chain(w))

    def chain(self, w: fx.Node) -> List[fx.Node]:
        """The nodes between the parameter and the operand `w`, in graph order (w included)."""
        seen, stack = set(), [w]
        while stack:
            n = stack.pop()
            if n in seen or n.op not in ("call_function", "call_method"):
                continue
            seen.add(n)
            stack.extend(i for i in n.all_input_nodes if (not self.reads_input[i] and
                                                          self.sources[i]) or i in self.gathered)
        return [n for n in w.graph.nodes if n in seen]

    def evaluate(self, gm: fx.GraphModule, w: fx.Node) -> torch.Tensor:
        """The value of the weight operand `w` now, computed from copies of the parameters and
        buffers it reads (nothing in `gm` changes). Raises KeyError when `w` needs input data."""
        env: Dict[fx.Node, Any] = {}

        def load(a):
            if a in env:
                return env[a]
            if a.op == "get_attr":   # a tensor (copied), or a submodule a higher-order op runs
                v = operator.attrgetter(a.target)(gm)
                env[a] = v.detach().clone() if isinstance(v, torch.Tensor) else v
            elif a.op in ("call_function", "call_method") and not self.reads_input[a]:
                args = fx.node.map_arg(a.args, load)   # the chain, or a buffer-only value
                kwargs = fx.node.map_arg(a.kwargs, load)
                env[a] = a.target(*args, **kwargs) if a.op == "call_function" else \
                    getattr(args[0], a.target)(*args[1:], **kwargs)
            else:
                raise KeyError(a.name)
            return env[a]
        with torch.no_grad():
            return load(w)


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


def _layer(node, kind, op, x, w, tracer: WeightTracer, **fields) -> LayerSpec:
    ps = tracer.weight_params(w)
    return LayerSpec(node, kind, op, x, w, ps[0], constituents=list(ps),
                     composed=not tracer.is_view_chain(w), **fields)


def recognise(node: fx.Node, tracer: WeightTracer, gm: fx.GraphModule):
    """A LayerSpec, an Unsupported, or None (not a parameter-carrying op)."""
    if node.op == "call_module":
        return _leaf_module(node, gm)
    if node.op not in ("call_function", "call_method"):
        return None
    if not isinstance(node.target, torch._ops.OpOverload):
        return _maybe_unsupported(node, tracer)   # torch-level calls of a symbolic_trace graph
    t = node.target
    if t in LINEAR or t in CONV_ND or t in CONV_T_ND or t in CONVOLUTION:
        a = bind(node)
        x, w = a["input"], a["weight"]
        p = tracer.weight_of(w)
        if p is None or tracer.weight_of(x) is not None:
            return _maybe_unsupported(node, tracer)
        if t in LINEAR:
            return _layer(node, "linear", "linear", x, w, tracer, bias=a.get("bias"))
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
            return Unsupported(node, name, tracer.weight_params(w), why)
        return _layer(node, "conv", name, x, w, tracer, bias=a.get("bias"), conv=conv)
    if t in MATMUL:
        a0, a1 = node.args[0], node.args[1]
        p0, p1 = tracer.weight_of(a0), tracer.weight_of(a1)
        if p0 is None and p1 is None:   # W[expert_ids] against activations: a gathered weight
            p0, p1 = tracer.gathered_params(a0), tracer.gathered_params(a1)
            p0, p1 = (p0[0] if p0 else None), (p1[0] if p1 else None)
            if (p0 is None) == (p1 is None):
                if p0 is not None:
                    return Unsupported(node, t._opname, sorted({p0, p1}),
                                       "both operands are weights gathered by indices")
                return None  # activation × activation
            w = a0 if p0 is not None else a1
            x = a1 if p0 is not None else a0
            ps = tracer.gathered_params(w)
            return LayerSpec(node, "matmul", t._opname, x, w, ps[0], constituents=ps,
                             composed=not tracer.is_view_chain(w), weight_first=p0 is not None)
        if (p0 is None) == (p1 is None):
            return None  # activation × activation, or weight × weight
        w, x, p = (a0, a1, p0) if p0 is not None else (a1, a0, p1)
        if tracer.params[p].dim() < 2 and ("val" not in w.meta or w.meta["val"].dim() < 2):
            return Unsupported(node, t._opname, tracer.weight_params(w),
                               "a vector parameter in a matmul")
        return _layer(node, "matmul", t._opname, x, w, tracer, weight_first=p0 is not None)
    if t in EINSUM:
        from .ops.fa import parse_einsum
        eq, operands = node.args[0], list(node.args[1])
        ps = [tracer.weight_of(o) for o in operands]
        if len(operands) != 2 or (ps[0] is None) == (ps[1] is None):
            if any(ps) and any(tracer.reads_input.get(o, False) for o in operands):
                return Unsupported(node, "einsum", [p for p in ps if p],
                                   "einsum needs exactly one weight and one activation operand")
            return None
        if parse_einsum(eq) is None:
            return Unsupported(node, "einsum", [p for p in ps if p],
                               f"einsum equation {eq!r} (implicit output, '...' or repeated index)")
        wf = ps[0] is not None
        w, x = (operands[0], operands[1]) if wf else (operands[1], operands[0])
        return _layer(node, "einsum", "einsum", x, w, tracer, equation=eq, weight_first=wf)
    if t._opname in GROUPED_MM_NAMES:
        return _grouped_mm(node, tracer)
    return _maybe_unsupported(node, tracer)


def _grouped_mm(node: fx.Node, tracer: WeightTracer):
    """x [rows, in] @ W [E, in, out] with offsets: the MoE experts' form (torch's _grouped_mm,
    transformers' grouped_mm_fallback)."""
    a = bind(node)
    names = [arg.name for arg in node.target._schema.arguments]
    x, w = a[names[0]], a[names[1]]
    offs = a.get("offs", a.get(names[2]) if len(names) > 2 else None)
    if tracer.weight_of(w) is None or tracer.weight_of(x) is not None:
        return _maybe_unsupported(node, tracer)
    why = None
    if a.get("bias") is not None or a.get("out_dtype") is not None:
        why = "grouped_mm with a bias or out_dtype"
    elif offs is None or not isinstance(offs, fx.Node):
        why = "grouped_mm without offsets"
    else:
        xv, wv = x.meta.get("val"), w.meta.get("val")
        if xv is not None and wv is not None and (xv.dim() != 2 or wv.dim() != 3):
            why = f"grouped_mm of a {xv.dim()}-D input and a {wv.dim()}-D weight (FA covers 2-D x 3-D)"
    if why:
        return Unsupported(node, node.target._opname, tracer.weight_params(w), why)
    return _layer(node, "grouped_mm", "grouped_mm", x, w, tracer, offs=offs)


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


def _is_index(node: fx.Node) -> bool:
    """An integer or boolean tensor (indices, masks): no gradient flows through it."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and not (val.is_floating_point() or val.is_complex())


def _is_size(node: fx.Node) -> bool:
    """A shape value (x.size(0), sym_size, x.shape): it carries no data and no gradient."""
    if node.op == "placeholder":
        return False
    val = node.meta.get("val")
    if val is not None:
        vals = val if isinstance(val, (list, tuple)) else [val]
        return bool(vals) and all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)
                                  for v in vals)
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "ndim")
    return "sym_size" in str(node.target) or "sym_numel" in str(node.target)


def _maybe_unsupported(node: fx.Node, tracer: WeightTracer):
    """Ops that take an activation and a weight but are not linear maps we rewrite. Matmul-like
    ops are always reported (a weight there would silently train by backprop); other ops only
    when they are not elementwise/indexing/norm ops, whose parameters learn locally."""
    if not tracer.reads_input.get(node, False):
        return None
    # An input size alone (x.shape[0] in `cls.expand(B, -1, -1)`) is not an activation.
    if not any(tracer.reads_input.get(i, False) and not _is_size(i) for i in node.all_input_nodes):
        return None
    name = op_name(node)
    base = name.rstrip("_")
    matmul_like = base in MATMUL_LIKE or node.target in RECURRENT
    ps = sorted({p for i in node.all_input_nodes
                 for p in (tracer.weight_params(i) or tracer.gathered_params(i) or [])
                 if matmul_like or tracer.params[p].dim() >= 2})
    if not ps:
        return None
    if node.target in RECURRENT or base in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        return Unsupported(node, name, ps, "recurrent layer: kept on backprop (FA not implemented "
                                           "for its fused kernel)")
    if not matmul_like and (name.startswith(LOCAL_PREFIXES) or base in LOCAL_OPS):
        return None
    t = node.target
    where = "" if not isinstance(t, torch._ops.OpOverload) else \
        "aten." if t.namespace == "aten" else f"{t.namespace}::"
    return Unsupported(node, name, ps, f"{where}{name} is not a linear map salcompile rewrites")
