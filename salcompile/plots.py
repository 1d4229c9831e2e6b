"""Plots people would rather look at than read: learning curves and benchmark bars (PNG)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from .errors import SalcompileError
from .files import atomic_write


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SalcompileError("plots need matplotlib: pip install matplotlib (or pip install -e "
                              "'.[dev]').") from exc
    return plt


def _save(fig, path) -> None:
    plt = _pyplot()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)


def learning_curve(result, path) -> None:
    """Test accuracy and train loss per epoch, one line per seed (an ExperimentResult)."""
    plt = _pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in result.runs:
        epochs = [e.epoch for e in run.records]
        acc_ax.plot(epochs, [e.test_acc for e in run.records], label=f"seed {run.seed}")
        loss_ax.plot(epochs, [e.train_loss for e in run.records], label=f"seed {run.seed}")
    c = result.config
    title = (f"{result.model} on {result.data}: feedback {c.get('feedback')}, areas "
             f"{c.get('areas')} {c.get('area_mode') if c.get('areas', 1) > 1 else ''}")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
    loss_ax.set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def grouped_bars(groups: Sequence[str], series: Dict[str, List[Tuple[float, float]]], path,
                 ylabel: str, title: str, markers: Dict[str, List[float]] = None,
                 marker_series: Dict[str, str] = None) -> None:
    """Bars with error bars: series[name][i] = (mean, std) for groups[i] (std None or 0: no error
    bar; mean None: no bar, e.g. a pending cell); optional markers (e.g. the paper's figures) drawn
    as black symbols per group, over the bar of the series `marker_series[marker]` names (the
    figure it should be compared with), or at the group's centre when it names none."""
    plt = _pyplot()
    n = max(1, len(series))
    fig, ax = plt.subplots(figsize=(min(18, max(6, 1.6 * len(groups) * n / 3)),
                                    4 if n <= 6 else 5))
    width = 0.8 / n
    offset = {}
    colors = plt.get_cmap("tab20").colors if n > 10 else [None] * n  # > 10: no repeated colour
    for i, (name, vals) in enumerate(series.items()):
        offset[name] = (i - (n - 1) / 2) * width
        pts = [(g + offset[name], v) for g, v in enumerate(vals)
               if v is not None and v[0] is not None]
        ax.bar([p[0] for p in pts], [p[1][0] for p in pts], width,
               yerr=[p[1][1] or 0.0 for p in pts], label=name, capsize=2,
               color=colors[i % len(colors)])
    styles = [dict(marker="*", c="k", s=160), dict(marker="X", c="dimgray", s=110),
              dict(marker="D", c="k", s=60)]
    for (name, vals), style in zip((markers or {}).items(), styles):
        over = (marker_series or {}).get(name)
        if over is not None and over not in offset:
            raise SalcompileError(f"grouped_bars: marker {name!r} is meant to sit over series "
                                  f"{over!r}, which is not one of {list(offset)}.")
        dx = offset[over] if over is not None else 0.0
        pts = [(g + dx, v) for g, v in enumerate(vals) if v is not None]
        if pts:
            label = name if over is None else f"{name} (over {over})"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=label, zorder=5, **style)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)
