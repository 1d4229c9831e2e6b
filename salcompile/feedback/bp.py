"""Ordinary backprop on the same graph: the reference the other rules are measured against."""
from .rule import FeedbackRule

RULE = FeedbackRule(
    name="bp",
    summary="ordinary backprop (the transposed weight), same graph otherwise: the reference",
    family="bp",
    stored=None,
)
