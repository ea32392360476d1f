"""Figures: panels wrap into rows instead of one long strip."""

from __future__ import annotations

from bayesrace._figures import new_figure


def test_eight_panels_make_two_rows_of_four():
    figure, axes = new_figure(8)
    assert len(axes) == 8
    width, height = figure.get_size_inches()
    assert abs(width / height - 2.0) < 1e-9
    rows = {round(axis.get_position().y0, 3) for axis in axes}
    assert len(rows) == 2


def test_three_panels_stay_one_row_and_spare_axes_are_hidden():
    figure, axes = new_figure(3)
    assert len(axes) == 3 and len(figure.axes) == 3
    figure, axes = new_figure(5)
    assert len(axes) == 5 and sum(axis.get_visible() for axis in figure.axes) == 5
