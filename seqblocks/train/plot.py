"""Loss-curve plots. matplotlib is the optional extra ``plot``; without it the plot is skipped with a message."""

from __future__ import annotations

import os
from pathlib import Path

from seqblocks.train.metrics import read_metrics

__all__ = ["plot_loss_curve", "pyplot", "MISSING_MATPLOTLIB"]

MISSING_MATPLOTLIB = ("plot skipped: matplotlib is not installed "
                      "(install it with `pip install 'seqblocks[plot]'` or `pip install matplotlib`)")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str | None = None) -> bool | str:
    """Plot training (and validation) loss against step from a ``metrics.jsonl`` file.

    A torn last line (a writer killed mid-line) is skipped, so a running or killed run plots too.
    The PNG is written to a temporary name and renamed into place, so a reader never sees half a file.

    Args:
        metrics_path (str | Path): the run's ``metrics.jsonl``.
        png_path (str | Path): where the plot goes.
        title (str | None): the plot's title. Default: None (the run directory's name).

    Returns:
        True when the PNG was written, else a message saying why not (matplotlib missing, no data).
    """
    plt = pyplot()
    if plt is None:
        return MISSING_MATPLOTLIB
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("type") == "train"]
    val = [(r["step"], r["loss"]) for r in rows if r.get("type") == "eval"]
    if not train and not val:
        return f"plot skipped: {metrics_path} holds no losses yet"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title if title is not None else f"{Path(metrics_path).resolve().parent.name}: loss", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.stem}.tmp-{os.getpid()}{png_path.suffix}")
    try:
        fig.savefig(tmp)
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return True
