"""Selective prediction: a classifier that abstains when in doubt, so the control layer can escalate.

Sign convention: every score here is a *doubt* score, higher = more doubtful (the same sign as the OOD
detectors' ``score``); an input is accepted when its score is <= the threshold and abstained on when it
is > the threshold. The maximum softmax probability enters as its negative (:func:`msp_score`).

- risk–coverage curves and the area under them (AURC, excess AURC);
- thresholds chosen on validation data for a target coverage or a target selective risk (optionally
  with a Clopper–Pearson bound);
- :class:`SelectiveClassifier`: a model plus named :class:`Criterion` thresholds; its predictions say
  which criterion fired on which input and by how much.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.core.io import save_figure
from safetylab.core.tensors import check_fraction, check_labels, predict_logits

Score = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- checks
def _check_scores(scores: object, name: str, n: int | None = None) -> torch.Tensor:
    """A 1-D, non-empty, finite tensor of scores, as float64 on the CPU."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise SafetylabError(f"{name} must be a 1-D tensor of scores (N,), got {shape}")
    if n is not None and len(scores) != n:
        raise SafetylabError(f"{name} has {len(scores)} scores for {n} inputs")
    if len(scores) == 0:
        raise SafetylabError(f"{name} is empty: expected at least one score")
    if not torch.isfinite(scores).all():
        raise SafetylabError(f"{name} holds NaN or infinite values")
    return scores.detach().cpu().double()


def _check_correct(correct: object, n: int) -> torch.Tensor:
    """A 1-D boolean (or 0/1 integer) tensor of length ``n``, as bool on the CPU."""
    if not isinstance(correct, torch.Tensor) or correct.dim() != 1 or len(correct) != n:
        shape = tuple(correct.shape) if isinstance(correct, torch.Tensor) else type(correct).__name__
        raise SafetylabError(f"correct must be a 1-D tensor of {n} booleans (one per score), got {shape}")
    correct = correct.detach().cpu()
    if correct.dtype != torch.bool and (correct.is_floating_point() or ((correct != 0) & (correct != 1)).any()):
        raise SafetylabError(f"correct must hold booleans (or 0/1 integers), got {correct.dtype}")
    return correct.bool()


