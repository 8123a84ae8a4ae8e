"""Reward-model overoptimization (Gao, Schulman & Hilton 2022, "Scaling laws for reward model
overoptimization"): how the gold reward of a policy optimised against a proxy reward model moves with the
distance the optimisation travels, and the functional forms that fit it.

The distance is d = √KL(π ‖ π_init). For best-of-n, KL = log n − (n − 1)/n (Stiennon et al. 2020), and
the expected score of best-of-n is estimated without bias from N ≥ n samples per prompt
(:func:`best_of_n_expectation`), so one set of samples gives the whole curve, not one noisy draw per n.
Gao et al.'s forms, with R the gold (or proxy) reward relative to the initial policy's (R(0) = 0):

    best-of-n:  R_bon(d) = d (α − β d)          peak at d* = α / (2β),          R(d*) = α² / (4β)
    RL:         R_RL(d)  = d (α − β log d)      peak at d* = exp(α / β − 1),    R(d*) = β d*

Both are linear in (α, β), so :func:`fit_bon` and :func:`fit_rl` are least squares, with R² beside them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from safetylab.align.best_of_n import best_of_n_kl_bound
from safetylab.core.errors import SafetylabError


def best_of_n_weights(samples: int, n: int) -> torch.Tensor:
    """The probability that the i-th lowest of ``samples`` scores (i = 1 … N) is the highest of a uniformly
    random subset of ``n``: C(i − 1, n − 1) / C(N, n) (0 for i < n); computed in log space, so N may be large."""
    if not 1 <= n <= samples:
        raise SafetylabError(f"best-of-n: n must be in [1, {samples}] (the samples per prompt), got {n}")
    i = torch.arange(1, samples + 1, dtype=torch.float64)
    log_choose = lambda a, b: torch.lgamma(a + 1) - torch.lgamma(b + 1) - torch.lgamma(a - b + 1)  # noqa: E731
    n_ = torch.tensor(float(n), dtype=torch.float64)
    logw = log_choose(i - 1, n_ - 1) - log_choose(torch.tensor(float(samples), dtype=torch.float64), n_)
    return torch.where(i >= n, logw.exp(), torch.zeros_like(logw))


def rank_by(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The column order that sorts each row of ``scores`` (``[P, N]``) ascending, ties broken at random (by
    ``generator``), as best-of-n picks among equal scores."""
    permutation = torch.randperm(scores.shape[1], generator=generator)
    return permutation[torch.argsort(scores[:, permutation], dim=1, stable=True)]


