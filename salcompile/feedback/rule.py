"""What a feedback rule is: how a layer's backward operand is derived, and what it stores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

# operand(weight, stored, scale) -> the tensor the layer's input gradient uses this step, in place
# of W. `weight` is the layer's weight operand, `stored` the rule's tensor shaped like it (or None),
# `scale` the layer's init bound 1/sqrt(fan_in). Plain torch ops: graph code runs it every step.
Operand = Callable[[Tensor, Optional[Tensor], float], Tensor]
# onnx_operand(op, weight, stored, scale) -> the same operand as ONNX nodes, for the ORT training
# artifacts: `op(op_type, inputs, **attributes) -> output name`, `weight`/`stored` tensor names
# (stored None when the rule keeps nothing), `scale` the name of a scalar initializer.
OnnxOperand = Callable[[Callable[..., str], str, Optional[str], str], str]


@dataclass(frozen=True)
class FeedbackRule:
    """One way of training a layer's input gradient without the transposed weight.

    name:      the SALConfig(feedback=...) value.
    summary:   one line for the docs, the CLI's --help and the plan.
    family:    "fa"  - a per-layer backward operand (passes/attach_fa.py; every rule below but two),
               "dfa" - the output error sent straight to every layer's input (passes/attach_dfa.py),
               "bp"  - the graph trains with ordinary backprop.
    stored:    the tensor kept beside each weight: "random" (B drawn once at transform time), "abs"
               (|B| of such a draw), or None (nothing stored: the operand comes from W alone).
    trainable: the stored tensor is a parameter and receives the layer's own dW as its gradient
               (Kolen-Pollack): with weight decay on both, B -> W without W in the backward.
    operand:   derives the backward operand every step; None uses the stored tensor as it is.
    reads_weight: the operand reads W's values (the sign rules transport W's signs); said in the
               plan, so a reader of a result knows which information crossed.
    onnx_operand: `operand` as ONNX nodes (export_ort_training redirects the backward's reads
               of W to it); needed when `operand` is set.
    onnx_training: the rule can be exported by export_ort_training and export_train_step
               (otherwise they refuse with a clear error).
    """

    name: str
    summary: str
    family: str = "fa"
    stored: Optional[str] = "random"
    trainable: bool = False
    operand: Optional[Operand] = None
    reads_weight: bool = False
    onnx_operand: Optional[OnnxOperand] = None
    onnx_training: bool = True

    def backward_operand(self, weight: Tensor, stored: Optional[Tensor], scale: float) -> Tensor:
        """The B this rule's layer uses for its input gradient now (eager; for metrics)."""
        if self.operand is None:
            return stored
        return self.operand(weight, stored, scale)
