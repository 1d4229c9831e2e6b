"""The pipeline, in one place: capture → normalise → analyse → feedback pass → SALModule."""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from . import feedback as feedback_rules
from .capture import capture
from .config import SALConfig
from .errors import SalcompileError
from .module import SALModule
from .plan import Plan, analyse


def _passes():
    # Imported late: `passes` is installed as salcompile.passes, and imports salcompile modules.
    from . import passes
    return passes


def transform(model: nn.Module, example_inputs: Optional[Any] = None,
              config: Optional[SALConfig] = None, *, example_kwargs: Optional[dict] = None,
              **overrides: Any) -> SALModule:
    """Rewrite `model` so it trains with SAL. Returns a new module; `model` is left untouched.

    model: an nn.Module, or a torch.export.ExportedProgram (its example inputs are reused).
    example_inputs: a tuple of example arguments (a batch of 2 or more). Given, the model is captured
    with torch.export (handles attention, functional code); omitted, with torch.fx.symbolic_trace.
    A dict is taken as keyword inputs (as `example_kwargs`).
    example_kwargs: keyword example inputs (`{"input_ids": ids, "labels": y}`), torch.export's
    `kwargs`; the module is then called with the same keywords (ones given as None may be omitted).
    config / overrides: a SALConfig, and/or its fields as keywords (`feedback="dfa"`).
    """
    if config is not None and not isinstance(config, SALConfig):
        raise SalcompileError(f"config must be a salcompile.SALConfig, got {type(config).__name__}.")
    config = (config or SALConfig()).replace(**overrides) if overrides else (config or SALConfig())
    if isinstance(model, SALModule):
        raise SalcompileError("this module has already been transformed by salcompile; transform the "
                              "original model instead.")
    p = _passes()
    original_keys = _state_keys(model)
    gm, how = capture(model, example_inputs, example_kwargs)
    gm = p.functionalize_inplace(gm)   # in-place ops: explicit dataflow, out of place if safe
    gm = p.normalize_layers(gm)
    gm = p.decompose_addmm(gm)          # addmm & co: a layer plus an add
    gm = p.follow_training_mode(gm)
    plan, specs, tracer, head = analyse(gm, config, how)
    if not plan.layers:
        warnings.warn("salcompile: found no weight-carrying linear map (linear, conv, matmul, "
                      "einsum) in the model: nothing to rewrite, it trains as before.", stacklevel=2)
    if config.gated:
        regions = p.find_regions(gm, specs, plan, tracer, head, config)
        if not regions and config.areas > 1 and plan.layers:
            _warn_nothing_routed(plan, config)
        gm, routes = p.insert_gates(gm, regions, tracer, config)
        gm = p.make_area_ops(gm, specs, plan, tracer, routes, config)
        gm = p.split_shared_path(gm, specs, plan, config)   # shared_fraction > 0 only
    family = feedback_rules.get(config.feedback).family   # salcompile/feedback/
    if family == "fa":
        gm = p.attach_fa(gm, specs, plan, tracer, config)
    elif family == "dfa":
        gm = p.attach_dfa(gm, specs, plan, tracer, config, head)
    if config.check_finite:
        gm = p.guard_finite(gm, specs, plan)
    if config.gated and config.area_impl == "fast" and config.fuse_regions and \
            not config.shared_fraction and config.route_top_k == 1:
        gm = p.fuse_regions(gm, plan, config)   # after feedback buffers and guards are in place
    gm = p.audit_parameters(gm, plan, config)   # last: every weight use of the finished graph
    for u in plan.backprop:
        warnings.warn(f"salcompile: {u.name} ({u.op}) keeps backprop: {u.reason}.", stacklevel=2)
    sal = SALModule(gm, gm.graph, plan, config, original_keys)
    sal.train(getattr(model, "training", True))
    return sal


def _warn_nothing_routed(plan: Plan, config: SALConfig) -> None:
    why = next((n for n in plan.notes if n.startswith("no SAL region: ")), "no SAL region: ")
    warnings.warn(f"salcompile: areas={config.areas} but no layer is gated "
                  f"({why[len('no SAL region: '):]}): the model trains dense with "
                  f"{config.feedback}; choose the layers to gate with "
                  "SALConfig(gate_layers=[...]), or pass areas=1.", stacklevel=3)


def _state_keys(model):
    if isinstance(model, nn.Module):
        return list(model.state_dict().keys())
    if isinstance(model, torch.export.ExportedProgram):
        return list(model.state_dict.keys())
    return []


def plan(module: nn.Module, example_inputs: Optional[Any] = None,
         config: Optional[SALConfig] = None, *, example_kwargs: Optional[dict] = None,
         **overrides: Any) -> Plan:
    """The plan of a transformed module, or the plan transform() would follow for a plain model."""
    target = getattr(module, "_orig_mod", module)
    if isinstance(target, SALModule):
        return target.sal_plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transform(module, example_inputs, config, example_kwargs=example_kwargs,
                         **overrides).sal_plan
