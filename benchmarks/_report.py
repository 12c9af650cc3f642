"""Shared output of the benchmark scripts: a horizontal bar chart of median times."""
from __future__ import annotations


def save_bar_chart(png_path: str, median_seconds: dict, xlabel: str, title: str) -> None:
    """Bar chart of {method: median seconds} in ms (skipped quietly without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(list(median_seconds), [v * 1e3 for v in median_seconds.values()])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
