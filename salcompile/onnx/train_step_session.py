"""TrainStepSession: train with a graph written by salcompile.export_train_step, in any
onnxruntime (a plain InferenceSession; no onnxruntime-training). The graph itself needs nothing
but onnxruntime and numpy arrays: this class only keeps the state between calls.

    sess = salcompile.TrainStepSession("step.onnx", sal.state_dict())
    for x, y in batches:
        loss = sess.step(x, y)
    sal.load_state_dict(sess.state_dict())
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import SalcompileError

# The graph's naming convention (export_train_step writes it, this class reads it).
NEW = ".new"          # output name of an updated input: `fc1.weight.new`
LOSS = "loss"         # the first output
STEP = "optimizer.step"
_SLOTS = (".exp_avg", ".exp_avg_sq", ".momentum_buffer")
_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
           "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
           "tensor(bool)": np.bool_}


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):   # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _weights(params) -> Mapping[str, Any]:
    """A state_dict from a mapping, a module or an archive path."""
    import os
    if isinstance(params, Mapping):
        return params
    if hasattr(params, "state_dict"):
        return params.state_dict()
    if isinstance(params, (str, os.PathLike)):
        from ..archive import load
        return load(params).state_dict()
    raise SalcompileError(f"TrainStepSession: params must be a state_dict, the transformed module "
                          f"or the path of its archive, got {type(params).__name__}.")


class TrainStepSession:
    """Holds the parameters and optimizer state of a train-step graph as numpy arrays and runs
    one step per call.

    `path`: the .onnx file from export_train_step (the graph only: it holds no weights).
    `params`: where the weights come from: the module's state_dict (torch tensors or numpy
    arrays), the transformed module itself, or the path of its archive (salcompile.save /
    `convert`); every parameter and carried buffer the graph reads must be in it.
    Optimizer state (`<param>.exp_avg`, ..., `optimizer.step`) starts at zero unless `params`
    holds it (to resume). `providers`: onnxruntime execution providers (default: the CPU).
    """

    def __init__(self, path, params: Any, providers: Optional[Sequence] = None,
                 sess_options=None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise SalcompileError("TrainStepSession needs onnxruntime: pip install "
                                  "onnxruntime (or onnxruntime-gpu)") from exc
        if sess_options is None:
            sess_options = ort.SessionOptions()
            sess_options.log_severity_level = 3   # constant-folding notices on every load
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:
            raise SalcompileError(f"TrainStepSession: onnxruntime cannot load {path} "
                                  f"({type(exc).__name__}: {str(exc).strip()[:300]}). Is it "
                                  "truncated or not an ONNX file? Write it again with "
                                  "salcompile.export_train_step (python -m salcompile export "
                                  "MODEL.sal.pt2 --to train-step -o FILE).") from exc
        inputs = self.session.get_inputs()
        outs = [o.name for o in self.session.get_outputs()]
        if not outs or outs[0] != LOSS:
            raise SalcompileError(f"TrainStepSession: {path} is not a train-step graph from "
                                  "salcompile.export_train_step (its first output is not 'loss').")
        produced = set(outs)
        self.state_names = [i.name for i in inputs if i.name + NEW in produced]
        self.data_names = [i.name for i in inputs if i.name + NEW not in produced]
        self._types = {i.name: _DTYPES.get(i.type) for i in inputs}
        self._outputs = [LOSS] + [n + NEW for n in self.state_names]
        params = _weights(params)
        self._extra = {k: _numpy(v) for k, v in params.items()}   # returned by state_dict too
        self.values: Dict[str, np.ndarray] = {}
        missing = []
        for name in self.state_names:
            if name in params:
                v = _numpy(params[name])
            elif name == STEP:
                v = np.zeros((), np.float32)
            elif self._slot_of(name) in params:
                v = np.zeros_like(_numpy(params[self._slot_of(name)]))
            else:
                missing.append(name)
                continue
            want = self._types[name]
            self.values[name] = np.ascontiguousarray(v.astype(want) if want else v)
        if missing:
            raise SalcompileError(f"TrainStepSession: params lacks {', '.join(missing[:8])}"
                                  f"{' ...' if len(missing) > 8 else ''}; pass the module's "
                                  "state_dict().")
        self.losses: List[float] = []

    @staticmethod
    def _slot_of(name: str) -> str:
        """'fc1.weight.exp_avg' -> 'fc1.weight'."""
        return name.rsplit(".", 1)[0]

    def step(self, *batch) -> float:
        """One training step on a batch: step(x, target) (step(x1, x2, target) for a module with
        several inputs). Returns the loss (before the update)."""
        if len(batch) != len(self.data_names):
            raise SalcompileError(f"TrainStepSession.step takes {len(self.data_names)} arrays "
                                  f"({', '.join(self.data_names)}), got {len(batch)}.")
        feed = dict(self.values)
        for name, value in zip(self.data_names, batch):
            v = _numpy(value)
            want = self._types[name]
            feed[name] = np.ascontiguousarray(v.astype(want, copy=False) if want else v)
        try:
            results = self.session.run(self._outputs, feed)
        except Exception as exc:
            raise SalcompileError(f"TrainStepSession.step: onnxruntime failed "
                                  f"({type(exc).__name__}: {str(exc).strip()[:300]}).") from exc
        loss = float(results[0])
        for name, value in zip(self.state_names, results[1:]):
            self.values[name] = value
        self.losses.append(loss)
        return loss

    def optimizer_state(self) -> Dict[str, np.ndarray]:
        """The optimizer's state (moments, step count): pass it back in `params` to resume."""
        return {k: v for k, v in self.values.items()
                if k == STEP or k.endswith(_SLOTS)}

    def state_dict(self, numpy: bool = False) -> Dict[str, Any]:
        """Every entry of the `params` given, with the trained values: parameters and carried
        buffers updated, everything else (feedback matrices, prototypes) as given. torch tensors
        (for module.load_state_dict) unless `numpy` or torch is not installed."""
        out = {k: self.values.get(k, v) for k, v in self._extra.items()}
        if numpy:
            return {k: np.array(v) for k, v in out.items()}
        try:
            import torch
        except ImportError:
            return {k: np.array(v) for k, v in out.items()}
        return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}


__all__ = ["TrainStepSession"]
