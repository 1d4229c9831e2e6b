"""Analysis: one walk over the graph builds a Plan, a plain printable value the passes read.

The graph is mirrored into a networkx DiGraph (the dataflow the analysis reasons about): which
layers reach the output (the head), which activations need an error signal (DFA taps).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import networkx as nx
import torch
import torch.fx as fx

from .config import SALConfig
from .errors import SalcompileError
from .layers import LayerSpec, Unsupported, WeightTracer, op_name, recognise


@dataclass
class LayerEntry:
    name: str          # qualified name of the layer (module path, or the node for functional calls)
    op: str            # linear, conv2d, conv_transpose1d, matmul, bmm, einsum...
    weight: str        # qualified name of the parameter
    shape: List[int]   # the parameter's shape
    feedback: str      # the rule's name (salcompile/feedback/): fa, dfa, bp, usf, brsf, frsf, kp
    role: str          # hidden | head
    node: str          # FX node name
    via: str = ""      # ops between the parameter and the layer (t, chunk...), mirrored onto B
    feedback_buffer: str = ""  # qualified name of its B (FA) or D (DFA) buffer
    feedback_bound: float = 0.0  # 1/sqrt(fan_in): the scale of a rule's derived B (usf, brsf)
    gate: str = ""     # the gate routing it (SAL areas), "" when un-gated
    area_mode: str = ""  # partition | replicate | exit (dense output, reads its input's area block)
    input_block: bool = False  # reads only the area block of its (area-sparse) input
    sees: str = ""     # sparsity state of its input: dense | area-sparse(<gate>)
    constituents: List[str] = field(default_factory=list)  # parameters of a composed weight
    shared: int = 0      # shared dense path: outputs every row computes (SALConfig.shared_fraction)
    shared_in: int = 0   # input columns it reads densely (the layer before's shared outputs)
    parts: List[str] = field(default_factory=list)  # shared path: the nodes on weight slices


@dataclass
class FallbackEntry:
    name: str
    op: str
    weights: List[str]
    reason: str
    node: str


@dataclass
class Plan:
    capture: str
    config: Dict
    layers: List[LayerEntry] = field(default_factory=list)
    backprop: List[FallbackEntry] = field(default_factory=list)
    dfa_taps: List[str] = field(default_factory=list)
    regions: List[Dict] = field(default_factory=list)  # gate, layers, exits, reads, route_by, ...
    # every parameter of the transformed module -> "layer" (its weight, or a constituent of a
    # composed one, trains by the feedback rule), "local" (true local gradient: bias, norm affine,
    # embedding, gate projection), "feedback" (Kolen-Pollack's trainable B), "backprop" (listed
    # in `backprop` with the reason), "frozen"
    roles: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)  # e.g. "no SAL region: <reason>"

    @property
    def head(self) -> Optional[LayerEntry]:
        # the last output layer: the one DFA delivers its error from (analyse's `head`)
        return next((l for l in reversed(self.layers) if l.role == "head"), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        return cls(capture=d["capture"], config=d["config"],
                   layers=[LayerEntry(**l) for l in d["layers"]],
                   backprop=[FallbackEntry(**f) for f in d["backprop"]],
                   dfa_taps=list(d.get("dfa_taps", [])), regions=list(d.get("regions", [])),
                   roles=dict(d.get("roles", {})), notes=list(d.get("notes", [])))

    def __str__(self) -> str:
        c = self.config
        lines = [f"salcompile plan  (captured by {self.capture}; feedback={c.get('feedback')}, "
                 f"init={c.get('feedback_init')}, scale={c.get('feedback_scale')}, "
                 f"seed={c.get('feedback_seed')}, areas={c.get('areas')}"
                 + (f" {c.get('area_mode')}" if self.regions else "")
                 + (f", top-{c['route_top_k']} routing" if c.get("route_top_k", 1) > 1 else "")
                 + (f", shared {c['shared_fraction']:g}" if c.get("shared_fraction") else "")
                 + ")"]
        rows = [("layer", "op", "weight", "shape", "feedback", "role")]
        if self.regions:
            rows[0] += ("gate", "area", "input")
        for l in self.layers:
            w = l.weight + (f" via {l.via}" if l.via else "")
            others = [c for c in l.constituents if c != l.weight]
            if others:
                w += f" (composed with {', '.join(others)})"
            row = (l.name, l.op, w, "x".join(map(str, l.shape)), l.feedback, l.role)
            if self.regions:
                area = l.area_mode + (" (reads block)" if l.input_block and l.area_mode != "exit"
                                      else "")
                if l.shared or l.shared_in:
                    area += f" (shared {l.shared} out, {l.shared_in} in)"
                row += (l.gate or "-", area or "-", l.sees or "dense")
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  " + "  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip())
        if not self.layers:
            lines.append("  (no weight-carrying linear maps found)")
        if self.backprop:
            lines.append("left on backprop:")
            for f in self.backprop:
                lines.append(f"  {f.name} ({f.op}; {', '.join(f.weights)}): {f.reason}")
        for r in self.regions:
            lines.append(f"region {r['gate']}: routes per {r['route_by']} on {r['reads']} "
                         f"(φ={r['phi']}, {r['features']} features) → {', '.join(r['layers'])}"
                         + (f"; exits: {', '.join(r['exits'])}" if r["exits"] else ""))
        if self.roles:
            counts = {r: sum(1 for v in self.roles.values() if v == r)
                      for r in ("layer", "feedback", "local", "backprop", "frozen")}
            lines.append("parameters: " + ", ".join(f"{n} {r}" for r, n in counts.items() if n))
        rule = _rule_line(c.get("feedback"))
        if rule and self.layers:
            lines.append(rule)
        lines.extend(self.notes)
        if self.dfa_taps:
            lines.append(f"DFA taps (activations receiving e·D): {', '.join(self.dfa_taps)}")
        return "\n".join(lines)

    __repr__ = __str__


def dataflow_graph(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n.name)
        for i in n.all_input_nodes:
            g.add_edge(i.name, n.name)
    return g


def layer_name(node: fx.Node, param: str) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return path.replace("L['self'].", "").replace("L__self___", "")
    if node.op == "call_function" and "." in param:
        return param.rsplit(".", 1)[0]
    return node.name


def output_layers(output: fx.Node, layers) -> set:
    """The layer nodes whose output reaches the model output with no other layer in between (every
    output head: logits, auxiliary heads, returned hidden projections). Never partitioned."""
    found, seen, stack = set(), set(), list(output.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in layers:
            found.add(n)
        else:
            stack.extend(n.all_input_nodes)
    return found


def analyse(gm: fx.GraphModule, config: SALConfig, capture: str):
    """Return (plan, specs, tracer, head): the printable plan, and the node-level facts the
    feedback passes use (layer specs in graph order, the dataflow tracer, the head's spec)."""
    tracer = WeightTracer(gm)
    specs: List[LayerSpec] = []
    unsupported: List[Unsupported] = []
    for n in gm.graph.nodes:
        r = recognise(n, tracer, gm)
        if isinstance(r, LayerSpec):
            specs.append(r)
        elif isinstance(r, Unsupported):
            unsupported.append(r)
    for spec in specs:
        val = spec.x.meta.get("val")
        if isinstance(val, torch.Tensor) and not (val.is_floating_point() or val.is_complex()):
            raise SalcompileError(
                f"layer {layer_name(spec.node, spec.param)} receives {val.dtype} values: a "
                f"{spec.op} layer needs floating-point input. Cast the example input (x.float()) "
                "or, for token ids, feed them through an nn.Embedding first.")
    flow = dataflow_graph(gm.graph)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    reaching = nx.ancestors(flow, output.name)
    head = next((s for s in reversed(specs) if s.node.name in reaching), None)
    heads = output_layers(output, {s.node for s in specs})
    plan = Plan(capture=capture, config=config.to_dict())
    for s in specs:
        via = [op_name(c) for c in tracer.chain(s.weight)]
        plan.layers.append(LayerEntry(
            name=layer_name(s.node, s.param), op=s.op, weight=s.param,
            shape=list(tracer.params[s.param].shape), feedback=config.feedback,
            role="head" if s.node in heads else "hidden", node=s.node.name, via=".".join(via),
            constituents=list(s.constituents) if s.composed else []))
    for u in unsupported:
        plan.backprop.append(FallbackEntry(name=layer_name(u.node, u.params[0]), op=u.op,
                                           weights=u.params, reason=u.reason, node=u.node.name))
    return plan, specs, tracer, head


def _rule_line(name) -> str:
    """One line on what the rule reads, for a reader of a result (which information crossed)."""
    from . import feedback
    try:
        rule = feedback.get(name)
    except KeyError:
        return ""
    if rule.family != "fa" or rule.name == "fa":
        return ""
    line = f"feedback {rule.name}: {rule.summary}"
    if rule.reads_weight:
        line += " (its backward reads the signs of W)"
    return line
