"""The trade-off plots: threshold labels never pile up, legends sit outside the data."""
from __future__ import annotations

import matplotlib

matplotlib.use('Agg')

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from PIL import Image  # noqa: E402

from utils.vis.plots import label_positions, plot_budgeted_curve  # noqa: E402
from utils.vis.figures import draw_confidence_histogram  # noqa: E402


def test_labels_skip_points_that_bunch_together():
    thresholds = [i / 100 for i in range(100)]
    xs = [0.0 if t < 0.5 else 1.0 for t in thresholds]  # every point from 0.5 on lands on the same spot
    ys = [0.0 if t < 0.5 else 1.0 for t in thresholds]
    assert [t for t, _, _ in label_positions(thresholds, xs, ys)] == [0.1, 0.5]
    spread = [i / 100 for i in range(100)]
    assert [round(t, 2) for t, _, _ in label_positions(thresholds, spread, spread)] == [
        0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def _legend_outside_axes(monkeypatch, draw) -> None:
    seen = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **kw):
        real_savefig(fig, *a, **kw)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()  # legend and axes in their final places
        renderer = canvas.get_renderer()
        seen['legend'] = fig.legends[0].get_window_extent(renderer)
        seen['axes'] = fig.axes[0].get_window_extent(renderer)

    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', savefig)
    draw()
    assert seen['legend'].y1 <= seen['axes'].y0, (seen['legend'], seen['axes'])


def test_curve_legend_hides_no_point(tmp_path, monkeypatch):
    gflops, acc = [0.01 * (1 + i / 10) for i in range(100)], [50 + i / 5 for i in range(100)]
    _legend_outside_axes(monkeypatch, lambda: plot_budgeted_curve(
        gflops, acc, tmp_path / 'c.png', [(0.01, 50.0), (0.02, 69.8)], thresholds=[i / 100 for i in range(100)]))
    assert Image.open(tmp_path / 'c.png').size == (720, 600)
    plt.close('all')


def test_histogram_threshold_line_never_crosses_the_legend(tmp_path, monkeypatch):
    conf = torch.linspace(0.05, 1.0, 200)
    _legend_outside_axes(monkeypatch, lambda: draw_confidence_histogram(
        conf, 0.9, tmp_path / 'h.png', conf > 0.5, title='t'))
    assert Image.open(tmp_path / 'h.png').size == (640, 400)


def test_curve_legend_says_the_point_labels_are_thresholds(tmp_path, monkeypatch):
    """Issue 32 item 9: the small numbers beside the curve are explained in the legend."""
    seen = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **kw):
        seen['legend'] = [t.get_text() for t in fig.legends[0].get_texts()]
        seen['labels'] = [t.get_text() for t in fig.axes[0].texts]
        real_savefig(fig, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', savefig)
    gflops, acc = [0.01 * (1 + i / 10) for i in range(100)], [50 + i / 5 for i in range(100)]
    plot_budgeted_curve(gflops, acc, tmp_path / 'c.png', thresholds=[i / 100 for i in range(100)])
    assert seen['labels'][:3] == ['0.1', '0.2', '0.3']
    assert seen['legend'][0] == ('early exit, one point per threshold (small numbers: the exit threshold of that '
                                 'point)')
    plot_budgeted_curve(gflops, acc, tmp_path / 'd.png')  # no labels drawn: nothing to explain
    assert seen['labels'] == [] and seen['legend'][0] == 'early exit, one point per threshold'
    plt.close('all')
