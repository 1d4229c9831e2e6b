"""PassContext: what the pipeline knows when a pass runs.

Every pass is `pass(gm, ctx) -> gm`. salcompile.pipeline builds one context per transform() and
hands it to each pass in order; the analysis fills `plan`, `specs`, `tracer` and `head`,
find_regions fills `regions` and insert_gates `routes`. A pass reads what it needs from it and
records what later passes need on it, never in module globals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch.fx as fx

if TYPE_CHECKING:   # annotations only: the context holds what these modules build
    from salcompile.config import SALConfig
    from salcompile.layers import LayerSpec, WeightTracer
    from salcompile.plan import Plan
    from salcompile.passes.find_regions import Region


@dataclass
class PassContext:
    config: "SALConfig"
    capture: str = ""                                   # how the model was captured
    plan: Optional["Plan"] = None                       # the printable plan (plan.analyse)
    specs: List["LayerSpec"] = field(default_factory=list)   # layers in graph order
    tracer: Optional["WeightTracer"] = None             # parameter dataflow facts
    head: Optional["LayerSpec"] = None                  # the layer that produces the output
    regions: List["Region"] = field(default_factory=list)    # find_regions
    routes: Dict[str, Tuple[fx.Node, fx.Node]] = field(default_factory=dict)  # insert_gates:
    # {gate name: (area node, anchor node)}
