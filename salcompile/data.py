"""Offline datasets with fixed, seeded splits (more arrive with the training CLI)."""
from __future__ import annotations

from typing import Tuple

import torch

from .errors import SalcompileError

Split = Tuple[torch.Tensor, torch.Tensor]


def digits(split_seed: int = 0, test_fraction: float = 0.2) -> Tuple[Split, Split]:
    """scikit-learn's bundled 8x8 digits (1797 images, one of the paper's benchmarks), pixels
    scaled to [0, 1], flattened to 64 features; ((x_train, y_train), (x_test, y_test))."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SalcompileError("the digits dataset needs scikit-learn: pip install scikit-learn "
                              "(or pip install -e '.[dev]').") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])
