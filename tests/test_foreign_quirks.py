"""Quirks of data the sample generator never writes, found by running recsys on hand-made
MIND-format worlds (long category names from a publisher's own taxonomy, ...)."""

from __future__ import annotations

import warnings

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from recsys.evaluation import report


def test_breakdown_chart_keeps_long_group_names_inside_the_picture(monkeypatch):
    # news.tsv allows categories of up to 128 characters; one that long made matplotlib give up
    # its layout ("constrained_layout not applied") and cut every tick label off at the left edge.
    groups = ["sports", "x" * 128, "finance and markets, business news from around the world today"]
    entry = {"breakdowns": {"category": {g: {"metrics": {"impression_auc": {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8}}}
                                         for g in groups}}}
    ordered = [("text+image (v1)", entry), ("random", entry)]
    colors = {"text+image (v1)": "#1f77b4", "random": "#ff7f0e"}
    figures = []
    monkeypatch.setattr(report, "_png_data_uri", lambda figure: figures.append(figure) or "data:")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's own verdict that the layout failed
        report._plot_breakdown("category", groups, ordered, colors)
        (figure,) = figures
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
    renderer = canvas.get_renderer()
    width = figure.bbox.width
    labels = figure.axes[0].get_yticklabels()
    assert len(labels) == len(groups)
    for label, group in zip(labels, groups):
        box = label.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= width, (label.get_text(), box)
        text = label.get_text()
        assert text == group or (text.endswith("…") and group.startswith(text[:-1])), text
    assert labels[0].get_text() == "sports"


if __name__ == "__main__":
    pytest.main([__file__])
