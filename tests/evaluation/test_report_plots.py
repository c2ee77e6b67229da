"""The report's plots: legends inside the figure and off the bars, readable ticks, and axes set by the models."""

import copy

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from recsys.evaluation import report as report_module
from recsys.metrics.accumulator import METRICS

# Names as long as the hunter's: the legend ran past the figure's left edge.
LONG = {
    "v2": "text+image (v20261205-184745-5e4005)",
    "v1": "text only (v20261205-184759-9cc2c4)",
    "text_only": "image only (v20261205-184819-417d84)",
    "oracle": "oracle (true probability)",
}


@pytest.fixture(scope="module")
def ordered(synthetic_result):
    models = {LONG.get(name, name): copy.deepcopy(entry) for name, entry in synthetic_result["models"].items()}
    return sorted(models.items(), key=report_module._sort_key)


@pytest.fixture(scope="module")
def colors(ordered):
    return {name: f"C{i}" for i, (name, _) in enumerate(ordered)}


@pytest.fixture()
def drawn(monkeypatch):
    """Calls a ``_plot_*`` function and returns the figure it would have encoded, laid out."""
    def draw(plot, *args):
        captured = []
        monkeypatch.setattr(report_module, "_png_data_uri", lambda figure: captured.append(figure) or "data:")
        plot(*args)
        figure = captured[0]
        FigureCanvasAgg(figure)  # the backend savefig renders with
        figure.canvas.draw()  # runs the constrained layout, as savefig does
        return figure
    return draw


def _legends(figure):
    return [*figure.legends, *(ax.get_legend() for ax in figure.axes if ax.get_legend() is not None)]


def _inside(inner, outer, tolerance=1.0) -> bool:
    return (inner.x0 >= outer.x0 - tolerance and inner.y0 >= outer.y0 - tolerance
            and inner.x1 <= outer.x1 + tolerance and inner.y1 <= outer.y1 + tolerance)


def _plots(ordered, colors):
    calibrated = [(name, entry) for name, entry in ordered if entry.get("calibration")]
    groups = list(ordered[0][1]["breakdowns"]["category"])
    return {
        "metrics": (report_module._plot_metrics, ordered, colors, 0.95),
        "reliability": (report_module._plot_reliability, calibrated, colors),
        "breakdown": (report_module._plot_breakdown, "category", groups, ordered, colors),
    }


@pytest.mark.parametrize("plot", ["metrics", "reliability", "breakdown"])
def test_the_legend_lies_inside_the_figure_and_off_the_axes(drawn, ordered, colors, plot):
    function, *args = _plots(ordered, colors)[plot]
    figure = drawn(function, *args)
    renderer = figure.canvas.get_renderer()
    legends = _legends(figure)
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    assert _inside(box, figure.bbox), (box, figure.bbox)
    for ax in figure.axes:  # a legend over an axes covers bars ("best" found no empty corner)
        assert not box.overlaps(ax.get_window_extent(renderer)), plot


def test_metric_tick_labels_do_not_overlap(drawn, ordered, colors):
    figure = drawn(report_module._plot_metrics, ordered, colors, 0.95)
    renderer = figure.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in figure.axes[0].get_xticklabels()]
    assert len(boxes) == len(METRICS) - 1
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 < right.x0


def test_the_reliability_axes_are_set_by_the_models_not_the_random_baseline(drawn, ordered, colors):
    calibrated = [(name, entry) for name, entry in ordered if entry.get("calibration")]
    assert "random" in dict(calibrated)  # uniform scores: mean predictions up to ~0.95
    points = [value for name, entry in calibrated if entry["kind"] != "baseline"
              for b in entry["calibration"]["bins"] if b["count"] for value in (b["mean_predicted"], b["fraction_positive"])]
    figure = drawn(report_module._plot_reliability, calibrated, colors)
    ax = figure.axes[0]
    assert ax.get_xlim()[1] == pytest.approx(min(1.0, 1.05 * max(points)))
    assert ax.get_ylim()[1] == pytest.approx(min(1.0, 1.05 * max(points)))
    assert max(points) < 0.6  # so the old range (to the random baseline's ~0.95) squeezed the models


def test_the_log_loss_panel_is_set_by_the_models_not_the_random_baseline(drawn, ordered, colors):
    figure = drawn(report_module._plot_metrics, ordered, colors, 0.95)
    losses = {name: entry["metrics"]["log_loss"] for name, entry in ordered if entry["metrics"]["log_loss"]["value"] is not None}
    models_top = max(e["ci_high"] for name, e in losses.items() if dict(ordered)[name]["kind"] != "baseline")
    assert losses["random"]["value"] > 1.5 * models_top
    assert figure.axes[1].get_ylim()[1] < losses["random"]["value"]


@pytest.mark.parametrize("horizontal", [False, True])
def test_a_withheld_interval_draws_no_error_bar(horizontal):
    # A zero length drew caps at the bar's top: the zero-width bar that looks certain, which the
    # withheld interval (too few users) was meant to remove. The other bar keeps its interval.
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots()
    try:
        entries = [{"value": 0.7, "ci_low": None, "ci_high": None, "num_units": 1},
                   {"value": 0.6, "ci_low": 0.5, "ci_high": 0.65}]
        report_module._grouped_bars(axes, ["auc", "mrr"], [("m", entries)], {"m": "C0"}, horizontal=horizontal)
        (container,) = [c for c in axes.containers if type(c).__name__ == "ErrorbarContainer"]
        lower, upper = (np.asarray(cap.get_xdata() if horizontal else cap.get_ydata(), dtype=float)
                        for cap in container.lines[1])
        assert np.isnan(lower[0]) and np.isnan(upper[0])  # the withheld interval: no caps
        np.testing.assert_allclose([lower[1], upper[1]], [0.5, 0.65])
    finally:
        plt.close(figure)
