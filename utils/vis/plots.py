"""Plots of the accuracy/compute trade-off (matplotlib, written atomically as PNG)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from utils.common import atomic

__all__ = ['plot_budgeted_curve', 'label_positions']


def label_positions(thresholds: Sequence[float], xs: Sequence[float], ys: Sequence[float],
                    step: float = 0.1, min_gap: float = 0.06) -> List[Tuple[float, float, float]]:
    """The sweep points to label with their threshold: multiples of ``step`` above 0, skipping any that
    would sit within ``min_gap`` (in units of the axes' data ranges) of the last labelled one, so labels never
    pile up where the curve bunches (thresholds whose points barely move)."""
    span_x = (max(xs) - min(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    chosen: List[Tuple[float, float, float]] = []
    for t, x, y in zip(thresholds, xs, ys):
        if t <= 0 or abs(t / step - round(t / step)) > 1e-6:
            continue
        if chosen and ((x - chosen[-1][1]) / span_x) ** 2 + ((y - chosen[-1][2]) / span_y) ** 2 < min_gap ** 2:
            continue
        chosen.append((t, x, y))
    return chosen


def plot_budgeted_curve(
        gflops: Sequence[float],
        accuracy: Sequence[float],
        path: Path,
        stage_points: Optional[Sequence[Tuple[float, float]]] = None,
        title: str = 'Budgeted batch classification',
        thresholds: Optional[Sequence[float]] = None,
        operating_point: Optional[Tuple[float, float, str]] = None,
) -> None:
    """Accuracy (%) against expected GFLOPs per image, one point per threshold; a few points carry their
    threshold as a small number, which the legend explains.

    Args:
        gflops, accuracy: the sweep (``budgeted_batch_classification``).
        path: PNG to write.
        stage_points: ``[(coarse GFLOPs, coarse top-1), (coarse+fine GFLOPs, fine top-1)]``.
        title: figure title.
        thresholds: the sweep's thresholds, to label a few points.
        operating_point: ``(GFLOPs, top-1, label)`` of a measured early-exit run, if any.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=120, layout='constrained')
    labelled = label_positions(thresholds, gflops, accuracy) if thresholds is not None else []
    ax.plot(gflops, accuracy, '-', color='tab:blue', lw=1.5, label='early exit, one point per threshold' + (
        ' (small numbers: the exit threshold of that point)' if labelled else ''))
    ax.plot(gflops, accuracy, '.', color='tab:blue', ms=3)
    if labelled:
        for t, x, y in labelled:
            ax.annotate(f'{t:.1f}', (x, y), textcoords='offset points', xytext=(4, -10), fontsize=7,
                        color='tab:blue')
    if stage_points:
        names = ['coarse stage only', 'always both stages']
        markers = ['s', 'D']
        for (x, y), name, m in zip(stage_points, names, markers):
            ax.plot([x], [y], m, color='tab:red' if m == 's' else 'tab:green', ms=7, label=f'{name}: {y:.2f}%')
    if operating_point is not None:
        x, y, label = operating_point
        ax.plot([x], [y], '*', color='black', ms=11, label=label)
    ax.set_xlabel('GFLOPs per image (multiply-adds)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc='outside lower center', ncols=2)  # below the axes: it hides no point
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    plt.close(fig)
    with atomic.atomic_file(path) as f:
        f.write(buf.getvalue())
