"""Insert one region gate per region (DESIGN §1 "Region gate").

Each gate is a small module under `sal_gates.<gate>`: `proj` (P, route_dim × features, trained by
the gate's local rule), `prototypes` (K × route_dim fixed unit vectors, a persistent buffer) and
`counts` (rows routed to each area since the last reset; not saved). In the graph, before the
region's first layer:  features = φ(detach(h));  area, anchor = region_gate(features, P, C);
count_routes(area, counts). Area ops read `area` and `anchor`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import operator

import torch
import torch.fx as fx
from torch import nn

from salcompile.config import SALConfig
from salcompile.validate import check_memory
from salcompile.feedback_init import _generator, draw_uniform
from salcompile.layers import WeightTracer

from .find_regions import _POOL_CELLS, Region
from .context import PassContext

aten = torch.ops.aten
ops = torch.ops.salcompile
GATES = "sal_gates"


class RegionGate(nn.Module):
    """Holds one gate's state; the routing itself is the graph's salcompile::region_gate call."""

    def __init__(self, proj: torch.Tensor, prototypes: torch.Tensor):
        super().__init__()
        self.proj = nn.Parameter(proj)
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("counts", torch.zeros(prototypes.shape[0], dtype=torch.float64,
                                                   device=prototypes.device), persistent=False)


def make_prototypes(k: int, dim: int, seed: int, key: str, like: torch.Tensor) -> torch.Tensor:
    if like.is_meta:
        return torch.empty(k, dim, dtype=like.dtype, device="meta")
    c = torch.randn(k, dim, dtype=torch.float64, generator=_generator(seed, key))
    c = c / c.norm(dim=1, keepdim=True)
    return c.to(dtype=like.dtype, device=like.device)


def _phi(g: fx.Graph, h: fx.Node, phi: str) -> fx.Node:
    f = g.call_function(aten.detach.default, (h,))  # no gradient from the gate into the network
    if phi == "flatten":
        f = g.call_function(aten.flatten.using_ints, (f, 1))
    elif phi.startswith("pool"):
        nd = int(phi[4])
        pool = {1: aten.adaptive_avg_pool1d.default, 2: aten.adaptive_avg_pool2d.default,
                3: aten.adaptive_avg_pool3d.default}[nd]
        f = g.call_function(aten.flatten.using_ints, (
            g.call_function(pool, (f, [_POOL_CELLS[nd]] * nd)), 1))
    return f


def _check_gate_memory(regions: List[Region], tracer: WeightTracer, config: SALConfig) -> None:
    """P (route_dim x features), the prototypes (K x route_dim, drawn in float64) and the counts
    of every gate, checked against the device's free memory before anything is allocated."""
    like = tracer.params[regions[0].layers[0].param]
    k, d = config.areas, config.route_dim
    nbytes = sum(d * r.features * like.element_size() + k * d * (8 + like.element_size()) + 8 * k
                 for r in regions)
    check_memory(nbytes, f"the gates of {len(regions)} region(s) (areas={k}, route_dim={d})",
                 like.device, fix="choose fewer areas or a smaller route_dim")


def insert_gates(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Records {gate: (area node, anchor node)} as ctx.routes."""
    gm, ctx.routes = _insert(gm, ctx.regions, ctx.tracer, ctx.config)
    return gm


def _insert(gm: fx.GraphModule, regions: List[Region], tracer: WeightTracer,
            config: SALConfig) -> Tuple[fx.GraphModule, Dict[str, Tuple[fx.Node, fx.Node]]]:
    if not regions:
        return gm, {}
    _check_gate_memory(regions, tracer, config)
    g = gm.graph
    holder = nn.Module()
    gm.add_submodule(GATES, holder)
    routes = {}
    for r in regions:
        like = tracer.params[r.layers[0].param]
        proj = draw_uniform((config.route_dim, r.features), r.features, config.routing_seed,
                            f"gate:{r.gate}", like)
        protos = make_prototypes(config.areas, config.route_dim, config.routing_seed,
                                 f"prototypes:{r.gate}", like)
        holder.add_module(r.gate, RegionGate(proj, protos))
        prefix = f"{GATES}.{r.gate}"
        with g.inserting_before(r.layers[0].node):
            feats = _phi(g, r.reads, r.phi)
            gate_args = (feats, g.get_attr(f"{prefix}.proj"), g.get_attr(f"{prefix}.prototypes"),
                         float(config.temperature), float(config.balance_weight))
            if config.route_top_k > 1:   # area: [..., k], each row's k best areas
                gate = g.call_function(ops.region_gate_topk.default,
                                       gate_args + (int(config.route_top_k),))
            else:
                gate = g.call_function(ops.region_gate.default, gate_args)
            area = g.call_function(operator.getitem, (gate, 0))
            anchor = g.call_function(operator.getitem, (gate, 1))
            g.call_function(ops.count_routes.default, (area, g.get_attr(f"{prefix}.counts")))
        routes[r.gate] = (area, anchor)
    g.lint()
    gm.recompile()
    return gm, routes
