"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019, "Certified adversarial robustness via randomized
smoothing").

From any base classifier f, the smoothed classifier g(x) = argmax_c P(f(x + ε) = c), ε ~ N(0, σ²I), returns
the class f most likely returns under Gaussian noise. Its prediction provably cannot change within an
ℓ2 ball around x whose radius follows from the class probabilities, which are estimated by Monte Carlo
with a confidence level 1 − α. This module holds:

- :func:`clopper_pearson_lower` and :func:`certified_radius`: the maths of the certificate;
- :class:`SmoothedClassifier`: sampling, PREDICT and CERTIFY for one input, and a batch loop
  (:class:`Certificates`);
- :func:`certified_accuracy_at`: the share of inputs certified correct at each radius.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.core.tensors import check_eval, check_labels, model_device, model_dtype


# ----------------------------------------------------------------------------- checks
def _check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise SafetylabError(f"{name} must be an integer >= 1 (a number of noise samples), got {value!r}")
    return int(value)


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0 < alpha < 1:
        raise SafetylabError(f"alpha must be a number in (0, 1) (the probability that the answer is wrong), "
                             f"got {alpha!r}")
    return float(alpha)


# ----------------------------------------------------------------------------- the certificate
def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided Clopper–Pearson lower bound on a success probability p at confidence 1 − α (Clopper &
    Pearson 1934, "The use of confidence or fiducial limits illustrated in the case of the binomial"):
    the p with P(Binomial(trials, p) >= successes) = α, i.e. the α quantile of
    Beta(successes, trials − successes + 1); 0 when successes = 0."""
    if successes == 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """The ℓ2 radius R = σ Φ⁻¹(p_A) within which the smoothed classifier's prediction cannot change, for a
    lower bound p_A > 1/2 on the probability of the top class (Cohen, Rosenfeld & Kolter 2019, Theorem 1,
    R = σ/2 (Φ⁻¹(p_A) − Φ⁻¹(p_B)), with the upper bound p_B = 1 − p_A on every other class)."""
    return sigma * float(norm.ppf(p_lower))


# ----------------------------------------------------------------------------- the smoothed classifier
@dataclass(frozen=True)
class Certificates:
    """Per-input results of :meth:`SmoothedClassifier.certify_batch`."""

    prediction: torch.Tensor  # (N,) long: the certified class, or the abstain value
    radius: torch.Tensor  # (N,) float64: the certified ℓ2 radius, 0 where abstained
    correct: torch.Tensor | None  # (N,) bool: prediction == label (never where abstained); None without labels


class SmoothedClassifier:
    """The Gaussian-smoothed version g of an evaluation-mode classifier ``model`` (inputs ``(N, ...)`` to
    logits ``(N, K)``), with noise level ``sigma`` (Cohen, Rosenfeld & Kolter 2019).

    The noisy inputs x + ε are not clipped to any input range: the certificate is for the smoothed
    classifier on all of R^d. The noise is drawn and added in the wider of x's dtype and the model's, and
    the noisy copies reach the model in its own dtype: that cast is part of the base classifier, for which
    the certificate holds whatever it is (a float64 x is not rounded before the noise is added, nor is
    float16 noise drawn for a float32 model). Noise is drawn in batches of ``batch_size`` from
    ``generator`` (on its device) when given, else from torch's global generator on the model's device;
    the same generator seed gives the same answers. ``abstain`` (negative) is returned when the smoothed
    classifier cannot decide at the requested confidence.
    """

    def __init__(self, model: nn.Module, sigma: float, num_classes: int | None = None, batch_size: int = 1000,
                 abstain: int = -1) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, Real) or not 0 < sigma < math.inf:
            raise SafetylabError(f"sigma must be a finite number > 0 (the noise standard deviation), got {sigma!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, Integral)
                                        or num_classes < 2):
            raise SafetylabError(f"num_classes must be None (read from the logits) or an integer >= 2, "
                                 f"got {num_classes!r}")
        if isinstance(abstain, bool) or not isinstance(abstain, Integral) or abstain >= 0:
            raise SafetylabError(f"abstain must be a negative integer (class indices are >= 0), got {abstain!r}")
        self.model = check_eval(model)
        self.sigma = float(sigma)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.batch_size = _check_count(batch_size, "batch_size")
        self.abstain = int(abstain)

    def _logits(self, noisy: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        """The model's logits on a batch of noisy copies, with an error naming the expected shape of x."""
        expected = (f"x must be ONE input, shaped as the model's input without the batch dimension (the model "
                    f"sees a batch of noisy copies, shape (copies, *x.shape)); got x of shape {x_shape}. "
                    "For a batch of inputs use certify_batch, or pass x[i]")
        try:
            logits = self.model(noisy)
        except (RuntimeError, ValueError) as e:
            raise SafetylabError(f"{expected} (the model failed: {e})") from e
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(noisy):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise SafetylabError(f"{expected} (the model returned {got} for {len(noisy)} copies, "
                                 f"expected logits ({len(noisy)}, classes))")
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise SafetylabError(f"num_classes is {self.num_classes} but the model returns {logits.shape[1]} logits")
        return logits

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """``x`` on the model's device in the dtype the noise is drawn and added in (the wider of its own and
        the model's), and the dtype the model takes (its own; for a model without parameters, that one)."""
        own = model_dtype(self.model)
        x = x.to(model_device(self.model), torch.promote_types(x.dtype, own or torch.get_default_dtype()))
        return x, own or x.dtype

    @torch.no_grad()
    def _count_classes(self, x: torch.Tensor) -> int:
        """The number of classes: the width of the model's logits on the one input ``x`` itself."""
        check_eval(self.model)
        x, fed = self._inputs(x)
        return self._logits(x.unsqueeze(0).to(fed), tuple(x.shape)).shape[1]

    @torch.no_grad()
    def sample_counts(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """How often the base model predicts each class on ``n`` noisy copies x + ε, ε ~ N(0, σ²I), of ONE
        input ``x`` (not clipped): a LongTensor ``(K,)`` on the CPU that sums to ``n``."""
        n = _check_count(n, "n")
        check_eval(self.model)
        if not isinstance(x, torch.Tensor) or x.numel() == 0 or not torch.isfinite(x).all():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise SafetylabError(f"x must be one non-empty input tensor with finite values, got {got}")
        x, fed = self._inputs(x)
        noise_device = generator.device if generator is not None else x.device
        counts = None
        for start in range(0, n, self.batch_size):
            size = min(self.batch_size, n - start)
            noise = torch.randn((size, *x.shape), generator=generator, device=noise_device, dtype=x.dtype)
            logits = self._logits((x + self.sigma * noise.to(x.device)).to(fed), tuple(x.shape))
            batch_counts = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
            counts = batch_counts if counts is None else counts + batch_counts
        return counts.cpu()

    def predict(self, x: torch.Tensor, n: int, alpha: float = 0.001, generator: torch.Generator | None = None) -> int:
        """PREDICT (Cohen et al. 2019, Algorithm 1): the top class c_A of ``n`` noisy samples if the two-sided
        binomial test of its count n_A against the runner-up's n_B, H0: P(c_A) = P(c_B), rejects at level
        ``alpha`` (p-value <= α), else the abstain value. It returns a class other than g(x) with
        probability at most α."""
        alpha = _check_alpha(alpha)
        top = self.sample_counts(x, n, generator).topk(2)
        n_a, n_b = (int(c) for c in top.values)
        if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
            return int(top.indices[0])
        return self.abstain

    def certify(self, x: torch.Tensor, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                generator: torch.Generator | None = None) -> tuple[int, float]:
        """CERTIFY (Cohen et al. 2019, Algorithm 1): guess the top class c_A from ``n0`` noisy samples, count
        it in ``n`` fresh ones, and bound P(f(x + ε) = c_A) from below by the one-sided Clopper–Pearson
        bound p_A at confidence 1 − α. If p_A > 1/2, return (c_A, σ Φ⁻¹(p_A)); else (abstain, 0.0). With
        probability at least 1 − α, a returned class is g(x) and g is constant on the ℓ2 ball of that
        radius around x."""
        n0, n, alpha = _check_count(n0, "n0"), _check_count(n, "n"), _check_alpha(alpha)
        guess = int(self.sample_counts(x, n0, generator).argmax())
        p_lower = clopper_pearson_lower(int(self.sample_counts(x, n, generator)[guess]), n, alpha)
        if p_lower > 0.5:
            return guess, certified_radius(p_lower, self.sigma)
        return self.abstain, 0.0

    def certify_batch(self, x: torch.Tensor, labels: torch.Tensor | None = None, n0: int = 100, n: int = 100_000,
                      alpha: float = 0.001, generator: torch.Generator | None = None) -> Certificates:
        """:meth:`certify` on each input of the batch ``x`` ``(N, ...)`` in turn, and whether each certified
        class equals its label when ``labels`` ``(N,)`` are given (an abstention is never correct)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or len(x) == 0:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise SafetylabError(f"x must be a batch of inputs (N, ...) with N >= 1, got {got}")
        if labels is not None:
            classes = self.num_classes or self._count_classes(x[0])
            labels = check_labels(labels, classes, len(x), "labels")
        results = [self.certify(xi, n0, n, alpha, generator) for xi in x]
        prediction = torch.tensor([c for c, _ in results], dtype=torch.long)
        radius = torch.tensor([r for _, r in results], dtype=torch.float64)
        correct = None if labels is None else prediction == labels.cpu()
        return Certificates(prediction, radius, correct)


# ----------------------------------------------------------------------------- evaluation
def certified_accuracy_at(radii: torch.Tensor, correct: torch.Tensor,
                       thresholds: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Certified accuracy at each radius r (Cohen, Rosenfeld & Kolter 2019, Section 4): the share of inputs
    whose certified prediction is correct and whose certified radius is >= r. Abstentions (radius 0, as
    :meth:`SmoothedClassifier.certify` returns them) count as not certified, whatever ``correct`` says.
    Returns float64 ``(len(thresholds),)``."""
    if not isinstance(radii, torch.Tensor) or radii.dim() != 1 or len(radii) == 0:
        got = tuple(radii.shape) if isinstance(radii, torch.Tensor) else type(radii).__name__
        raise SafetylabError(f"radii must be a non-empty 1-D tensor of certified radii (N,), got {got}")
    radii = radii.detach().cpu().double()
    if torch.isnan(radii).any() or (radii < 0).any():
        raise SafetylabError("radii must be >= 0 (0 where the smoothed classifier abstained), got NaN or negatives")
    if not isinstance(correct, torch.Tensor) or correct.shape != radii.shape:
        got = tuple(correct.shape) if isinstance(correct, torch.Tensor) else type(correct).__name__
        raise SafetylabError(f"correct must be a 1-D tensor of {len(radii)} booleans (one per radius), got {got}")
    correct = correct.detach().cpu()
    if correct.dtype != torch.bool and (correct.is_floating_point() or ((correct != 0) & (correct != 1)).any()):
        raise SafetylabError(f"correct must hold booleans (or 0/1 integers), got {correct.dtype}")
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64).cpu()
    if thresholds.dim() != 1 or len(thresholds) == 0 or not torch.isfinite(thresholds).all() or (thresholds < 0).any():
        raise SafetylabError(f"thresholds must be a non-empty 1-D sequence of finite radii >= 0, "
                             f"got {thresholds.tolist()}")
    certified = correct.bool() & (radii > 0)
    return (certified[None, :] & (radii[None, :] >= thresholds[:, None])).double().mean(1)
