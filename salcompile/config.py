"""SALConfig: every choice DESIGN.md §1 leaves open, with its default."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from . import feedback as _rules
from .errors import SalcompileError
from .validate import SEED, Int, Num, check_numbers

FEEDBACK_MODES = _rules.names()   # the registered feedback rules (salcompile/feedback/)
FEEDBACK_INITS = ("kaiming_uniform", "weights")
FEEDBACK_SCALES = ("match", "none")
AREA_MODES = ("partition", "replicate")
ROUTE_BY = ("auto", "sample", "token")
AREA_IMPLS = ("fast", "reference")
BLOCK_GAINS = ("fan_in", "none")
ON_BACKPROP = ("warn", "error")

# Every numeric field: type and valid range (salcompile/validate.py writes the messages).
NUMERIC_FIELDS = {
    "feedback_seed": SEED,
    "routing_seed": SEED,
    "areas": Int(lo=1, label="areas (K)", hint="the number of parameter areas, e.g. 16 (1: dense)"),
    "route_dim": Int(lo=1, hi=2 ** 16, hint="the gate's routing width, e.g. 32"),
    "balance_weight": Num(lo=0, hi=1e4, hint="weight of the gate's load-balance term, e.g. 1.0"),
    "route_top_k": Int(lo=1, hint="areas each row uses, e.g. 2 (1: mutually exclusive areas)"),
    "shared_fraction": Num(lo=0, hi=1, hint="the share of each partition layer's outputs every "
                           "row computes, e.g. 0.5 (0: pure partition)"),
    "temperature": Num(lo=1e-4, hi=1e4,
                       hint="the gate's softmax temperature, e.g. 0.1 (smaller overflows the logits)"),
}


@dataclass(frozen=True)
class SALConfig:
    """How `salcompile.transform` rewrites a model.

    feedback:       the rule (salcompile/feedback/, one file each): "fa" (fixed random feedback
                    B in place of W in the input gradient), "dfa" (direct feedback alignment: each
                    layer input receives e·D), "bp" (ordinary backprop, same graph otherwise),
                    the sign-concordant "usf" (B = sign(W)/sqrt(fan_in)), "brsf" (|fresh
                    random|·sign(W)) and "frsf" (|fixed random|·sign(W)), recomputed every step,
                    and "kp" (Kolen-Pollack: B trained with W's gradient; give both weight decay).
    feedback_init:  "kaiming_uniform" (like nn.Linear's default init) or "weights" (B = copy of W:
                    FA then equals BP exactly, the core correctness check).
    feedback_scale: "match" rescales B to the norm of W at every step; "none" uses B as drawn.
    feedback_seed:  seeds B and D; the same seed gives the same matrices.
    areas:          K, the number of mutually exclusive parameter areas. 1 with no gate_layers: no
                    gates (a dense model trained with feedback alignment).
    area_mode:      "partition" (a gated layer's outputs split into K blocks, a sample computes and
                    updates only its block) or "replicate" (K full copies of the layer, one per area).
    route_by:       "auto" (per token for sequence activations, per sample otherwise), "sample",
                    "token".
    route_dim:      width of the routing space the gate projects into.
    gate_layers:    None (default regions, DESIGN §1), a list of fnmatch patterns over layer names,
                    or a predicate `f(layer_name) -> bool`. Given with areas=1, gates are inserted
                    (K=1 areas, identical to dense: a check of the machinery).
    routing_seed:   seeds the gates' prototypes and initial projections.
    balance_weight: weight of the load-balance term in the gate's local rule.
    temperature:    softmax temperature over prototype similarities in the gate's local rule.
    area_impl:      "fast" (sorted, only active areas computed) or "reference" (masked dense, the
                    oracle the fast path is tested against).
    input_block_gain: "fan_in" multiplies, at transform time, the weights of every layer that reads
                    only its input's area block by sqrt(K): it sums K times fewer inputs than its
                    initialisation assumed, and without the gain activations shrink by ~1/sqrt(K)
                    per layer (exactly 0 at depth 128). "none" keeps the weights as they are.
    check_finite:   raise a SalcompileError naming the layer at the first NaN/inf in a layer's
                    output (forward) or in the gradient reaching it (backward). Opt-in: it reads
                    every layer output once more.
    fuse_regions:   with area_impl="fast", run each region's linear area layers in area-sorted
                    compact form (rows sorted once per gate, hidden activations stored as
                    rows x width/K, one grouped matmul per layer; passes/fuse_regions.py).
                    False keeps one self-contained area op per layer. Same values and gradients.
    route_top_k:    top-k routing (our extension, not the paper's): each row uses and updates its
                    k best areas (k of the K blocks in partition mode, summed at the exit; k of
                    the K copies, summed, in replicate mode). 1 (default): the paper's mutually
                    exclusive areas. Fused like top-1 regions (fuse_regions).
    shared_fraction: a shared dense path beside the areas (our reading of the paper's "dual
                    path", not the paper's own design): in each gated partition linear layer the
                    first fraction of the outputs is computed and updated by every row, the rest
                    is split into the K areas. 0 (default) is the pure partition; 1 is dense.
                    Fused like pure partition regions (fuse_regions).
    on_backprop:    what a layer salcompile cannot rewrite (it stays on backprop, listed in the plan
                    with the reason) does: "warn" (default) or "error" (transform raises: a
                    guarantee that nothing in the model trains by backprop).
    """

    feedback: str = "fa"
    feedback_init: str = "kaiming_uniform"
    feedback_scale: str = "match"
    feedback_seed: int = 0
    areas: int = 16
    area_mode: str = "partition"
    route_by: str = "auto"
    route_dim: int = 32
    gate_layers: Any = None
    routing_seed: int = 0
    balance_weight: float = 1.0
    temperature: float = 0.1
    area_impl: str = "fast"
    input_block_gain: str = "fan_in"
    check_finite: bool = False
    fuse_regions: bool = True
    route_top_k: int = 1
    shared_fraction: float = 0.0
    on_backprop: str = "warn"

    def __post_init__(self) -> None:
        _check_choice("feedback", self.feedback, FEEDBACK_MODES)
        _check_choice("feedback_init", self.feedback_init, FEEDBACK_INITS)
        _check_choice("feedback_scale", self.feedback_scale, FEEDBACK_SCALES)
        _check_choice("area_mode", self.area_mode, AREA_MODES)
        _check_choice("route_by", self.route_by, ROUTE_BY)
        _check_choice("area_impl", self.area_impl, AREA_IMPLS)
        _check_choice("input_block_gain", self.input_block_gain, BLOCK_GAINS)
        _check_choice("on_backprop", self.on_backprop, ON_BACKPROP)
        if not isinstance(self.check_finite, bool):
            raise SalcompileError(f"check_finite must be True or False, got {self.check_finite!r}.")
        if not isinstance(self.fuse_regions, bool):
            raise SalcompileError(f"fuse_regions must be True or False, got {self.fuse_regions!r}.")
        check_numbers(self, NUMERIC_FIELDS, who="SALConfig")
        if self.route_top_k > self.areas:
            raise SalcompileError(f"route_top_k={self.route_top_k} exceeds areas={self.areas}: a "
                                  "row can use at most every area once; choose 1 <= k <= areas.")
        if self.route_top_k > 1 and self.shared_fraction:
            raise SalcompileError("route_top_k > 1 and shared_fraction > 0 cannot be combined yet; "
                                  "choose one of them.")
        g = self.gate_layers
        if not (g is None or callable(g) or (isinstance(g, (list, tuple))
                                             and all(isinstance(p, str) for p in g))):
            raise SalcompileError(
                f"gate_layers must be None, a list of name patterns (fnmatch, e.g. ['fc*']) or a "
                f"predicate taking a layer name; got {g!r}.")
        if isinstance(g, list):
            object.__setattr__(self, "gate_layers", tuple(g))
        if self.feedback_init == "weights" and _rules.get(self.feedback).stored is None \
                and self.feedback != "bp":
            raise SalcompileError(
                f"feedback_init='weights' copies each layer's W into its stored feedback tensor; "
                f"feedback={self.feedback!r} stores none (" +
                ("DFA's D matrices have no weight to copy" if self.feedback == "dfa" else
                 "its B is derived from W at every step") +
                "). Use feedback='fa', 'frsf' or 'kp' with 'weights', or "
                "feedback_init='kaiming_uniform'.")

    def replace(self, **overrides: Any) -> "SALConfig":
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise SalcompileError(
                f"unknown SALConfig field(s) {unknown}; valid fields: {sorted(names)}."
            )
        return dataclasses.replace(self, **overrides)

    @property
    def gated(self) -> bool:
        """Whether transform inserts gates and area ops."""
        return self.areas > 1 or self.gate_layers is not None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        g = self.gate_layers
        d["gate_layers"] = list(g) if isinstance(g, tuple) else (None if g is None else repr(g))
        return d


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_choice(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise SalcompileError(f"{name}={value!r} is not valid; choose one of {list(valid)}.")