def sorted_by(scores: torch.Tensor, values: Sequence[torch.Tensor],
              generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Each of ``values`` (``[P, N]`` like ``scores``) with every row in the order of :func:`rank_by`."""
    if scores.dim() != 2 or any(v.shape != scores.shape for v in values):
        raise SafetylabError(f"best-of-n: scores and values must be [prompts, samples] alike, got "
                             f"{tuple(scores.shape)} and {[tuple(v.shape) for v in values]}")
    order = rank_by(scores, generator)
    return [v.double().gather(1, order.expand_as(scores)) for v in values]


def best_of_n_expectation(scores: torch.Tensor, values: torch.Tensor, n: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """E[value of the sample best-of-n keeps] per prompt, without bias from N ≥ n samples a prompt (Gao et al.
    2022, appendix; Nakano et al. 2021): with the samples sorted by ``scores``, Σ_i C(i−1, n−1)/C(N, n) ·
    value_(i). ``scores`` (what best-of-n maximises: the proxy) and ``values`` (what is measured: the gold or
    the proxy itself) are ``[P, N]``."""
    (ordered,) = sorted_by(scores, [values], generator)
    return ordered @ best_of_n_weights(scores.shape[1], n)


def best_of_n_sizes(samples: int) -> list[int]:
    """n = 1, 2, 4, … up to ``samples`` (and ``samples`` itself)."""
    sizes = [2 ** k for k in range(int(math.log2(samples)) + 1)]
    return sizes if sizes[-1] == samples else [*sizes, samples]


def best_of_n_scaling(proxy: torch.Tensor, gold: torch.Tensor, sizes: Sequence[int] | None = None,
                      seed: int = 0) -> list[dict[str, float]]:
    """The best-of-n curve from one set of samples (``[P, N]`` proxy and gold scores): for each n, the mean
    proxy and gold of the kept sample (:func:`best_of_n_expectation`), KL = log n − (n − 1)/n and d = √KL."""
    proxy_sorted, gold_sorted = sorted_by(proxy, [proxy, gold], torch.Generator().manual_seed(seed))
    rows = []
    for n in sizes or best_of_n_sizes(proxy.shape[1]):
        kl, weights = best_of_n_kl_bound(n), best_of_n_weights(proxy.shape[1], n)
        rows.append({"n": n, "kl": kl, "d": math.sqrt(kl), "proxy": (proxy_sorted @ weights).mean().item(),
                     "gold": (gold_sorted @ weights).mean().item()})
    return rows


@dataclass(frozen=True)
class GoodhartFit:
    """A fitted form (``bon`` or ``rl``), its coefficients and R² on the points fitted, and where it peaks:
    ``peak_d`` and ``peak`` (0 where the fitted curve only falls; ``None`` where β ≤ 0: no turn within the
    form)."""

    form: str
    alpha: float
    beta: float
    r2: float
    peak_d: float | None
    peak: float | None

    def predict(self, d: np.ndarray) -> np.ndarray:
        d = np.asarray(d, dtype=float)
        if self.form == "bon":
            return d * (self.alpha - self.beta * d)
        return d * (self.alpha - self.beta * np.log(np.where(d > 0, d, 1.0)))

    def to_dict(self) -> dict[str, float | str | None]:
        return asdict(self)


def _least_squares(form: str, d: Sequence[float], r: Sequence[float], features) -> GoodhartFit:
    d, r = np.asarray(d, dtype=float), np.asarray(r, dtype=float)
    if d.shape != r.shape or d.ndim != 1 or len(d) < 3 or not (np.isfinite(d).all() and np.isfinite(r).all()):
        raise SafetylabError(f"fit_{form}: expected three or more finite (d, R) points of one length, got "
                             f"{d.shape} and {r.shape}")
    if (d < 0).any():
        raise SafetylabError(f"fit_{form}: d = √KL must be >= 0, got {d.min()}")
    (alpha, beta), *_ = np.linalg.lstsq(features(d), r, rcond=None)
    fit = GoodhartFit(form, float(alpha), float(beta), 0.0, None, None)
    residual = float(((r - fit.predict(d)) ** 2).sum())
    total = float(((r - r.mean()) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else float(residual == 0)
    if beta <= 0:
        return GoodhartFit(form, fit.alpha, fit.beta, r2, None, None)
    peak_d = max(alpha / (2 * beta), 0.0) if form == "bon" else math.exp(alpha / beta - 1)
    return GoodhartFit(form, fit.alpha, fit.beta, r2, float(peak_d), float(fit.predict(np.array([peak_d]))[0]))


def fit_bon(d: Sequence[float], r: Sequence[float]) -> GoodhartFit:
    """Least squares of R_bon(d) = d (α − β d) (Gao et al. 2022, eq. 1) to the points (d, R)."""
    return _least_squares("bon", d, r, lambda d: np.stack([d, -d * d], axis=1))


def fit_rl(d: Sequence[float], r: Sequence[float]) -> GoodhartFit:
    """Least squares of R_RL(d) = d (α − β log d) (Gao et al. 2022, eq. 2) to the points (d, R); d log d → 0
    at d = 0."""
    return _least_squares("rl", d, r,
                          lambda d: np.stack([d, -d * np.log(np.where(d > 0, d, 1.0))], axis=1))


__all__ = ["GoodhartFit", "best_of_n_expectation", "best_of_n_scaling", "best_of_n_sizes", "best_of_n_weights",
           "fit_bon", "fit_rl", "rank_by", "sorted_by"]
