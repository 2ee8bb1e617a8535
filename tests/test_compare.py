"""Paired comparison statistics (utils.inference.compare) and label-free budget thresholds."""
import numpy as np
import pytest
import torch

from utils.inference.compare import accuracy_interval, compare_paired, mcnemar_exact, paired_bootstrap
from utils.inference.early_exit import threshold_for_budget, threshold_for_count, threshold_for_share


def test_mcnemar_exact_values():
    a = np.array([True] * 10 + [False] * 5)
    b = np.array([False] * 10 + [False] * 5)
    assert mcnemar_exact(a, b) == pytest.approx(2 / 2 ** 10)  # 10 discordant, all one way
    assert mcnemar_exact(b, a) == pytest.approx(2 / 2 ** 10)
    # 3 vs 1 discordant: 2 * P(X <= 1), X ~ Bin(4, 1/2) = 2 * 5/16
    a = np.array([1, 1, 1, 0, 1, 0], bool)
    b = np.array([0, 0, 0, 1, 1, 0], bool)
    assert mcnemar_exact(a, b) == pytest.approx(10 / 16)
    assert mcnemar_exact(a, a) == 1.0  # no discordant image
    assert mcnemar_exact([1, 0], [0, 1]) == 1.0  # balanced: capped at 1


def test_paired_bootstrap_centres_on_the_difference_and_keeps_the_pairing():
    rng = np.random.default_rng(1)
    b = rng.random(1500) < 0.6
    a = b.copy()
    flip = rng.choice(1500, 60, replace=False)  # a gets 60 more images right, loses none
    a[flip] = True
    gained = int(np.sum(a & ~b))
    diff, low, high = paired_bootstrap(a, b, reps=2000, seed=0)
    assert diff == pytest.approx(gained / 1500 * 100)
    assert 0 < low < diff < high  # only-one-way discordance: the interval stays above 0
    assert high - low < 2.0  # pairing: far narrower than two independent accuracies (about +-2.5 each)
    assert paired_bootstrap(a, b, reps=2000, seed=0) == (diff, low, high)  # seeded
    assert paired_bootstrap(b, b, reps=200) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match='same images'):
        paired_bootstrap(a, b[:-1])


def test_accuracy_interval_and_compare_paired():
    c = np.array([True] * 600 + [False] * 400)
    acc, low, high = accuracy_interval(c, reps=4000)
    assert acc == pytest.approx(60.0) and low < 60.0 < high
    assert 2.0 < (high - low) / 2 < 4.0  # binomial: 1.96 * sqrt(.6 * .4 / 1000) = 3.04 points
    d = compare_paired(c, ~c, reps=500)
    assert d['top1_a'] == pytest.approx(60.0) and d['top1_b'] == pytest.approx(40.0)
    assert d['diff'] == pytest.approx(20.0) and d['only_a_right'] == 600 and d['only_b_right'] == 400
    assert d['mcnemar_p'] < 1e-8 and d['images'] == 1000


def test_budget_thresholds_use_only_the_confidences():
    conf = torch.arange(1, 101, dtype=torch.float32) / 100  # 0.01 .. 1.00
    assert threshold_for_count(conf, 0) == 1.01 and threshold_for_count(conf, 100) == 0.0
    t = threshold_for_count(conf, 30)
    assert int((conf >= t).sum()) == 30
    assert int((conf >= threshold_for_share(conf, 0.25)).sum()) == 25
    flops = [1.0, 3.0]  # coarse, both stages
    for budget, n_exit in ((2.0, 50), (1.0, 100), (3.0, 0), (2.5, 25), (1.7, 65)):
        t = threshold_for_budget(conf, flops, budget)
        exits = int((conf >= t).sum())
        assert exits == n_exit
        assert exits / 100 * 1.0 + (1 - exits / 100) * 3.0 <= budget + 1e-9  # never above the budget
    assert threshold_for_budget(conf, flops, 10.0) == 1.01  # more than both stages: none exits
    with pytest.raises(ValueError, match='below the coarse stage alone'):
        threshold_for_budget(conf, flops, 0.5)
