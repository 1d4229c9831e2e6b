"""Batchwise random-magnitude sign-concordant feedback (Liao et al., 2016; BioTorch's "brsf"):
B = |R|·sign(W) with R ~ U(-scale, scale) drawn afresh every step."""
import torch

from .rule import FeedbackRule


def brsf_operand(weight, stored, scale):
    return torch.rand_like(weight) * scale * torch.sign(weight)


def brsf_onnx(op, weight, stored, scale):
    magnitude = op("Mul", [op("RandomUniformLike", [weight], low=0.0, high=1.0), scale])
    return op("Mul", [magnitude, op("Sign", [weight])])


RULE = FeedbackRule(
    name="brsf",
    summary="batchwise random-magnitude sign-concordant feedback: B = |fresh U(-s, s)|·sign(W) "
            "every step",
    stored=None,
    operand=brsf_operand,
    onnx_operand=brsf_onnx,
    reads_weight=True,
)
