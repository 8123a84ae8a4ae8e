"""Overoptimization maths: the unbiased best-of-n estimator against brute force over every subset, and Gao et
al.'s two forms recovered from points they generate."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from safetylab.align.overopt import (
    best_of_n_expectation,
    best_of_n_scaling,
    best_of_n_sizes,
    best_of_n_weights,
    fit_bon,
    fit_rl,
)
from safetylab.core.errors import SafetylabError


def brute_force(scores: list[float], values: list[float], n: int) -> float:
    """The mean value of the highest-scoring sample over every n-subset."""
    subsets = list(itertools.combinations(range(len(scores)), n))
    return sum(values[max(s, key=lambda i: scores[i])] for s in subsets) / len(subsets)


def test_the_weights_are_the_distribution_of_the_subset_maximum():
    for samples, n in ((6, 1), (6, 3), (6, 6), (1000, 17)):
        w = best_of_n_weights(samples, n)
        assert w.sum().item() == pytest.approx(1.0)
        assert (w[: n - 1] == 0).all()
    assert torch.allclose(best_of_n_weights(5, 1), torch.full((5,), 0.2, dtype=torch.float64))
    assert best_of_n_weights(5, 5).tolist() == pytest.approx([0, 0, 0, 0, 1])
    # C(i-1, 2) / C(6, 3) for i = 3 … 6
    assert best_of_n_weights(6, 3).tolist() == pytest.approx([0, 0, 1 / 20, 3 / 20, 6 / 20, 10 / 20])


def test_the_estimator_equals_brute_force_over_every_subset():
    rng = np.random.default_rng(0)
    scores, values = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    for n in range(1, 8):
        got = best_of_n_expectation(torch.tensor(scores), torch.tensor(values), n)
        want = [brute_force(list(s), list(v), n) for s, v in zip(scores, values)]
        assert got.tolist() == pytest.approx(want)


def test_ties_are_broken_at_random_so_the_estimate_is_their_mean():
    scores = torch.zeros(1, 4)
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    draws = [best_of_n_expectation(scores, values, 4, torch.Generator().manual_seed(s)).item() for s in range(400)]
    assert sum(draws) / len(draws) == pytest.approx(1.5, abs=0.2)  # a uniformly random one of the four


def test_the_scaling_curve_raises_the_proxy_and_reports_kl():
    rng = np.random.default_rng(1)
    proxy = torch.tensor(rng.normal(size=(20, 64)))
    gold = proxy - 0.5 * proxy ** 2  # good up to a point, then worse: Goodhart in miniature
    rows = best_of_n_scaling(proxy, gold)
    assert [r["n"] for r in rows] == best_of_n_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert all(a["proxy"] < b["proxy"] for a, b in zip(rows, rows[1:]))
    assert rows[0]["kl"] == 0 and rows[-1]["kl"] == pytest.approx(math.log(64) - 63 / 64)
    golds = [r["gold"] for r in rows]
    assert max(golds) > golds[0] and golds[-1] < max(golds)
    assert best_of_n_sizes(100)[-2:] == [64, 100]


def test_fits_recover_the_forms_that_made_the_points():
    d = np.linspace(0, 4, 30)
    bon = fit_bon(d, d * (1.5 - 0.5 * d))
    assert (bon.alpha, bon.beta, bon.r2) == pytest.approx((1.5, 0.5, 1.0))
    assert (bon.peak_d, bon.peak) == pytest.approx((1.5, 1.5 ** 2 / 2))
    rl = fit_rl(d, d * (1.0 - 0.4 * np.log(np.where(d > 0, d, 1))))
    assert (rl.alpha, rl.beta, rl.r2) == pytest.approx((1.0, 0.4, 1.0))
    assert rl.peak_d == pytest.approx(math.exp(1.0 / 0.4 - 1)) and rl.peak == pytest.approx(0.4 * rl.peak_d)
    rising = fit_bon(d, 2 * d + 0.1 * d * d)  # no turn: β < 0, no peak
    assert rising.beta < 0 and rising.peak_d is None
    falling = fit_bon(d, -d * (0.2 + 0.5 * d))  # α < 0: the best is not to optimise at all
    assert falling.peak_d == 0 and falling.peak == 0
    noisy = fit_bon(d, d * (1.5 - 0.5 * d) + np.random.default_rng(0).normal(0, 0.3, d.shape))
    assert 0 < noisy.r2 < 1


def test_bad_input_is_refused():
    with pytest.raises(SafetylabError, match=r"n must be in \[1, 4\]"):
        best_of_n_weights(4, 5)
    with pytest.raises(SafetylabError, match="prompts, samples"):
        best_of_n_expectation(torch.zeros(2, 3), torch.zeros(2, 4), 1)
    with pytest.raises(SafetylabError, match="three or more finite"):
        fit_bon([0, 1], [0, 1])
    with pytest.raises(SafetylabError, match="three or more finite"):
        fit_rl([0, 1, float("nan")], [0, 1, 2])
    with pytest.raises(SafetylabError, match=">= 0"):
        fit_rl([-1, 1, 2], [0, 1, 2])
