"""Direct feedback alignment (Nøkland, 2016): the output error reaches each layer input as e·D."""
from .rule import FeedbackRule

RULE = FeedbackRule(
    name="dfa",
    summary="direct feedback alignment: each layer's input receives the output error times a "
            "fixed random D",
    family="dfa",
    stored=None,   # D is sized by the layer input, not the weight: passes/attach_dfa.py owns it
)
