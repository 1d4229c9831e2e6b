"""Regions (DESIGN §1): which layers share a gate, and what each gated layer becomes.

Default regions:
- one region holding every eligible layer except the head, its gate reading the input of the first;
- for sequence models (attention in the graph, or layers over [batch, seq, features]), one region
  per MLP/FFN block — linear layers chained through activations/dropout only — with attention
  projections left un-gated.
`SALConfig.gate_layers` (name patterns or a predicate) chooses the layers instead.

In partition mode a region's layers are partitioned, except a chain's last layer, which, like the
head, reads only the area block of its input (mode "exit"); exits are found by the sparsity
analysis. In replicate mode every region layer holds K copies. This pass reads the graph, fills
the plan's area fields and returns the regions; it changes nothing.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.fx as fx

from salcompile.config import SALConfig
from salcompile.errors import SalcompileError
from salcompile.layers import LayerSpec, WeightTracer

from .analyse_sparsity import SparseState, analyse_sparsity, zero_preserving

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


def eligibility(spec: LayerSpec, tracer: WeightTracer, uses: Dict[str, int],
                config: SALConfig) -> Optional[str]:
    """None when the layer can become an area op, else why not."""
    if not (spec.op == "linear" or _is_conv(spec)):
        return f"{spec.op} layers have no area form (linear and convolution layers do)"
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


def _chains(gm: fx.GraphModule, layers: List[LayerSpec]) -> List[List[LayerSpec]]:
    """Group linear layers whose output reaches the next one through f(0)=0 elementwise ops."""
    by_input: Dict[fx.Node, List[LayerSpec]] = {}
    for s in layers:
        by_input.setdefault(s.x, []).append(s)
    parent = {id(s): s for s in layers}

    def find(s):
        while parent[id(s)] is not s:
            s = parent[id(s)]
        return s

    for s in layers:
        frontier = [s.node]
        while frontier:
            n = frontier.pop()
            for nxt in by_input.get(n, []):
                if nxt is not s:
                    parent[id(find(nxt))] = find(s)
            frontier.extend(u for u in n.users if zero_preserving(gm, u))
    groups: Dict[int, List[LayerSpec]] = {}
    for s in layers:
        groups.setdefault(id(find(s)), []).append(s)
    return list(groups.values())


def _route(gm: fx.GraphModule, spec: LayerSpec, config: SALConfig):
    """(route_by, φ, features) for a gate reading `spec`'s input."""
    v = _val(spec.x)
    # without shape metadata (symbolic_trace) the parameter itself gives the input width
    w_shape = (tuple(spec.weight.meta["val"].shape) if _val(spec.weight) is not None
               else tuple(gm.get_parameter(spec.param).shape))
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


def find_regions(gm: fx.GraphModule, specs: List[LayerSpec], plan, tracer: WeightTracer,
                 head: Optional[LayerSpec], config: SALConfig) -> List[Region]:
    uses: Dict[str, int] = {}  # how many layers read each weight / bias parameter
    for s in specs:
        for name in (s.param, s.bias.target if s.bias is not None and s.bias.op == "get_attr"
                     else None):
            if name is not None:
                uses[name] = uses.get(name, 0) + 1
    entries = {s.node: e for s, e in zip(specs, plan.layers)}
    eligible = [s for s in specs if eligibility(s, tracer, uses, config) is None]
    sequence = is_sequence_model(gm, specs)
    if config.gate_layers is not None:
        chosen = [s for s in specs if _selected(entries[s.node].name, s.param, config.gate_layers)]
        bad = [(s, eligibility(s, tracer, uses, config)) for s in chosen if s not in eligible]
        if bad:
            s, why = bad[0]
            raise SalcompileError(f"gate_layers selects layer {entries[s.node].name}, which cannot be "
                                  f"gated: {why}. Leave it out of gate_layers.")
        if not chosen:
            raise SalcompileError(f"gate_layers={config.to_dict()['gate_layers']} matches no layer; "
                                  f"layers: {[e.name for e in plan.layers]}.")
        groups = _chains(gm, [s for s in chosen if s.kind == "linear"]) + \
            [[s] for s in chosen if s.kind != "linear"] if sequence else [chosen]
    elif sequence:
        linear = [s for s in eligible if s.kind == "linear" and s is not head]
        groups = [c for c in _chains(gm, linear) if len(c) >= 2]
    else:
        groups = [[s for s in eligible if s is not head]]
    groups = [sorted(g, key=lambda s: specs.index(s)) for g in groups if g]
    groups.sort(key=lambda g: specs.index(g[0]))

    regions = []
    for i, group in enumerate(groups):
        name = f"gate_{i}"
        if config.area_mode == "partition" and config.gate_layers is None and sequence:
            group = group[:-1]  # the chain's last layer reads the area block (an exit)
        for s in group:
            _check_width(entries[s.node], config)
        route_by, phi, features = _route(gm, group[0], config)
        regions.append(Region(name, group, group[0].x, route_by, phi, features))
    _assign(gm, specs, plan, regions, eligible, config)
    return regions


def _check_width(entry, config: SALConfig) -> None:
    width = entry.shape[0]  # output features / channels (weights are [out, in, ...])
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
