"""Paired comparison of two classifiers on the same images: accuracy difference, its bootstrap interval,
McNemar's exact test.

Both take per-image correctness (bool arrays of the same length, the same image order). Used by
``benchmarks/bench_tradeoff.py``; plain NumPy so anyone can recompute a number from the saved
per-image outputs.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np

__all__ = ['paired_bootstrap', 'mcnemar_exact', 'accuracy_interval', 'compare_paired', 'bootstrap_weights']


def _as_bool(x: Sequence[bool], name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f'{name} must be a non-empty 1-D array of per-image correctness, got shape {a.shape}')
    return a.astype(bool)


def bootstrap_weights(n: int, reps: int, seed: int = 0) -> np.ndarray:
    """(reps, n) counts: how often each image is drawn in each bootstrap resample (rows sum to ``n``)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(reps, n))
    w = np.zeros((reps, n), dtype=np.int32)
    np.add.at(w, (np.arange(reps)[:, None], idx), 1)
    return w


def paired_bootstrap(a: Sequence[bool], b: Sequence[bool], reps: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> Tuple[float, float, float]:
    """``(diff, low, high)``: top-1 of ``a`` minus top-1 of ``b`` in points, and its percentile interval
    from ``reps`` resamples of the images (the same images for both, so the pairing is kept)."""
    a, b = _as_bool(a, 'a'), _as_bool(b, 'b')
    if a.shape != b.shape:
        raise ValueError(f'paired outputs must cover the same images: {a.size} vs {b.size}')
    d = a.astype(np.int8) - b.astype(np.int8)
    w = bootstrap_weights(d.size, reps, seed)
    diffs = (w @ d) / d.size * 100.0
    tail = (1.0 - level) / 2 * 100.0
    low, high = np.percentile(diffs, [tail, 100.0 - tail])
    return float(d.mean() * 100.0), float(low), float(high)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: a binomial test on the images exactly one of the two gets right."""
    a, b = _as_bool(a, 'a'), _as_bool(b, 'b')
    if a.shape != b.shape:
        raise ValueError(f'paired outputs must cover the same images: {a.size} vs {b.size}')
    n01 = int(np.sum(a & ~b))
    n10 = int(np.sum(~a & b))
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1))  # exact integers
    return min(1.0, 2 * tail / 2 ** n)


def accuracy_interval(correct: Sequence[bool], reps: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> Tuple[float, float, float]:
    """``(top-1, low, high)`` in percent, a percentile bootstrap interval over the images."""
    c = _as_bool(correct, 'correct').astype(np.int8)
    w = bootstrap_weights(c.size, reps, seed)
    accs = (w @ c) / c.size * 100.0
    tail = (1.0 - level) / 2 * 100.0
    low, high = np.percentile(accs, [tail, 100.0 - tail])
    return float(c.mean() * 100.0), float(low), float(high)


def compare_paired(a: Sequence[bool], b: Sequence[bool], reps: int = 10_000, seed: int = 0) -> Dict[str, float]:
    """Everything the trade-off report gives for one paired comparison, as a JSON-ready dict."""
    diff, low, high = paired_bootstrap(a, b, reps, seed)
    a_, b_ = _as_bool(a, 'a'), _as_bool(b, 'b')
    return {'top1_a': float(a_.mean() * 100.0), 'top1_b': float(b_.mean() * 100.0), 'diff': diff,
            'ci_low': low, 'ci_high': high, 'mcnemar_p': mcnemar_exact(a, b),
            'only_a_right': int(np.sum(a_ & ~b_)), 'only_b_right': int(np.sum(~a_ & b_)), 'images': int(a_.size),
            'bootstrap_reps': reps, 'bootstrap_seed': seed}
