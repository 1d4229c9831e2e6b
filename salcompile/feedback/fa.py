"""Feedback alignment (Lillicrap et al., 2016): a fixed random B in place of W."""
from .rule import FeedbackRule

RULE = FeedbackRule(
    name="fa",
    summary="feedback alignment: a fixed random B (drawn once) in place of W in the input gradient",
)
