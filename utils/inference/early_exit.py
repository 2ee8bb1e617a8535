"""Budgeted-batch evaluation of early exit: accuracy and expected GFLOPs per threshold.

A sample exits at the first stage whose max softmax probability is ``>=`` that stage's threshold;
the last stage's threshold is -1, so every sample exits somewhere. ``dynamic_evaluate`` keeps the
release's per-sample loop (for reference and tests); ``budgeted_sweep`` computes every threshold
at once with the same arithmetic (comparisons in float64 against Python-float thresholds, the
expected GFLOPs accumulated in float32 as the release did), in milliseconds for 50,000 samples.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import math

import torch

__all__ = ['DEFAULT_THRESHOLDS', 'dynamic_evaluate', 'budgeted_sweep', 'sweep_from_predictions', 'threshold_for_count',
           'threshold_for_share', 'threshold_for_budget']

#: The release's sweep: 0.00, 0.01, ..., 0.99 for the coarse stage.
DEFAULT_THRESHOLDS: List[float] = [0.01 * p for p in range(100)]


def dynamic_evaluate(probs: torch.Tensor, targets: torch.Tensor, flops: Sequence[float],
                     thresholds: Sequence[float]) -> Tuple[float, float]:
    """Accuracy (%) and expected GFLOPs per image for one set of per-stage thresholds.

    The release's semantics, one sample at a time.

    Args:
        probs: (S, N, C) softmax outputs of the S stages.
        targets: (N,) labels.
        flops: S cumulative GFLOPs (``[coarse, coarse + fine]``).
        thresholds: S thresholds (the last one -1).
    """
    n_stage, n_sample, _ = probs.shape
    max_preds, argmax_preds = probs.max(dim=2)
    correct = 0
    exits = torch.zeros(n_stage)  # float32, as in the release
    for i in range(n_sample):
        for k in range(n_stage):
            if max_preds[k, i].item() >= thresholds[k]:
                correct += int(int(targets[i]) == int(argmax_preds[k, i]))
                exits[k] += 1
                break
    expected = 0
    for k in range(n_stage):
        expected = expected + (1.0 * exits[k] / n_sample) * flops[k]
    return correct * 100.0 / n_sample, float(expected)


def budgeted_sweep(probs: torch.Tensor, targets: torch.Tensor, flops: Sequence[float],
                   thresholds: Optional[Sequence[float]] = None) -> List[List[float]]:
    """The two-stage budgeted-batch sweep, vectorized over thresholds.

    Args:
        probs: (2, N, C) softmax outputs of the coarse and fine stage (or (2, N) max
            probabilities together with ``targets`` replaced by correctness, see below).
        targets: (N,) labels.
        flops: ``[coarse, coarse + fine]`` GFLOPs of one image.
        thresholds: coarse-stage thresholds (default 0.00..0.99).

    Returns:
        ``[gflops_list, accuracy_list]`` (the released ``budgeted_batch_classification``), equal
        to :func:`dynamic_evaluate` with ``[t, -1]`` for every ``t``.
    """
    if probs.shape[0] != 2:
        raise ValueError(f'the sweep is for two stages, got {probs.shape[0]}')
    max_preds, argmax_preds = probs.max(dim=2)  # (2, N)
    correct = argmax_preds.eq(targets.to(argmax_preds.device).view(1, -1))  # (2, N)
    return sweep_from_predictions(max_preds[0], correct[0], correct[1], flops, thresholds)


def sweep_from_predictions(coarse_conf: torch.Tensor, coarse_correct: torch.Tensor,
                           fine_correct: torch.Tensor, flops: Sequence[float],
                           thresholds: Optional[Sequence[float]] = None) -> List[List[float]]:
    """:func:`budgeted_sweep` from per-sample coarse confidence and per-stage correctness (N,)."""
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else list(thresholds)
    n = coarse_conf.numel()
    if n == 0:
        raise ValueError('no samples to sweep over')
    t = torch.tensor(thresholds, dtype=torch.float64).view(-1, 1)  # (T, 1)
    exit_ = coarse_conf.double().cpu().view(1, -1) >= t  # (T, N), float64 as Python's comparison
    cc, fc = coarse_correct.cpu().view(1, -1), fine_correct.cpu().view(1, -1)
    n_correct = torch.where(exit_, cc, fc).sum(dim=1)  # (T,)
    n_exit = exit_.sum(dim=1)
    accuracy = (n_correct.double() * 100.0 / n).tolist()
    share_coarse = n_exit.float() / n  # float32, as the release accumulated it
    share_fine = (n - n_exit).float() / n
    expected = share_coarse * flops[0] + share_fine * flops[1]
    return [[float(v) for v in expected.tolist()], accuracy]


def threshold_for_count(confidence: torch.Tensor, n_exit: int) -> float:
    """A threshold at which exactly the ``n_exit`` most confident samples reach it (exit), halfway between
    the last one that exits and the first that goes on (ties aside); 0.0 lets all exit, 1.01 none."""
    n = confidence.numel()
    if n_exit >= n:
        return 0.0
    if n_exit <= 0:
        return 1.01
    c = confidence.flatten().sort().values
    return float((c[n - n_exit - 1] + c[n - n_exit]) / 2)


def threshold_for_share(confidence: torch.Tensor, share: float) -> float:
    """A threshold at which ``share`` (0..1, rounded to whole samples) of ``confidence`` exits."""
    return threshold_for_count(confidence, int(round(share * confidence.numel())))


def threshold_for_budget(confidence: torch.Tensor, flops: Sequence[float], budget: float) -> float:
    """A threshold chosen without labels that spends at most ``budget`` GFLOPs per sample on average.

    With ``flops = [coarse, coarse + fine]`` per sample, the budget needs a share
    ``1 - (budget - coarse) / fine`` of the samples to exit after the coarse stage; the threshold lets
    the most confident ``ceil(share * N)`` of them exit (so the realised cost is at most the budget).
    A budget below the coarse stage's cost is refused; one above both stages' lets none exit.
    """
    coarse, total = float(flops[0]), float(flops[1])
    if budget < coarse:
        raise ValueError(f'a budget of {budget:.4g} GFLOPs is below the coarse stage alone ({coarse:.4g})')
    share = min(max(1.0 - (budget - coarse) / (total - coarse), 0.0), 1.0)
    return threshold_for_count(confidence, math.ceil(share * confidence.numel() - 1e-9))
