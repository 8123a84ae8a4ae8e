"""Metrics of an evaluation with their uncertainty: rates with Wilson intervals, means with bootstrap intervals,
overall and by group.

A safety number without an interval invites reading noise as progress: an attack success rate of 3 of 40 is
anywhere from 2 % to 20 % (95 % Wilson). Every metric here carries its interval and its count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from safetylab.core.errors import SafetylabError


@dataclass(frozen=True)
class Estimate:
    """A metric's ``value`` over ``n`` samples with its ``confidence`` interval ``[low, high]``; ``method``
    names how the interval was made (``wilson`` for a rate, ``bootstrap`` for a mean)."""

    value: float
    low: float
    high: float
    n: int
    method: str
    confidence: float = 0.95

    def to_dict(self) -> dict[str, float | int | str]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "method": self.method,
                "confidence": self.confidence}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it over
    the normal interval, which collapses to a point at 0 of n)::

        (p̂ + z²/2n ± z √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n),   z = Φ⁻¹(1 − α/2)

    computed by :meth:`scipy.stats.binomtest`'s ``proportion_ci(method="wilson")``."""
    if not (isinstance(n, int) and n >= 1 and isinstance(successes, int) and 0 <= successes <= n):
        raise SafetylabError(f"wilson_interval: expected 0 <= successes <= n and n >= 1, got {successes} of {n}")
    interval = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of a mean (Efron & Tibshirani 1993): the α/2 and 1 − α/2 quantiles of
    the means of ``resamples`` resamples with replacement (:func:`scipy.stats.bootstrap`); a single value or
    identical values give a zero-width interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0 or not np.isfinite(x).all():
        raise SafetylabError(f"bootstrap_interval: expected finite values, got {len(x)} of shape {x.shape}")
    if len(x) == 1 or np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    result = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=resamples,
                             method="percentile", rng=np.random.default_rng(seed), vectorized=True)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def is_rate(values: Iterable[float]) -> bool:
    """Whether every value is 0 or 1 (booleans included): a rate, with a Wilson interval."""
    return all(v in (0, 1) for v in values)


def estimate(values: Sequence[float], confidence: float = 0.95, seed: int = 0) -> Estimate:
    """The mean of ``values`` with its interval: Wilson when every value is 0 or 1, bootstrap otherwise."""
    if len(values) == 0:
        raise SafetylabError("estimate: no values")
    if is_rate(values):
        hits = int(sum(values))
        return Estimate(hits / len(values), *wilson_interval(hits, len(values), confidence), len(values), "wilson",
                        confidence)
    low, high = bootstrap_interval(values, confidence, seed=seed)
    return Estimate(float(np.mean(values)), low, high, len(values), "bootstrap", confidence)


def grouped(values: Sequence[float], groups: Sequence[str], confidence: float = 0.95,
            seed: int = 0) -> dict[str, Estimate]:
    """:func:`estimate` of the values of each group, groups in order of first appearance."""
    if len(values) != len(groups):
        raise SafetylabError(f"grouped: {len(values)} values for {len(groups)} group labels")
    by: dict[str, list[float]] = {}
    for value, group in zip(values, groups):
        by.setdefault(group, []).append(value)
    return {group: estimate(v, confidence, seed) for group, v in by.items()}


def summarise(scores: Sequence[Mapping[str, float]], groups: Sequence[str] | None = None,
              confidence: float = 0.95, seed: int = 0) -> dict[str, dict]:
    """Per metric name over ``scores`` (one mapping per sample; a sample without a metric does not count for
    it): ``{"all": Estimate, "by": {group: Estimate}}``."""
    names = list(dict.fromkeys(name for score in scores for name in score))
    out = {}
    for name in names:
        rows = [(score[name], groups[i] if groups is not None else "") for i, score in enumerate(scores)
                if name in score and score[name] is not None and not _nan(score[name])]
        if not rows:
            continue
        values = [float(v) for v, _ in rows]
        out[name] = {"all": estimate(values, confidence, seed),
                     "by": grouped(values, [g for _, g in rows], confidence, seed) if groups is not None else {}}
    return out


def _nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


__all__ = ["Estimate", "bootstrap_interval", "estimate", "grouped", "is_rate", "summarise", "wilson_interval"]
