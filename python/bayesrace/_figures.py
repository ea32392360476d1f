"""Figures through matplotlib's object API on the Agg canvas: no pyplot state, no global
backend, safe in worker processes and under MPI."""

from __future__ import annotations


def new_figure(n_panels: int, max_columns: int = 4):
    """A figure of ``n_panels`` square panels, at most ``max_columns`` to a row (a report's
    8 parity panels were one 4000-pixel strip), and their axes in reading order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_panels = max(n_panels, 1)
    columns = min(n_panels, max_columns)
    rows = -(-n_panels // columns)
    figure = Figure(figsize=(4.2 * columns, 4.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[n_panels:]:
        unused.set_visible(False)
    return figure, axes[:n_panels]


def colour(index: int) -> str:
    """The index-th colour of matplotlib's default cycle."""
    return f"C{index % 10}"


def save_figure(figure, path, dpi: int = 110) -> None:
    """Save atomically (a report being read never shows half a PNG)."""
    from ._files import atomic_path

    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi)
