"""The off-switch game, Hadfield-Menell et al. 2017 ("The Off-Switch Game"): a robot uncertain about the
human's utility defers to the human's off switch; a certain one disables it.

The robot can act now (a, utility U_a to the human), switch itself off (s, utility 0), or wait (w): the
human then either lets the action go ahead or presses the switch. The robot's belief about U_a is
Gaussian, N(μ, σ²). With a rational human, who presses the switch exactly when U_a < 0,

    V(a) = E[U_a] = μ,   V(s) = 0,   V(w) = E[max(U_a, 0)] = μ Φ(μ/σ) + σ φ(μ/σ)

and the value of deference Δ = V(w) − max(V(a), V(s)) ≥ 0 (Theorem 1): waiting is never worse, strictly
better while the robot is uncertain (σ > 0), and worth nothing to a certain robot (σ → 0), which then
gains nothing by keeping the switch — and prefers to disable it as soon as the human errs. A
Boltzmann-rational human with rationality β lets the action go ahead with probability 1/(1 + e^(−β U_a)),
so V(w) = E[U_a · sigmoid(β U_a)]: with a noisy human a sufficiently certain robot stops deferring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import norm

from safetylab.core.errors import SafetylabError
from safetylab.core.io import save_figure


@dataclass(frozen=True)
class OffSwitchValues:
    act: float  # V(a)
    off: float  # V(s)
    wait: float  # V(w)

    @property
    def deference(self) -> float:
        """Δ = V(w) − max(V(a), V(s)): what the robot gains by leaving the switch to the human."""
        return self.wait - max(self.act, self.off)

    @property
    def choice(self) -> str:
        return max((("wait", self.wait), ("act", self.act), ("off", self.off)), key=lambda kv: kv[1])[0]


def _check(mu: float, sigma: float) -> None:
    if not sigma >= 0 or not math.isfinite(mu):
        raise SafetylabError(f"the belief N(mu, sigma^2) needs a finite mu and sigma >= 0, got mu={mu}, sigma={sigma}")


def rational_values(mu: float, sigma: float) -> OffSwitchValues:
    """Closed-form values against a rational human: V(w) = μ Φ(μ/σ) + σ φ(μ/σ) (= max(μ, 0) at σ = 0)."""
    _check(mu, sigma)
    wait = max(mu, 0.0) if sigma == 0 else mu * norm.cdf(mu / sigma) + sigma * norm.pdf(mu / sigma)
    return OffSwitchValues(act=mu, off=0.0, wait=float(wait))


def simulated_values(mu: float, sigma: float, beta: float = math.inf, samples: int = 200_000,
                     seed: int = 0) -> OffSwitchValues:
    """Monte Carlo values: U_a drawn from the robot's belief, the human deciding with rationality ``beta``
    (∞: rational, presses exactly when U_a < 0; finite: lets the action go ahead with probability
    sigmoid(β U_a))."""
    _check(mu, sigma)
    if not beta > 0:
        raise SafetylabError(f"beta (the human's rationality) must be > 0, got {beta}")
    utility = np.random.default_rng(seed).normal(mu, sigma, samples)
    allow = (utility >= 0).astype(float) if math.isinf(beta) else 1 / (1 + np.exp(-beta * utility))
    return OffSwitchValues(act=float(utility.mean()), off=0.0, wait=float((utility * allow).mean()))


def plot_deference(path, mus=(-1.0, 0.0, 1.0), sigmas=np.linspace(0.0, 3.0, 61), beta: float = 2.0):
    """The value of deference against the robot's uncertainty σ, for each prior mean μ: rational human
    (closed form, solid) and a Boltzmann-rational one (rationality ``beta``, simulated, dashed)."""
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    for i, mu in enumerate(mus):
        ax.plot(sigmas, [rational_values(mu, s).deference for s in sigmas], "-", color=f"C{i}",
                label=f"μ = {mu:g}, rational human")
        ax.plot(sigmas, [simulated_values(mu, s, beta, 20_000).deference for s in sigmas], "--", color=f"C{i}",
                label=f"μ = {mu:g}, β = {beta:g}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="robot's uncertainty σ about the human's utility", ylabel="value of deference Δ",
           title="The off-switch game")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    return save_figure(fig, path)
