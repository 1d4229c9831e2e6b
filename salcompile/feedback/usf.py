"""Uniform sign-concordant feedback (Liao et al., 2016; BioTorch's "usf"): B = sign(W)·scale,
recomputed every step, with scale the layer's init bound 1/sqrt(fan_in)."""
import torch

from .rule import FeedbackRule


def usf_operand(weight, stored, scale):
    return torch.sign(weight) * scale


def usf_onnx(op, weight, stored, scale):
    return op("Mul", [op("Sign", [weight]), scale])


RULE = FeedbackRule(
    name="usf",
    summary="uniform sign-concordant feedback: B = sign(W)/sqrt(fan_in), recomputed every step",
    stored=None,
    operand=usf_operand,
    onnx_operand=usf_onnx,
    reads_weight=True,
)
