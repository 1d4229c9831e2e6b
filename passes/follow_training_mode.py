"""Make mode-dependent ops follow `module.train()` / `.eval()` like the original model.

torch.export records the mode it traced in as constants (batch_norm's `training`, dropout's `train`,
the batch-norm step counter). Those constants are replaced by a read of `self.training`, so the
transformed module switches batch-norm statistics and dropout exactly as the original did.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from .context import PassContext

aten = torch.ops.aten

# op -> index of its training flag
_FLAG_INDEX = {
    aten.batch_norm.default: 5, aten.dropout.default: 2, aten.feature_dropout.default: 2,
    aten.alpha_dropout.default: 2, aten.feature_alpha_dropout.default: 2,
    aten.native_dropout.default: 2,
    aten.lstm.input: 6, aten.gru.input: 6, aten.rnn_tanh.input: 6, aten.rnn_relu.input: 6,
}

# functional dropouts as symbolic_trace records them (`F.dropout(x, p, self.training)`)
_FUNCTIONAL = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
               F.feature_alpha_dropout}


def follow_training_mode(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> fx.GraphModule:
    g = gm.graph
    training = None

    def flag():
        nonlocal training
        if training is None:
            first = next(iter(g.nodes))
            with g.inserting_before(first):
                training = g.create_node("get_attr", "training", name="training")
        return training

    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        idx = _FLAG_INDEX.get(node.target)
        if node.target in _FUNCTIONAL:
            if node.kwargs.get("training") is True:
                node.kwargs = {**node.kwargs, "training": flag()}
            elif len(node.args) > 2 and node.args[2] is True:
                node.args = (*node.args[:2], flag(), *node.args[3:])
        elif idx is not None and len(node.args) > idx and node.args[idx] is True:
            args = list(node.args)
            args[idx] = flag()
            node.args = tuple(args)
        elif (node.target is aten.add_.Tensor and node.args[0].op == "get_attr"
              and str(node.args[0].target).endswith("num_batches_tracked") and node.args[1] == 1):
            # counter += training: adds 1 in train mode and 0 in eval mode, as BatchNorm does.
            node.args = (node.args[0], flag())
    gm.recompile()
    return gm
