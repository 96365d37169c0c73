"""Loss-curve plots. matplotlib is the optional extra ``plot``; without it the plot is skipped with a message."""

from __future__ import annotations

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


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> bool | str:
    """Plot training (and validation) loss against step from a ``metrics.jsonl`` file.

    A torn last line (a writer killed mid-line) is skipped, so a running or killed run plots too.

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
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True
