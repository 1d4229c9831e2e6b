"""The model zoo (salcompile.models): a registry the CLI reads with `--model NAME`."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn

from salcompile.errors import SalcompileError


class MLP(nn.Module):
    """The paper's MLP: in → hidden (ReLU) → out, Kaiming init."""

    def __init__(self, in_features: int = 64, hidden: int = 256, out_features: int = 10,
                 depth: int = 2):
        super().__init__()
        widths = [in_features] + [hidden] * (depth - 1) + [out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        for l in self.layers:
            nn.init.kaiming_uniform_(l.weight, nonlinearity="relu")
            nn.init.zeros_(l.bias)

    def forward(self, x):
        x = x.flatten(1)
        for l in self.layers[:-1]:
            x = torch.relu(l(x))
        return self.layers[-1](x)


class LeNet5(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


# name -> (factory, example input shape without the batch dimension)
REGISTRY: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "mlp": (lambda: MLP(64, 256, 10), (64,)),
    "mlp-mnist": (lambda: MLP(784, 256, 10), (784,)),
    "lenet5": (lambda: LeNet5(), (1, 28, 28)),
}


def build(name: str) -> nn.Module:
    return _entry(name)[0]()


def example_input(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *_entry(name)[1])


def _entry(name: str):
    if name not in REGISTRY:
        raise SalcompileError(f"unknown model {name!r}; the zoo has: {sorted(REGISTRY)}.")
    return REGISTRY[name]
