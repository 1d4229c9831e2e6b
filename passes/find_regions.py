"""Regions (DESIGN §1): which layers share a gate, and what each gated layer becomes.

Default regions:
- one region holding every eligible layer except the output layers, its gate reading the input of
  the first;
- for sequence models (attention in the graph, or layers over [batch, seq, features]), one region
  per MLP/FFN block — linear layers chained through f(0)=0 elementwise ops and through products
  that keep area sparsity (gated MLPs: down(act(gate(x)) * up(x)); the tanh GELU) — with
  attention projections left un-gated.
`SALConfig.gate_layers` (name patterns or a predicate) chooses the layers instead.

Output layers — every layer whose output reaches a model output with no other layer in between
(the plan's role "head": logits, auxiliary heads) — are never partitioned by the default regions:
they keep a dense output and read only the area block of an area-sparse input (mode "exit"). In
partition mode a chain's layers that feed another layer of the chain are partitioned, the others
are exits; exits are found by the sparsity analysis. In replicate mode every region layer holds K
copies.

A region never spans an op that changes the rows its gate routes (a mean over tokens, a
reshape/flatten/transpose of the leading dims): a layer whose input rows differ joins the first
region whose gate routes its rows, or starts one of its own (a plan note says so). Widths come
from the weight operand the layer computes with (t(W), W[:n], ...), not from the parameter.
When areas > 1 and nothing can be gated, the plan gets the note "no SAL region: <reason>" and the
pipeline warns. This pass reads the graph, fills the plan's area fields and returns the regions;
it changes nothing.
"""
from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from salcompile.config import SALConfig
from salcompile.errors import SalcompileError
from salcompile.layers import LayerSpec, WeightTracer

from .analyse_sparsity import (SparseState, analyse_sparsity, is_product, same_shape,
                               tensor_operand, zero_preserving)
from .context import PassContext

# symbolic_trace leaves unknown shapes: a linear's input is then routed per row of its last dim.
_POOL_CELLS = {1: 4, 2: 4, 3: 2}  # φ for conv inputs: adaptive average pool to this size per dim


@dataclass
class Region:
    gate: str                      # gate name, also its module path under sal_gates
    layers: List[LayerSpec]        # partitioned / replicated layers, graph order
    reads: fx.Node                 # the activation the gate routes on
    route_by: str                  # "sample" | "token"
    phi: str                       # "identity" | "flatten" | "pool<n>d"
    features: int                  # width of φ(reads)
    exits: List[LayerSpec] = field(default_factory=list)


def _val(node):
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if hasattr(v, "shape") else None


def _is_conv(spec: LayerSpec) -> bool:
    return spec.kind == "conv" and not spec.conv["transposed"]


def operand_shape(gm: fx.GraphModule, w: fx.Node,
                  tracer: Optional[WeightTracer] = None) -> Optional[Tuple[int, ...]]:
    """The shape of a weight operand as the layer uses it (t(W), W[:n], W[:, :n]...): its shape
    metadata, else the parameter it reads directly, else the value of its chain of ops computed
    from the parameters. None when none of these is available."""
    v = _val(w)
    if v is not None:
        return tuple(v.shape)
    if not isinstance(w, fx.Node):
        return None
    if w.op == "get_attr":
        try:
            return tuple(operator.attrgetter(w.target)(gm).shape)
        except AttributeError:
            return None
    try:
        tracer = tracer if tracer is not None else WeightTracer(gm)
        return tuple(tracer.evaluate(gm, w).shape)
    except Exception:   # a chain that cannot run on its own: no shape
        return None


def weight_shape(gm: fx.GraphModule, spec: LayerSpec, tracer: WeightTracer) -> Tuple[int, ...]:
    """The layer's weight operand shape ([out, in] for linear, [out, in/groups, ...] for conv)."""
    shape = operand_shape(gm, spec.weight, tracer)
    return shape if shape is not None else tuple(tracer.params[spec.param].shape)


def eligibility(spec: LayerSpec, tracer: WeightTracer, uses: Dict[str, int],
                config: SALConfig) -> Optional[str]:
    """None when the layer can become an area op, else why not."""
    if not (spec.op == "linear" or _is_conv(spec)):
        return f"{spec.op} layers have no area form (linear and convolution layers do)"
    if getattr(spec, "composed", False):
        return "its weight is composed from several parameters"
    if uses[spec.param] > 1:
        return "its weight is shared with another layer"
    x = _val(spec.x)
    if _is_conv(spec) and x is not None and x.dim() != len(spec.conv["stride"]) + 2:
        return "unbatched convolution input"
    if config.area_mode == "replicate":
        if spec.weight.op != "get_attr":
            return "replicate mode needs the weight used directly (not through a view)"
        if spec.bias is not None and (spec.bias.op != "get_attr" or uses[spec.bias.target] > 1):
            return "replicate mode needs a bias parameter of its own"
    if _is_conv(spec):
        g = spec.conv["groups"]
        if g > 1 and g % config.areas:
            return f"grouped convolution with groups={g} not divisible by K={config.areas}"
    return None


