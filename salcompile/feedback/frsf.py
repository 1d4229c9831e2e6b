"""Fixed random-magnitude sign-concordant feedback (Liao et al., 2016; BioTorch's "frsf"):
B = |B_fixed|·sign(W), the magnitudes drawn once, the signs W's at every step."""
import torch

from .rule import FeedbackRule


def frsf_operand(weight, stored, scale):
    return stored * torch.sign(weight)


def frsf_onnx(op, weight, stored, scale):
    return op("Mul", [stored, op("Sign", [weight])])


RULE = FeedbackRule(
    name="frsf",
    summary="fixed random-magnitude sign-concordant feedback: B = |B_fixed|·sign(W) every step",
    stored="abs",
    operand=frsf_operand,
    onnx_operand=frsf_onnx,
    reads_weight=True,
)
