"""salcompile: compile any PyTorch model to train with SAL (backprop-free, feedback alignment).

    sal = salcompile.transform(model)                       # FA by default
    sal = salcompile.transform(model, example_inputs=(x,), feedback="dfa")
    print(salcompile.plan(sal))
"""
from . import ops  # noqa: F401  (registers the salcompile:: custom ops)
from .backends import compile
from .config import SALConfig
from .errors import SalcompileError
from .module import SALModule, feedback_matrices
from .pipeline import plan, transform
from .archive import load, save
from .routing import reset_routing_stats, routing_stats
from .onnx import TrainStepSession, export_onnx, export_ort_training, export_train_step
from . import distributed, metrics

__version__ = "0.1.0"
__all__ = ["SALConfig", "SALModule", "SalcompileError", "transform", "plan", "feedback_matrices",
           "compile", "metrics", "save", "load", "routing_stats", "reset_routing_stats", "distributed", "export_onnx", "export_ort_training",
           "export_train_step", "TrainStepSession", "__version__"]