def _selected(name: str, param: str, gate_layers) -> bool:
    if callable(gate_layers):
        return bool(gate_layers(name))
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(param, p) for p in gate_layers)


def is_sequence_model(gm: fx.GraphModule, specs: List[LayerSpec]) -> bool:
    for n in gm.graph.nodes:
        target = getattr(n.target, "__name__", str(n.target))
        if "scaled_dot_product" in target or "multi_head_attention" in target:
            return True
        if n.op == "call_module" and "MultiheadAttention" in type(gm.get_submodule(n.target)).__name__:
            return True
    return any((v := _val(s.x)) is not None and v.dim() >= 3 for s in specs if s.kind == "linear")


def _reach(gm: fx.GraphModule, layers: List[LayerSpec]) -> Dict[fx.Node, frozenset]:
    """{value: indices of the layers whose outputs reach it} through the ops that keep area
    sparsity (analyse_sparsity's rules, before it is known which layers are partitioned): f(0)=0
    elementwise ops, and products of two reached values or of a reached value and anything that
    leaves its shape unchanged."""
    index = {s.node: i for i, s in enumerate(layers)}
    reach: Dict[fx.Node, frozenset] = {}
    for n in gm.graph.nodes:
        if n in index:
            reach[n] = frozenset([index[n]])
        elif is_product(n):
            a, b = n.args
            ra, rb = reach.get(a), reach.get(b)
            if ra and rb:
                reach[n] = ra | rb
            elif ra and same_shape(a, n):
                reach[n] = ra
            elif rb and same_shape(b, n):
                reach[n] = rb
        elif zero_preserving(gm, n):
            x = tensor_operand(n)
            if x in reach:
                reach[n] = reach[x]
    return reach


