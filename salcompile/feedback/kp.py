"""Kolen-Pollack (Kolen & Pollack, 1994; Akrout et al., NeurIPS 2019): B is a parameter that
receives the same gradient as W from the layer's backward. With the same optimizer step and weight
decay on both, B - W shrinks by (1 - lr·wd) every step, so B -> W without W ever being read in
the backward. Converges with SGD(weight_decay>0) or AdamW (decoupled decay); plain Adam with L2
decay adds wd·W and wd·B to different moments and only roughly aligns."""
from .rule import FeedbackRule

RULE = FeedbackRule(
    name="kp",
    summary="Kolen-Pollack: B is trained with W's gradient; with weight decay on both, B -> W",
    trainable=True,
    onnx_training=False,   # ORT's gradient graph would have to hand B the layer's dW
)
