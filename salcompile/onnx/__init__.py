"""The ONNX backends: one subpackage for everything that writes or runs ONNX.

    inference.py        export_onnx: the eval-mode forward as a plain ONNX graph
    ort_artifacts.py    export_ort_training: ONNX Runtime training artifacts, whose backward
      ort_graph_edit.py   is edited into the rule's (FA, DFA, sign rules) after ORT builds it
    train_step.py       export_train_step: one graph = forward, FA gradients and the update
      train_step_graph.py the trainable torch graph traced into it (plain-op rewrites)
      train_step_session.py TrainStepSession: runs that graph with onnxruntime, no torch needed
    compact.py          routed linear layers in the sorted compact form (both training exporters)
    common.py           what they share: the pinned opset, the exporter call, readable names

None of them imports onnx or onnxruntime at import time: a missing optional dependency is a
SalcompileError when an export is asked for.
"""
from .inference import export_onnx, inference_graph
from .ort_artifacts import export_ort_training, load_ort_checkpoint
from .train_step import export_train_step
from .train_step_session import TrainStepSession

__all__ = ["export_onnx", "inference_graph", "export_ort_training", "load_ort_checkpoint",
           "export_train_step", "TrainStepSession"]
