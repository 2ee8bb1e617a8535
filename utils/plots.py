"""Plots of the accuracy/compute trade-off (matplotlib, written atomically as PNG)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence, Tuple

from . import checkpoint as checkpoint_io

__all__ = ['plot_budgeted_curve']


def plot_budgeted_curve(
        gflops: Sequence[float],
        accuracy: Sequence[float],
        path: Path,
        stage_points: Optional[Sequence[Tuple[float, float]]] = None,
        title: str = 'Budgeted batch classification',
        thresholds: Optional[Sequence[float]] = None,
        operating_point: Optional[Tuple[float, float, str]] = None,
) -> None:
    """Accuracy (%) against expected GFLOPs per image, one point per threshold.

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

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ax.plot(gflops, accuracy, '-', color='tab:blue', lw=1.5, label='early exit, thresholds 0.00-0.99')
    ax.plot(gflops, accuracy, '.', color='tab:blue', ms=3)
    if thresholds is not None:
        for t, x, y in zip(thresholds, gflops, accuracy):
            if round(t * 100) % 20 == 0 and t > 0:
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
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    plt.close(fig)
    with checkpoint_io.atomic_file(path) as f:
        f.write(buf.getvalue())
