"""Multilayer perceptrons: the paper's MLP and a deep (optionally residual) MLP up to 128 layers."""
from __future__ import annotations

import math

import torch
from torch import nn

from salcompile.errors import SalcompileError


def _linears(widths) -> nn.ModuleList:
    """Linear layers widths[i] → widths[i+1], then Kaiming-uniform weights and zero biases (this
    order of random draws keeps MLP's seeded weights as they have always been)."""
    layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
    for l in layers:
        nn.init.kaiming_uniform_(l.weight, nonlinearity="relu")
        nn.init.zeros_(l.bias)
    return layers


class MLP(nn.Module):
    """The paper's MLP: in → hidden (ReLU) → out, Kaiming init; `depth` counts the linear layers.

    MLP(64, 256, 10): 64·256+256 + 256·10+10 = 19,210 parameters.
    """

    def __init__(self, in_features: int = 64, hidden: int = 256, out_features: int = 10,
                 depth: int = 2):
        super().__init__()
        widths = [in_features] + [hidden] * (depth - 1) + [out_features]
        self.layers = _linears(widths)

    def forward(self, x):
        x = x.flatten(1)
        for l in self.layers[:-1]:
            x = torch.relu(l(x))
        return self.layers[-1](x)


class DeepMLP(nn.Module):
    """A deep ReLU MLP: `depth` linear layers (in → width, depth-2 × width → width, width → classes).

    residual=False: h = relu(W h + b) for every hidden layer, head on h.
    residual=True:  pre-activation identity skips, no normalisation: h = W₀x + b₀, then
                    h ← h + (W relu(h) + b)/√(depth-2) for each width → width layer, head on
                    relu(h). With Kaiming init the branch is zero-mean and uncorrelated with h, so
                    the second moment grows by (1 + 1/(depth-2))^(depth-2) < e over all layers:
                    depth 128 stays finite and O(1).
    Under SAL partition areas (K) a layer reading its input's area block sums width/K inputs with
    weights drawn for fan-in `width`: without skips the activations shrink by ~1/√K per layer at
    init (depth 128, K=16: the output underflows to 0); the residual form stays O(1).
    Kaiming-uniform weights, zero biases. Parameters: in·w + (depth-2)·w² + w·classes + biases;
    DeepMLP(64, 256, 10, depth=8): 413,962.
    """

    def __init__(self, in_features: int = 64, width: int = 256, num_classes: int = 10,
                 depth: int = 8, residual: bool = False):
        super().__init__()
        if not 2 <= depth <= 128:
            raise SalcompileError(f"DeepMLP depth counts linear layers and must be in 2..128, got {depth}.")
        widths = [in_features] + [width] * (depth - 1) + [num_classes]
        self.layers = _linears(widths)
        self.residual = residual
        self.scale = 1.0 / math.sqrt(max(1, depth - 2))

    def forward(self, x):
        h = self.layers[0](x.flatten(1))
        for l in self.layers[1:-1]:
            h = h + self.scale * l(torch.relu(h)) if self.residual else l(torch.relu(h))
        return self.layers[-1](torch.relu(h))