# ----------------------------------------------------------------------------- risk–coverage
def _acceptance_points(scores: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The thresholds that can be set (each distinct score), with the number accepted at score <= t and
    how many of those are errors, in order of increasing threshold. Tied scores are accepted together."""
    order = torch.sort(scores, stable=True)
    sorted_scores = order.values
    errors = torch.cumsum((~correct[order.indices]).double(), 0)
    last = torch.ones(len(scores), dtype=torch.bool)
    last[:-1] = sorted_scores[1:] > sorted_scores[:-1]  # the end of each group of ties
    accepted = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    return sorted_scores[last], accepted[last], errors[last]


def risk_coverage(uncertainty: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Risk–coverage curve of selective classification (El-Yaniv & Wiener 2010, "On the foundations of
    noise-free selective classification"; Geifman & El-Yaniv 2017).

    Inputs are accepted in order of increasing ``uncertainty``; tied values are accepted together, so a
    point exists only where a threshold can sit (one per distinct uncertainty). For the threshold t:

        coverage(t) = |{i : u_i <= t}| / N,    risk(t) = |{i : u_i <= t, not correct_i}| / |{i : u_i <= t}|

    Returns ``(coverage, risk)``, float64, in order of increasing coverage; the last point is (1, error rate).
    """
    u = _check_scores(uncertainty, "uncertainty")
    _, accepted, errors = _acceptance_points(u, _check_correct(correct, len(u)))
    return accepted / len(u), errors / accepted


def _area(coverage: torch.Tensor, risk: torch.Tensor) -> float:
    """Σ_j (c_j − c_{j−1}) · r_j with c_0 = 0: the area under the step curve that holds r_j on (c_{j−1}, c_j]."""
    widths = torch.diff(coverage, prepend=coverage.new_zeros(1))
    return (widths * risk).sum().item()


def aurc(uncertainty: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk–coverage curve (Geifman et al. 2019, "Bias-reduced uncertainty estimation for
    deep neural classifiers"), lower is better:

        AURC = (1/N) Σ_{n=1}^{N} risk(n̄),   n̄ = the smallest number of accepted inputs >= n that a threshold
        can give (the end of n's group of tied uncertainties)

    that is, the mean selective risk over the N acceptance sizes, where an acceptance size inside a group of
    ties takes the risk of accepting the whole group. Without ties this is (1/N) Σ_n (errors among the n
    least uncertain) / n. Equivalently the area Σ_j (c_j − c_{j−1}) · r_j under the points of
    :func:`risk_coverage`.
    """
    return _area(*risk_coverage(uncertainty, correct))


def optimal_aurc(correct: torch.Tensor) -> float:
    """The AURC of a perfect ranking (every correct prediction less uncertain than every error), Geifman et
    al. 2019: with r errors among N, (1/N) Σ_{n=N−r+1}^{N} (n − (N − r)) / n."""
    if not isinstance(correct, torch.Tensor) or correct.dim() != 1 or len(correct) == 0:
        raise SafetylabError("correct must be a non-empty 1-D tensor of booleans (or 0/1 integers)")
    correct = _check_correct(correct, len(correct))
    n, r = len(correct), int((~correct).sum())
    return sum((k - (n - r)) / k for k in range(n - r + 1, n + 1)) / n


def excess_aurc(uncertainty: torch.Tensor, correct: torch.Tensor) -> float:
    """E-AURC = AURC − AURC of a perfect ranking (Geifman et al. 2019): the part of the AURC due to the
    ranking rather than to the classifier's error rate; 0 for a perfect ranking."""
    return aurc(uncertainty, correct) - optimal_aurc(correct)


# ----------------------------------------------------------------------------- thresholds
def threshold_for_coverage(scores: torch.Tensor, coverage: float) -> float:
    """The smallest threshold t (one of the scores) that accepts at least a ``coverage`` fraction of the
    inputs with score <= t: the ⌈coverage·N⌉-th smallest score (ties may push the coverage above the
    target). ``coverage`` 0 returns −∞: abstain on everything.
    """
    s = _check_scores(scores, "scores")
    coverage = check_fraction(coverage, "coverage")
    k = math.ceil(coverage * len(s) - 1e-9)  # tolerate rounding error in coverage · N (0.7 · 10 = 7.000…01)
    return -math.inf if k <= 0 else torch.sort(s).values[k - 1].item()


def clopper_pearson_upper(errors: int, n: int, delta: float) -> float:
    """One-sided Clopper–Pearson upper bound on an error rate at confidence 1 − δ (Clopper & Pearson 1934):
    the p with P(Binomial(n, p) <= errors) = δ, i.e. the (1 − δ) quantile of Beta(errors + 1, n − errors);
    1 when errors = n. Needs scipy."""
    if errors >= n:
        return 1.0
    try:
        from scipy.stats import beta
    except ImportError:
        raise SafetylabError("the Clopper–Pearson bound (delta=...) needs scipy: pip install scipy") from None
    return float(beta.ppf(1 - delta, errors + 1, n - errors))


def threshold_for_risk(scores: torch.Tensor, correct: torch.Tensor, risk: float, delta: float | None = None) -> float:
    """The threshold t (accept score <= t) with the largest coverage on this validation data whose selective
    risk is at most ``risk`` (Geifman & El-Yaniv 2017, "Selective classification for deep neural networks").

    Without ``delta`` the empirical risk (errors / accepted) is compared with the target. With ``delta`` the
    one-sided Clopper–Pearson upper bound at confidence 1 − δ is compared instead, so that for that
    threshold the true risk exceeds the target with probability at most δ. The bound holds for one
    threshold; this scans all of them (Geifman & El-Yaniv's SGR divides δ by the ⌈log₂ N⌉ thresholds its
    binary search tests), so pass δ / (number of distinct scores) for a guarantee on the chosen one.

    If no threshold meets the target, returns −∞, a threshold that abstains on everything, rather than
    raising: the caller sees coverage 0, not an error.
    """
    s = _check_scores(scores, "scores")
    correct = _check_correct(correct, len(s))
    risk = check_fraction(risk, "risk")
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1):
        raise SafetylabError(f"delta must be a number in (0, 1) or None, got {delta!r}")
    thresholds, accepted, errors = _acceptance_points(s, correct)
    for t, n, e in zip(reversed(thresholds.tolist()), reversed(accepted.tolist()), reversed(errors.tolist())):
        bound = e / n if delta is None else clopper_pearson_upper(int(e), int(n), delta)
        if bound <= risk:
            return t
    return -math.inf


# ----------------------------------------------------------------------------- the abstaining classifier
@dataclass(frozen=True)
class Criterion:
    """A named reason to abstain: ``score(x)`` -> (N,) doubt scores, higher = more doubtful (the sign of
    the OOD detectors' ``score``); the criterion fires on an input when its score > ``threshold``."""

    name: str
    score: Score
    threshold: float

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise SafetylabError(f"Criterion name must be a non-empty string, got {self.name!r}")
        if not callable(self.score):
            raise SafetylabError(f"Criterion {self.name!r}: score must be a callable x -> Tensor (N,)")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or \
                math.isnan(self.threshold):
            raise SafetylabError(f"Criterion {self.name!r}: threshold must be a number, got {self.threshold!r}")


@dataclass(frozen=True)
class Abstention:
    """One criterion firing on one input: its score exceeded its threshold."""

    index: int
    criterion: str
    score: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; a threshold of −∞ (a criterion that abstains on everything) becomes None."""
        return {"index": self.index, "criterion": self.criterion, "score": self.score,
                "threshold": self.threshold if math.isfinite(self.threshold) else None}


@dataclass(frozen=True)
class SelectivePredictions:
    """Predictions of a :class:`SelectiveClassifier` on N inputs, on the CPU."""

    labels: torch.Tensor  # (N,) int64: the predicted class, −1 where abstained
    probs: torch.Tensor  # (N, classes): the model's softmax probabilities, abstained or not
    abstained: torch.Tensor  # (N,) bool
    reasons: list[str | None]  # per input: every criterion that fired ("msp score 0.62 > threshold 0.41"), or None
    scores: dict[str, torch.Tensor] = field(repr=False)  # criterion name -> (N,) float64 scores
    thresholds: dict[str, float] = field(repr=False)  # criterion name -> threshold

    @property
    def coverage(self) -> float:
        """The fraction of inputs accepted."""
        return 1.0 - self.abstained.double().mean().item()

    def abstentions(self) -> list[Abstention]:
        """One record per (input, criterion that fired), in input order then criterion order."""
        records = []
        for i in self.abstained.nonzero()[:, 0].tolist():
            for name, scores in self.scores.items():
                score, threshold = scores[i].item(), self.thresholds[name]
                if score > threshold:
                    records.append(Abstention(i, name, score, threshold))
        return records


class SelectiveClassifier:
    """A classifier that abstains on an input when any of its criteria fires (score > threshold), and says
    which fired and by how much, so a control layer can escalate the input to a human or a stronger model.

    The model must be in evaluation mode; its logits are computed in batches on its own device. Each
    criterion's ``score`` receives the inputs as given.
    """

    def __init__(self, model: nn.Module, criteria: Sequence[Criterion]):
        criteria = list(criteria)
        if not criteria or not all(isinstance(c, Criterion) for c in criteria):
            raise SafetylabError("criteria must be a non-empty sequence of Criterion")
        names = [c.name for c in criteria]
        if len(set(names)) != len(names):
            raise SafetylabError(f"criteria must have distinct names, got {names}")
        self.model = model
        self.criteria = criteria

    def predict(self, x: torch.Tensor) -> SelectivePredictions:
        probs = predict_logits(self.model, x).softmax(1)
        labels = probs.argmax(1)
        scores = {c.name: _check_scores(c.score(x), f"criterion {c.name!r} score", len(x)) for c in self.criteria}
        thresholds = {c.name: float(c.threshold) for c in self.criteria}
        fired = {name: s > thresholds[name] for name, s in scores.items()}
        abstained = torch.stack(list(fired.values())).any(0)
        listed = {name: list(zip(s.tolist(), fired[name].tolist())) for name, s in scores.items()}
        reasons = []
        for i in range(len(x)):
            why = [f"{name} score {rows[i][0]:.4g} > threshold {thresholds[name]:.4g}"
                   for name, rows in listed.items() if rows[i][1]]
            reasons.append("; ".join(why) or None)
        return SelectivePredictions(labels.masked_fill(abstained, -1), probs, abstained, reasons, scores, thresholds)


def msp_score(model: nn.Module) -> Score:
    """The doubt score −max_c softmax(f(x))_c: the negated maximum softmax probability (the "softmax
    response" of Geifman & El-Yaniv 2017; Hendrycks & Gimpel 2017, "A baseline for detecting misclassified
    and out-of-distribution examples"). The model must be in evaluation mode."""
    return lambda x: -predict_logits(model, x).softmax(1).max(1).values


def criterion_for_coverage(name: str, score: Score, x_val: torch.Tensor, coverage: float) -> Criterion:
    """A criterion whose threshold accepts at least a ``coverage`` fraction of ``x_val``
    (:func:`threshold_for_coverage`)."""
    return Criterion(name, score, threshold_for_coverage(_check_scores(score(x_val), f"{name} score", len(x_val)),
                                                                 coverage))


def criterion_for_risk(name: str, score: Score, model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor,
                       risk: float, delta: float | None = None) -> Criterion:
    """A criterion whose threshold gives the largest coverage of ``x_val`` with the model's selective risk at
    most ``risk`` (empirical, or its Clopper–Pearson bound with ``delta``; :func:`threshold_for_risk`).

    The risk is that of this criterion alone: other criteria of the same classifier only abstain more, and
    their abstentions may raise or lower the risk among what remains.
    """
    logits = predict_logits(model, x_val)
    correct = logits.argmax(1) == check_labels(y_val, logits.shape[1], len(logits), "y_val").cpu()
    scores = _check_scores(score(x_val), f"{name} score", len(x_val))
    return Criterion(name, score, threshold_for_risk(scores, correct, risk, delta))


# ----------------------------------------------------------------------------- plots
def plot_risk_coverage(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | os.PathLike,
                       title: str = "Risk–coverage") -> Path:
    """Risk–coverage curves (from :func:`risk_coverage`) of one or several doubt scores as steps, each
    model's AURC in the legend; written atomically."""
    if not isinstance(curves, dict) or not curves:
        raise SafetylabError("curves must be a non-empty dict of name -> (coverage, risk)")
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for name, curve in curves.items():
        if not (isinstance(curve, tuple) and len(curve) == 2 and all(isinstance(t, torch.Tensor) for t in curve)
                and curve[0].shape == curve[1].shape and curve[0].dim() == 1 and len(curve[0]) > 0):
            raise SafetylabError(f"curves[{name!r}] must be a (coverage, risk) pair of equal-length 1-D tensors")
        coverage, risk = (t.detach().cpu().double() for t in curve)
        ax.step(torch.cat([coverage.new_zeros(1), coverage]), torch.cat([risk[:1], risk]), where="pre",
                label=f"{name} (AURC {_area(coverage, risk):.4f})")
    ax.set(xlim=(0, 1), xlabel="coverage", ylabel="selective risk (error rate among accepted)", title=title)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
