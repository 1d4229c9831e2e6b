"""SALConfig: every choice DESIGN.md §1 leaves open, with its default."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import SalcompileError

FEEDBACK_MODES = ("fa", "dfa", "bp")
FEEDBACK_INITS = ("kaiming_uniform", "weights")
FEEDBACK_SCALES = ("match", "none")


@dataclass(frozen=True)
class SALConfig:
    """How `salcompile.transform` rewrites a model.

    feedback:       "fa" (fixed random feedback B in place of W in the input gradient),
                    "dfa" (direct feedback alignment: each layer input receives e·D),
                    "bp" (ordinary backprop, same graph otherwise).
    feedback_init:  "kaiming_uniform" (like nn.Linear's default init) or "weights" (B = copy of W:
                    FA then equals BP exactly, the core correctness check).
    feedback_scale: "match" rescales B to the norm of W at every step; "none" uses B as drawn.
    feedback_seed:  seeds B and D; the same seed gives the same matrices.
    areas:          K, the number of mutually exclusive parameter areas (1 = dense).
    """

    feedback: str = "fa"
    feedback_init: str = "kaiming_uniform"
    feedback_scale: str = "match"
    feedback_seed: int = 0
    areas: int = 1

    def __post_init__(self) -> None:
        _check_choice("feedback", self.feedback, FEEDBACK_MODES)
        _check_choice("feedback_init", self.feedback_init, FEEDBACK_INITS)
        _check_choice("feedback_scale", self.feedback_scale, FEEDBACK_SCALES)
        if not isinstance(self.feedback_seed, int) or isinstance(self.feedback_seed, bool):
            raise SalcompileError(f"feedback_seed must be an int, got {self.feedback_seed!r}.")
        if not isinstance(self.areas, int) or isinstance(self.areas, bool) or self.areas < 1:
            raise SalcompileError(f"areas (K) must be an int >= 1, got {self.areas!r}.")
        if self.areas != 1:
            raise SalcompileError(
                f"areas={self.areas}: parameter areas are not implemented in this version; "
                "use areas=1 (dense)."
            )
        if self.feedback == "dfa" and self.feedback_init == "weights":
            raise SalcompileError(
                "feedback_init='weights' copies each layer's W into its B; DFA's D matrices have no "
                "weight to copy. Use feedback='fa' with 'weights', or feedback_init='kaiming_uniform'."
            )

    def replace(self, **overrides: Any) -> "SALConfig":
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise SalcompileError(
                f"unknown SALConfig field(s) {unknown}; valid fields: {sorted(names)}."
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_choice(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise SalcompileError(f"{name}={value!r} is not valid; choose one of {list(valid)}.")