def _chains(gm: fx.GraphModule, layers: List[LayerSpec]
            ) -> Tuple[List[List[LayerSpec]], Set[fx.Node]]:
    """Group linear layers whose output reaches the next one's input through ops that keep area
    sparsity. Returns the groups and the layers that feed another layer of their group."""
    reach = _reach(gm, layers)
    parent = list(range(len(layers)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    feeds: Set[fx.Node] = set()
    for j, s in enumerate(layers):
        for i in reach.get(s.x, ()):
            if i != j:
                feeds.add(layers[i].node)
                parent[find(i)] = find(j)
    groups: Dict[int, List[LayerSpec]] = {}
    for i, s in enumerate(layers):
        groups.setdefault(find(i), []).append(s)
    return list(groups.values()), feeds


def _route(gm: fx.GraphModule, spec: LayerSpec, tracer: WeightTracer, config: SALConfig):
    """(route_by, φ, features) for a gate reading `spec`'s input."""
    v = _val(spec.x)
    # without shape metadata (symbolic_trace) the weight operand gives the input width
    w_shape = weight_shape(gm, spec, tracer)
    if _is_conv(spec):
        if config.route_by == "token":
            raise SalcompileError(f"route_by='token' needs sequence activations; layer {spec.param} "
                                  "is a convolution (route_by='sample' or 'auto').")
        nd = len(spec.conv["stride"])
        channels = int(v.shape[1]) if v is not None else None
        if channels is None:
            raise SalcompileError("a gate before a convolution needs tensor shapes: pass "
                                  "example_inputs=(x,) to transform().")
        return "sample", f"pool{nd}d", channels * _POOL_CELLS[nd] ** nd
    if v is None or v.dim() <= 2 or config.route_by == "token" or (
            config.route_by == "auto" and v.dim() >= 3):
        width = int(v.shape[-1]) if v is not None else int(w_shape[-1] if w_shape else 0)
        return ("token" if v is not None and v.dim() >= 3 else "sample"), "identity", width
    rest = v.shape[1:]
    if not all(isinstance(d, int) for d in rest):
        raise SalcompileError(f"route_by='sample' flattens {list(v.shape)} at layer {spec.param}; "
                              "only the batch dimension may vary.")
    return "sample", "flatten", int(math.prod(rest))


# ---------------------------------------------------------------- rows
# Without shapes (symbolic_trace), ops known to keep the leading dims (the rows) of their tensor
# inputs; anything else may change them.
_ROWWISE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
                      torch.sub, torch.mul, torch.div, torch.sigmoid, F.sigmoid, torch.exp,
                      F.softplus, F.layer_norm}
_ROWWISE_METHODS = {"add", "sub", "mul", "div", "sigmoid", "exp"}
_ROWWISE_MODULES = (nn.Sigmoid, nn.Softplus, nn.LayerNorm)
_ROWWISE_ATEN = {"linear", "add", "sub", "mul", "div", "sigmoid", "exp", "layer_norm"}


def _row_inputs(gm: fx.GraphModule, n: fx.Node) -> List[fx.Node]:
    """The tensor inputs whose rows `n`'s output has, [] when `n` may change the rows."""
    tensors = [a for a in n.args if isinstance(a, fx.Node)]
    if zero_preserving(gm, n):
        x = tensor_operand(n)
        return [x] if x is not None else []
    t = n.target
    if n.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        if t._opname == "linear":
            return tensors[:1]
        ok = t._opname in _ROWWISE_ATEN
    elif n.op == "call_function":
        if t in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
            return tensors[:1] if dim == -1 else []
        ok = t in _ROWWISE_FUNCTIONS
    elif n.op == "call_method":
        ok = t in _ROWWISE_METHODS
    elif n.op == "call_module":
        mod = gm.get_submodule(t)
        ok = isinstance(mod, _ROWWISE_MODULES) or (isinstance(mod, nn.Softmax) and mod.dim == -1)
    else:
        ok = False
    return tensors if ok else []


def _same_rows(gm: fx.GraphModule, reads: fx.Node, route, spec: LayerSpec) -> bool:
    """Whether the gate of `route` reading `reads` routes exactly the rows of `spec`'s input."""
    x = spec.x
    if x is reads:
        return True
    _, phi, _ = route
    xv, rv = _val(x), _val(reads)
    if xv is not None and rv is not None:
        lead = [str(d) for d in (rv.shape[:-1] if phi == "identity" else rv.shape[:1])]
        row_dims = 1 if _is_conv(spec) else xv.dim() - 1
        return len(lead) <= row_dims and [str(d) for d in xv.shape[:len(lead)]] == lead
    seen, stack = set(), [x]
    while stack:   # a path from reads to x through row-keeping ops only
        n = stack.pop()
        if n is reads:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(_row_inputs(gm, n))
    return False


def _split_rows(gm, group: List[LayerSpec], tracer: WeightTracer, config: SALConfig):
    """[(route, layers)]: each layer joins the first part whose gate routes its rows."""
    parts: List[Tuple[tuple, List[LayerSpec]]] = []
    for s in group:
        for route, members in parts:
            if _same_rows(gm, members[0].x, route, s):
                members.append(s)
                break
        else:
            parts.append((_route(gm, s, tracer, config), [s]))
    return parts


# ---------------------------------------------------------------- regions
def find_regions(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Records the regions (which layers each gate routes) as ctx.regions."""
    ctx.regions = regions_of(gm, ctx.specs, ctx.plan, ctx.tracer, ctx.head, ctx.config)
    return gm


def regions_of(gm: fx.GraphModule, specs: List[LayerSpec], plan, tracer: WeightTracer,
               head: Optional[LayerSpec], config: SALConfig) -> List[Region]:
    uses: Dict[str, int] = {}  # how many layers read each weight / bias parameter
    for s in specs:
        for name in (s.param, s.bias.target if s.bias is not None and s.bias.op == "get_attr"
                     else None):
            if name is not None:
                uses[name] = uses.get(name, 0) + 1
    entries = {s.node: e for s, e in zip(specs, plan.layers)}
    # every output layer (plan role "head"); `head` is the one DFA uses, always among them
    outputs = {s.node for s in specs if entries[s.node].role == "head"}
    if head is not None:
        outputs.add(head.node)
    why = {s.node: eligibility(s, tracer, uses, config) for s in specs}
    eligible = [s for s in specs if why[s.node] is None]
    sequence = is_sequence_model(gm, specs)
    partition = config.area_mode == "partition"
    if config.gate_layers is not None:
        chosen = [s for s in specs if _selected(entries[s.node].name, s.param, config.gate_layers)]
        bad = [(s, why[s.node]) for s in chosen if why[s.node] is not None]
        if bad:
            s, reason = bad[0]
            raise SalcompileError(f"gate_layers selects layer {entries[s.node].name}, which cannot be "
                                  f"gated: {reason}. Leave it out of gate_layers.")
        if not chosen:
            raise SalcompileError(f"gate_layers={config.to_dict()['gate_layers']} matches no layer; "
                                  f"layers: {[e.name for e in plan.layers]}.")
        groups = _chains(gm, [s for s in chosen if s.kind == "linear"])[0] + \
            [[s] for s in chosen if s.kind != "linear"] if sequence else [chosen]
    elif sequence:
        chains, feeds = _chains(gm, [s for s in eligible if s.kind == "linear"])
        # partition: the layers feeding another layer of their chain (the others, and output
        # layers, read the area block: exits); replicate: every layer but the output layers
        groups = [[s for s in c if s.node not in outputs and (s.node in feeds or not partition)]
                  for c in chains if len(c) >= 2]
    else:
        groups = [[s for s in eligible if s.node not in outputs]]
    groups = [sorted(g, key=lambda s: specs.index(s)) for g in groups if g]
    groups.sort(key=lambda g: specs.index(g[0]))

    regions = []
    for group in groups:
        first = len(regions)
        for i, (route, part) in enumerate(_split_rows(gm, group, tracer, config)):
            name = f"gate_{len(regions)}"
            for s in part:
                _check_width(entries[s.node], weight_shape(gm, s, tracer), config)
            if i:
                plan.notes.append(
                    f"region {name} starts at {entries[part[0].node].name}: its input rows differ "
                    f"from those {regions[first].gate} routes (an op between them changes the "
                    "rows)")
            route_by, phi, features = route
            regions.append(Region(name, part, part[0].x, route_by, phi, features))
    if not regions and config.areas > 1:
        plan.notes.append("no SAL region: " + _no_region_reason(specs, entries, why, outputs,
                                                                sequence))
    _assign(gm, specs, plan, regions, eligible, config)
    return regions


def _names(specs, entries, most: int = 4) -> str:
    names = [entries[s.node].name for s in specs]
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _no_region_reason(specs, entries, why, outputs, sequence) -> str:
    if not specs:
        return "the model has no weight-carrying layer"
    inner = [s for s in specs if s.node not in outputs]
    if not inner:
        return (f"its only layers are output layers ({_names(specs, entries)}), which keep a "
                "dense output")
    ok = [s for s in inner if why[s.node] is None]
    if not ok:
        s = inner[0]
        return (f"no layer besides the output layers can take areas ({entries[s.node].name}: "
                f"{why[s.node]}" + (f"; {len(inner) - 1} more" if len(inner) > 1 else "") + ")")
    if sequence:
        no = [s for s in inner if why[s.node] is not None]
        return (f"a sequence model whose eligible linear layers ({_names(ok, entries)}) form no "
                "MLP/FFN block (linear layers chained through activations or products); "
                "attention projections stay un-gated"
                + (f"; {entries[no[0].node].name} cannot take areas: {why[no[0].node]}" if no
                   else ""))
    return "no layer can take areas"


def _check_width(entry, shape, config: SALConfig) -> None:
    width = shape[0]  # output features / channels of the operand (weights are [out, in, ...])
    if config.area_mode == "partition" and width % config.areas:
        raise SalcompileError(
            f"layer {entry.name} has {width} outputs, not divisible by K={config.areas} areas. Choose K "
            f"dividing {width}, or leave the layer out with SALConfig(gate_layers=[...]).")


def _assign(gm, specs, plan, regions, eligible, config) -> None:
    """Fill each layer's plan entry (gate, area mode, the sparsity state of its input) and find
    the exits: eligible layers outside any region whose input is area-sparse."""
    entries = {s.node: e for s, e in zip(specs, plan.layers)}
    sources = {}
    for r in regions:
        for s in r.layers:
            e = entries[s.node]
            e.gate, e.area_mode = r.gate, config.area_mode
            if config.area_mode == "partition":
                sources[s.node.name] = SparseState(r.gate, 1 if _is_conv(s) else -1)
    states = analyse_sparsity(gm, sources)
    gated = {s.node for r in regions for s in r.layers}
    by_gate = {r.gate: r for r in regions}
    for s in specs:
        e = entries[s.node]
        st = states.get(s.x.name)
        reads_block = st is not None and st.dim == (1 if _is_conv(s) else -1)
        e.sees = str(st) if st is not None else "dense"
        if s.node in gated:
            e.input_block = reads_block and st.gate == e.gate
        elif reads_block and s in eligible and not (_is_conv(s) and s.conv["groups"] > 1):
            e.gate, e.area_mode, e.input_block = st.gate, "exit", True
            by_gate[st.gate].exits.append(s)
    plan.regions = [dict(gate=r.gate, layers=[entries[s.node].name for s in r.layers],
                         exits=[entries[s.node].name for s in r.exits], reads=r.reads.name,
                         route_by=r.route_by, features=r.features, phi=r.phi) for r in regions]
