"""Feedback rules, one file each, registered by name.

Add a rule: a new module here defining `RULE = FeedbackRule(...)` (see rule.py for the fields)
and its name in `_MODULES`. `SALConfig(feedback=...)`, the CLI's --feedback, the feedback pass,
the metrics and the exporters read the registry; nothing else needs to change for an FA-family
rule (one whose backward operand is a tensor shaped like W).
"""
from __future__ import annotations

import importlib
from typing import Dict, Tuple

from .rule import FeedbackRule

_MODULES = ("fa", "dfa", "bp", "usf", "brsf", "frsf", "kp")
_RULES: Dict[str, FeedbackRule] = {}


def register(rule: FeedbackRule) -> FeedbackRule:
    if rule.name in _RULES and _RULES[rule.name] is not rule:
        raise ValueError(f"feedback rule {rule.name!r} is registered twice")
    _RULES[rule.name] = rule
    return rule


for _m in _MODULES:
    register(importlib.import_module(f"{__name__}.{_m}").RULE)


def names() -> Tuple[str, ...]:
    return tuple(_RULES)


def get(name: str) -> FeedbackRule:
    """The rule registered as `name` (KeyError names the valid ones)."""
    try:
        return _RULES[name]
    except KeyError:
        raise KeyError(f"unknown feedback rule {name!r}; registered: {list(_RULES)}") from None


__all__ = ["FeedbackRule", "register", "names", "get"]
