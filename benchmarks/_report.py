"""Shared pieces of the benchmark scripts: the CPU allocator option and a bar chart of median times."""
from __future__ import annotations


def add_malloc_option(ap) -> None:
    """``--system-malloc`` on an argparse parser (see :func:`apply_malloc`)."""
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's malloc as it is (default: retain freed memory, as modula-mhc train does)")


def apply_malloc(args) -> str:
    """Retain freed memory for every method compared (``modula_mhc.cpu_memory``) unless
    ``--system-malloc``; returns what the run used, "retain" or "system", for its JSON."""
    from modula_mhc.cpu_memory import retain_freed_memory
    return "system" if args.system_malloc else ("retain" if retain_freed_memory() else "system")


def pyplot(why_missing: bool = False):
    """matplotlib.pyplot on the Agg backend, or None without matplotlib (printing which extra to
    install when ``why_missing``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if why_missing:
            print("no plot: matplotlib is missing (pip install 'modula_mhc[examples]')")
        return None
    return plt


def save_bar_chart(png_path: str, median_seconds: dict, xlabel: str, title: str) -> None:
    """Bar chart of {method: median seconds} in ms (skipped quietly without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(list(median_seconds), [v * 1e3 for v in median_seconds.values()])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
