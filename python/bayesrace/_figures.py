"""Figures through matplotlib's object API on the Agg canvas: no pyplot state, no global
backend, safe in worker processes and under MPI."""

from __future__ import annotations


def new_figure(n_panels: int):
    """A figure of ``n_panels`` square panels side by side, and their axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_panels = max(n_panels, 1)
    figure = Figure(figsize=(4.2 * n_panels, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, n_panels, squeeze=False)[0]
    return figure, axes


def colour(index: int) -> str:
    """The index-th colour of matplotlib's default cycle."""
    return f"C{index % 10}"


def save_figure(figure, path, dpi: int = 110) -> None:
    """Save atomically (a report being read never shows half a PNG)."""
    from ._files import atomic_path

    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi)
