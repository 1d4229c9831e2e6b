"""meta["val"] for the nodes passes insert: the fake tensor each one computes.

The capture (torch.export) gives every node a fake `meta["val"]`; the pipeline calls `fill_vals`
after each pass, so the nodes a pass inserted carry one too and later passes read shapes and
dtypes there instead of re-deriving them (inductor keeps meta["val"] true the same way, with
FakeTensorUpdater). A node whose value cannot be computed from its inputs' fake tensors (no fake
mode: a symbolic_trace capture has none) is left without one.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode


def fake_val(target, args, kwargs=None) -> Optional[Any]:
    """meta["val"] for a call of `target`, computed on the fake tensors of its inputs (None when
    an input has none)."""
    vals = []

    def val(a):
        if isinstance(a, fx.Node):
            v = a.meta.get("val")
            if v is None:
                raise KeyError
            vals.append(v)
            return v
        return a
    try:
        fa = fx.node.map_aggregate(args, val)
        fk = fx.node.map_aggregate(kwargs or {}, val)
    except KeyError:
        return None
    mode = detect_fake_mode(vals)
    if mode is None:
        return None
    with mode:
        return target(*fa, **fk)


def _same(a, b) -> bool:
    """Same shapes and dtypes (None, a tensor, or a tuple/list of them)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape
    return a is None and b is None


def fill_vals(gm: fx.GraphModule) -> None:
    """Give every node without `meta["val"]` the fake value of its call (get_attr: the attribute
    as a fake tensor), in graph order, under the graph's fake mode. A get_attr whose value no
    longer matches its attribute (make_area_ops' replicate copies change a weight's shape) is
    refreshed, and so is everything computed from it. In place; best effort."""
    mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes
                             if isinstance(n.meta.get("val"), torch.Tensor)])
    if mode is None:
        return
    stale = set()
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        try:
            if n.op == "get_attr":
                v = operator.attrgetter(n.target)(gm)
                old = n.meta.get("val")
                if isinstance(v, torch.Tensor) and not (
                        isinstance(old, torch.Tensor) and old.shape == v.shape
                        and old.dtype == v.dtype):
                    n.meta["val"] = mode.from_tensor(v, static_shapes=True)
                    if old is not None:
                        stale.add(n)
            elif n.op == "call_function" and ("val" not in n.meta
                                              or stale.intersection(n.all_input_nodes)):
                old = n.meta.get("val", None)
                n.meta["val"] = fake_val(n.target, n.args, n.kwargs)
                if "val" in n.meta and not _same(old, n.meta["val"]):
                    stale.add(n)   # what reads it is recomputed too
        except Exception:   # a data-dependent or host-reading op: leave it without a value
            n.meta.pop("val", None)
