"""Example: a transformed model trained by PyTorch Lightning (docs/integrations.md).

An MLP classifier on scikit-learn digits, transformed to SAL (areas, FA feedback), wrapped in
`salcompile.integrations.lightning.SALLightningModule` and trained with
`lightning.Trainer(accelerator="cpu")`; routing statistics are logged through `self.log`.

    python examples/lightning.py [--epochs 3] [--areas 16] [--feedback fa] [--fast-dev-run]
"""
from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
import torch.nn as nn

import salcompile
from salcompile.integrations.lightning import SALLightningModule, pl


def loaders(batch: int = 32, limit=None):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    if limit:
        x, y = x[:limit], y[:limit]
    n = int(0.8 * len(x))
    g = torch.Generator().manual_seed(0)
    train = torch.utils.data.TensorDataset(x[:n], y[:n])
    val = torch.utils.data.TensorDataset(x[n:], y[n:])
    return (torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, generator=g,
                                        drop_last=True),
            torch.utils.data.DataLoader(val, batch_size=batch))


def build(areas: int = 16, feedback: str = "fa", lr: float = 3e-3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sal = salcompile.transform(model, example_inputs=(torch.randn(4, 64),), areas=areas,
                                   feedback=feedback)
    return SALLightningModule(sal, lr=lr)


def run(epochs=3, areas=16, feedback="fa", fast_dev_run=False, limit=None, root=None, **kw):
    lm = build(areas, feedback)
    train, val = loaders(limit=limit)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs,
                         fast_dev_run=fast_dev_run, default_root_dir=root or tempfile.mkdtemp(),
                         enable_progress_bar=False, enable_model_summary=False,
                         logger=False if fast_dev_run else None, **kw)
    trainer.fit(lm, train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print({k: round(v, 4) for k, v in metrics.items()})
    return trainer, lm, metrics


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--areas", type=int, default=16)
    ap.add_argument("--feedback", default="fa")
    ap.add_argument("--fast-dev-run", action="store_true")
    a = ap.parse_args(argv)
    run(a.epochs, a.areas, a.feedback, a.fast_dev_run)


if __name__ == "__main__":
    main()
