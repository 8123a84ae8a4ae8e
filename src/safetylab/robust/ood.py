"""Out-of-distribution (OOD) detectors and the metrics that rate them.

One sign convention throughout: **a higher score means more anomalous** (more likely out of
distribution). Every detector returns such scores, and every metric reads them so.

- metrics on two 1-D score tensors (in-distribution, OOD), in torch on any device: AUROC, AUPR-In,
  AUPR-Out, FPR at 95 % TPR, and all four at once (``ood_metrics``);
- detectors with the scikit-learn shape: ``Detector(model, ...)``, ``fit(data)`` on in-distribution
  training data (returns the detector), ``score(x)`` (N,) on CPU, and ``score_features(z)`` which skips
  the forward pass (z: logits for MSP, ODIN and Energy; penultimate features for Mahalanobis and KNN,
  which also have ``fit_features(z, y)``; probability samples (S, N, C) for ``Uncertainty``).

Inputs are checked before any batch runs (:func:`~safetylab.core.tensors.check_inputs`: a torch tensor
batch in the model's dtype, finite), and logits and features must be finite: a NaN score would be
silently accepted as in-distribution, since no threshold is below it. Scores are float32, or float64 for a
float64 model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.core.tensors import (
    Data,
    Range,
    all_finite,
    as_float,
    batches,
    check_count,
    check_eps,
    check_eval,
    check_inputs,
    check_logits,
    check_positive,
    check_range,
    logits_of,
    model_device,
    model_takes,
)
from safetylab.robust.uncertainty import ensemble_probs, mc_dropout_probs, uncertainty_split

Features = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- metrics
def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the ROC curve with OOD as the positive class: the probability that an OOD score
    exceeds an in-distribution one, ties counting 1/2,

        AUROC = U / (n_in · n_out),  U = R_out − n_out (n_out + 1) / 2,

    R_out the sum of the OOD scores' ranks among all scores, tied scores sharing their mean rank (the
    Mann–Whitney U statistic: Mann & Whitney 1947, "On a Test of Whether one of Two Random Variables is
    Stochastically Larger than the Other"). Ranks are kept doubled so that the sums are exact integers.
    """
    scores_in, scores_out = _check_scores(scores_in, scores_out)
    _, group, counts = torch.unique(torch.cat([scores_in, scores_out]), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0)
    twice_rank = (2 * ends - counts + 1)[group[len(scores_in):]]  # 2 × the mean rank (1-based) of each OOD score
    n_in, n_out = len(scores_in), len(scores_out)
    twice_u = twice_rank.sum().item() - n_out * (n_out + 1)
    return twice_u / (2 * n_in * n_out)


def _average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Average precision of ``scores`` (higher = positive) for the boolean labels ``positive``, as
    scikit-learn's ``average_precision_score`` defines it (step-wise, without interpolation; tied
    scores form one threshold):

        AP = Σ_k (R_k − R_{k−1}) · P_k

    over the distinct scores t_k in decreasing order, P_k and R_k the precision and recall of
    "positive when score ≥ t_k" (Zhu 2004, "Recall, Precision and Average Precision"). The counts are
    taken in float64, where they are exact, so that the ratios are float64 whatever the scores' dtype.
    """
    values, group = torch.unique(scores, return_inverse=True)
    tp = torch.bincount(group[positive], minlength=len(values)).flip(0).double()  # per threshold, highest first
    fp = torch.bincount(group[~positive], minlength=len(values)).flip(0).double()
    precision = tp.cumsum(0) / (tp.cumsum(0) + fp.cumsum(0))
    return ((tp * precision).sum() / tp.sum()).item()


def aupr_in(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the precision–recall curve with in-distribution as the positive class, ranking by
    −score (average precision, see ``_average_precision``; Hendrycks & Gimpel 2017, "A Baseline for
    Detecting Misclassified and Out-of-Distribution Examples in Neural Networks")."""
    scores_in, scores_out = _check_scores(scores_in, scores_out)
    return _average_precision(-torch.cat([scores_in, scores_out]), _labels(scores_in, scores_out, True))


def aupr_out(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the precision–recall curve with OOD as the positive class, ranking by score (average
    precision, see ``_average_precision``; Hendrycks & Gimpel 2017)."""
    scores_in, scores_out = _check_scores(scores_in, scores_out)
    return _average_precision(torch.cat([scores_in, scores_out]), _labels(scores_in, scores_out, False))


def fpr_at_tpr(scores_in: torch.Tensor, scores_out: torch.Tensor, tpr: float = 0.95) -> float:
    """The fraction of OOD inputs still accepted when ``tpr`` of the in-distribution ones are accepted.

    In-distribution is the positive class: an input is accepted as in-distribution when its score is
    ≤ t, with t the smallest threshold accepting at least ``tpr`` of the in-distribution scores (the
    ⌈tpr · n_in⌉-th smallest of them). Returns |{s ∈ scores_out : s ≤ t}| / n_out, OOD scores tied with t
    counted as accepted (Liang et al. 2018, "Enhancing the Reliability of Out-of-distribution Image
    Detection in Neural Networks", FPR at 95 % TPR).
    """
    scores_in, scores_out = _check_scores(scores_in, scores_out)
    if not 0 < tpr <= 1:
        raise SafetylabError(f"tpr must be in (0, 1], got {tpr}")
    n_in = len(scores_in)
    k = math.ceil(tpr * n_in)
    if k > 1 and (k - 1) / n_in >= tpr:  # tpr · n_in rounded up past an exact integer
        k -= 1
    threshold = torch.kthvalue(scores_in, k).values
    return (scores_out <= threshold).sum().item() / len(scores_out)


def ood_metrics(scores_in: torch.Tensor, scores_out: torch.Tensor) -> dict[str, float]:
    """``auroc``, ``aupr_in``, ``aupr_out`` and ``fpr95`` (FPR at 95 % TPR) of one detector's scores."""
    return {"auroc": auroc(scores_in, scores_out), "aupr_in": aupr_in(scores_in, scores_out),
            "aupr_out": aupr_out(scores_in, scores_out), "fpr95": fpr_at_tpr(scores_in, scores_out, 0.95)}


def _check_scores(scores_in: torch.Tensor, scores_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, s in (("scores_in", scores_in), ("scores_out", scores_out)):
        if not isinstance(s, torch.Tensor) or s.dim() != 1:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise SafetylabError(f"{name} must be a 1-D tensor of scores (N,), got {got}")
        if len(s) == 0:
            raise SafetylabError(f"{name} is empty: expected at least one score")
        if torch.isnan(s).any():
            raise SafetylabError(f"{name} holds NaN scores")
    dtype = torch.promote_types(scores_in.dtype, scores_out.dtype)
    dtype = dtype if dtype.is_floating_point else torch.int64  # negatable (−score ranks for AUPR-In)
    return scores_in.to(dtype), scores_out.to(scores_in.device, dtype)


def _labels(scores_in: torch.Tensor, scores_out: torch.Tensor, in_positive: bool) -> torch.Tensor:
    device = scores_in.device
    return torch.cat([torch.full((len(scores_in),), in_positive, device=device),
                      torch.full((len(scores_out),), not in_positive, device=device)])


# ----------------------------------------------------------------------------- features
def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input ``(N, d)`` of the model's last ``nn.Linear`` (in registration order) on ``x``, captured by
    a forward pre-hook that lives only for this call; on the model's device, in the caller's grad mode.
    For other architectures, give the detectors a ``features`` function instead."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SafetylabError(f"{type(model).__name__} has no nn.Linear layer to take penultimate features from: "
                             "pass features=<function from inputs to (N, d) features> to the detector")
    captured: list[torch.Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        model(x.to(model_device(model)))
    finally:
        handle.remove()
    if not captured or captured[-1].dim() != 2 or len(captured[-1]) != len(x):
        got = tuple(captured[-1].shape) if captured else "no call"
        raise SafetylabError(f"the last nn.Linear of {type(model).__name__} must receive (N={len(x)}, d) features, "
                             f"got {got}: pass features=<function from inputs to (N, d) features> to the detector")
    return captured[-1]


def _descend(x: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor], eps: float,
             bounds: Range) -> torch.Tensor:
    """Input preprocessing of ODIN and Mahalanobis: x̃ = clip(x − ε · sign(∇ₓ Σ score(x)), bounds), one
    signed-gradient step that lowers the anomaly score, which helps in-distribution inputs more than OOD
    ones. Gradients are taken with respect to the input only."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(score(x).sum(), x)
    return torch.clamp(x.detach() - eps * grad.sign(), *bounds)


# ----------------------------------------------------------------------------- detectors
class Detector:
    """Base of the logit- and feature-based detectors. Higher score = more anomalous.

    ``score(x)`` runs the model in batches of ``batch_size`` on its device (it must be in eval mode)
    and returns the scores on CPU.
    """

    fitted = True

    def __init__(self, model: nn.Module, batch_size: int = 1024):
        if not isinstance(model, nn.Module):
            raise SafetylabError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.batch_size = check_count(batch_size, "batch_size")

    def fit(self, data: Data) -> Detector:
        """Nothing to learn from the in-distribution data: returns the detector unchanged."""
        return self

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly scores (N,) of the inputs ``x``, on CPU; higher = more anomalous."""
        self._check_fitted()
        check_eval(self.model)
        check_inputs(self.model, x)
        device = model_device(self.model)
        with model_takes(x):
            scores = [as_float(self._score_batch(x[i:i + self.batch_size].to(device))).cpu()
                      for i in range(0, len(x), self.batch_size)]
        return scores[0] if len(scores) == 1 else torch.cat(scores)

    def score_features(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _logits(z: torch.Tensor) -> torch.Tensor:
        """``z`` checked to be finite logits (N, classes >= 2), in float32 or float64 (:func:`as_float`)."""
        z = check_logits(z, name="z")
        if not all_finite(z):
            raise SafetylabError("z holds NaN or infinite logits")
        return as_float(z)

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.score_features(logits_of(self.model, x))

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise SafetylabError(f"{type(self).__name__} is not fitted: call fit(data) (or fit_features(z, y)) "
                                 "on in-distribution training data first")


class MSP(Detector):
    """Maximum softmax probability, Hendrycks & Gimpel 2017, "A Baseline for Detecting Misclassified and
    Out-of-Distribution Examples in Neural Networks": score = −max_c softmax(f(x))_c.
    Higher score = more anomalous. ``score_features`` takes logits."""

    def score_features(self, z: torch.Tensor) -> torch.Tensor:
        return -self._logits(z).softmax(1).max(1).values


class ODIN(Detector):
    """ODIN, Liang et al. 2018, "Enhancing the Reliability of Out-of-distribution Image Detection in Neural
    Networks": temperature scaling plus input preprocessing,

        x̃ = clip(x − ε · sign(−∇ₓ log S_ŷ(x; T)), bounds),   score = −max_c S_c(x̃; T),

    S(x; T) = softmax(f(x) / T), ŷ the predicted class; T = 1000 and ε = 0.0014 as in the paper. Inputs
    must lie in ``bounds``. Higher score = more anomalous. ``score_features`` takes logits and skips the
    perturbation.
    """

    def __init__(self, model: nn.Module, temperature: float = 1000.0, eps: float = 0.0014,
                 bounds: Range = (0.0, 1.0), batch_size: int = 1024):
        super().__init__(model, batch_size)
        self.temperature, self.eps, self.bounds = check_positive(temperature, "temperature"), check_eps(eps), bounds

    def score_features(self, z: torch.Tensor) -> torch.Tensor:
        return -(self._logits(z) / self.temperature).softmax(1).max(1).values

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        check_range(x, self.bounds)
        if self.eps > 0:
            x = _descend(x, lambda v: -(logits_of(self.model, v) / self.temperature).log_softmax(1).max(1).values,
                         self.eps, self.bounds)
        return super()._score_batch(x)


class Energy(Detector):
    """Energy score, Liu et al. 2020, "Energy-based Out-of-distribution Detection":
    score = E(x; f) = −T · logsumexp_c(f_c(x) / T), T = 1. Higher score = more anomalous.
    ``score_features`` takes logits."""

    def __init__(self, model: nn.Module, temperature: float = 1.0, batch_size: int = 1024):
        super().__init__(model, batch_size)
        self.temperature = check_positive(temperature, "temperature")

    def score_features(self, z: torch.Tensor) -> torch.Tensor:
        return -self.temperature * torch.logsumexp(self._logits(z) / self.temperature, 1)


class _FeatureDetector(Detector):
    """A detector fitted on the features of in-distribution training data: penultimate features by
    default, or ``features(x) -> (N, d)`` for other architectures."""

    fitted = False

    def __init__(self, model: nn.Module, features: Features | None = None, batch_size: int = 1024):
        super().__init__(model, batch_size)
        self.features = features

    def fit(self, data: Data) -> _FeatureDetector:
        """Fit on the features of the in-distribution training ``data`` (a pair (x, y) or a loader)."""
        check_eval(self.model)
        device = model_device(self.model)
        zs, ys = [], []
        for x, y in batches(data, self.batch_size):
            check_inputs(self.model, x, "data inputs")
            with model_takes(x, "data inputs"), torch.inference_mode():
                zs.append(as_float(self._features(x.to(device))))
            ys.append(y.to(device))
        return self.fit_features(torch.cat(zs), torch.cat(ys))

    def fit_features(self, z: torch.Tensor, y: torch.Tensor | None = None) -> _FeatureDetector:
        raise NotImplementedError

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.features is None:
            return penultimate_features(self.model, x)
        z = self.features(x)
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or len(z) != len(x):
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise SafetylabError(f"features(x) must return (N={len(x)}, d) features, got {got}")
        return z

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.score_features(self._features(x))

    def _check_features(self, z: torch.Tensor, d: int | None = None, finite: bool = True) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or len(z) == 0 or (d is not None and z.shape[1] != d):
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise SafetylabError(f"z must be a non-empty (N, d{'' if d is None else '=' + str(d)}) tensor of "
                                 f"features, got {got}")
        if finite and not all_finite(z):
            raise SafetylabError("z holds NaN or infinite features")
        return z


class Mahalanobis(_FeatureDetector):
    """Mahalanobis distance to the closest class, Lee et al. 2018, "A Simple Unified Framework for Detecting
    Out-of-Distribution Samples and Adversarial Attacks", on penultimate features z:

        score = min_c (z − μ_c)ᵀ Σ⁻¹ (z − μ_c),
        Σ = (1/N) Σ_i (z_i − μ_{y_i})(z_i − μ_{y_i})ᵀ + λ · (tr Σ̂ / d) · I,

    class means μ_c and one covariance shared by all classes, with a ridge λ (relative to the mean
    feature variance; default 1e-6) so that Σ is invertible when some features never vary (dead ReLUs).
    Σ = L Lᵀ is factored once at fit; scoring whitens z with L⁻¹ and takes squared Euclidean distances to
    the whitened means, one batched matmul for all classes. Higher score = more anomalous.

    ``eps > 0`` turns on the paper's input preprocessing, x̃ = clip(x − ε · sign(∇ₓ score(x)), bounds)
    (off by default); the paper's ensemble of layers is left out (penultimate layer only).
    """

    def __init__(self, model: nn.Module, features: Features | None = None, ridge: float = 1e-6, eps: float = 0.0,
                 bounds: Range = (0.0, 1.0), batch_size: int = 1024):
        super().__init__(model, features, batch_size)
        self.ridge, self.eps, self.bounds = check_eps(ridge, "ridge"), check_eps(eps), bounds

    def fit_features(self, z: torch.Tensor, y: torch.Tensor | None = None) -> Mahalanobis:
        """Fit class means and the shared covariance on in-distribution features ``z`` (N, d), labels ``y``;
        scores are then computed in z's precision (float32, or float64 for float64 features)."""
        z = self._check_features(z)
        if y is None or not isinstance(y, torch.Tensor) or y.shape != (len(z),) or y.is_floating_point():
            raise SafetylabError(f"y must be a 1-D integer tensor with one class label per feature row "
                                 f"(N={len(z)}), got {None if y is None else tuple(y.shape)}")
        _, group = torch.unique(y.to(z.device), return_inverse=True)
        counts = torch.bincount(group)
        means = torch.zeros(len(counts), z.shape[1], dtype=torch.float64, device=z.device)
        means = means.index_add_(0, group, z.double()) / counts[:, None]
        # the mean of z (from the class means), subtracted first so that the expanded distances keep their precision
        centre = (counts[:, None] * means).sum(0) / len(z)
        dtype = as_float(z).dtype
        centred = z.to(dtype) - means.to(dtype)[group]  # the big product in z's precision, the factorisation in float64
        cov = (centred.T @ centred).double() / len(z)
        scale = cov.diagonal().mean()
        if scale == 0:
            raise SafetylabError("the features do not vary within the classes: Mahalanobis needs a covariance")
        cov.diagonal().add_(self.ridge * scale)
        chol, info = torch.linalg.cholesky_ex(cov)
        if info.item() != 0:
            raise SafetylabError(f"the feature covariance is not positive definite with ridge={self.ridge}: "
                                 "raise ridge")
        whiten = torch.linalg.solve_triangular(chol, torch.eye(len(cov), dtype=cov.dtype, device=cov.device),
                                               upper=False).T  # z ↦ z @ whiten = (L⁻¹ z)ᵀ
        self._whiten = whiten.to(dtype)
        self._offset = (centre @ whiten).to(dtype)  # (z − c) W = z W − c W
        self._means = ((means - centre) @ whiten).to(dtype)
        self._means_sq = self._means.square().sum(1)
        self.fitted = True
        return self

    def score_features(self, z: torch.Tensor) -> torch.Tensor:
        """min_c ‖w − m_c‖² = ‖w‖² + min_c (‖m_c‖² − 2 wᵀm_c), w = (z − c) W the whitened feature and m_c
        the whitened class means: two matrix products for the whole batch."""
        self._check_fitted()
        z = self._check_features(z, len(self._whiten), finite=False).to(self._whiten.device, self._whiten.dtype)
        w = torch.addmm(-self._offset, z, self._whiten)
        cross = torch.addmm(self._means_sq, w, self._means.T, alpha=-2)
        scores = (w.square().sum(1) + cross.min(1).values).clamp_min(0)
        if not all_finite(scores):  # NaN or inf in z reaches the scores: one check on N values
            raise SafetylabError("z holds NaN or infinite features")
        return scores

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        if self.eps > 0:
            x = _descend(check_range(x, self.bounds), lambda v: self.score_features(self._features(v)), self.eps,
                         self.bounds)
        return super()._score_batch(x)


class KNN(_FeatureDetector):
    """Deep nearest neighbours, Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest
    Neighbors": score = ‖ẑ − ẑ_(k)‖₂, the distance from the L2-normalised feature ẑ = z / ‖z‖ to its k-th
    nearest normalised training feature (k = 50, capped at the training size). For unit vectors
    ‖a − b‖² = 2 − 2 aᵀb, so the k-th nearest is the k-th largest inner product, found with ``topk`` over
    the training features for ``batch_size`` queries at a time. Higher score = more anomalous.
    """

    def __init__(self, model: nn.Module, k: int = 50, features: Features | None = None, batch_size: int = 1024):
        super().__init__(model, features, batch_size)
        self.k = check_count(k, "k")

    def fit_features(self, z: torch.Tensor, y: torch.Tensor | None = None) -> KNN:
        """Store the normalised in-distribution features ``z`` (N, d), in z's precision (float32, or float64);
        the labels ``y`` are not used."""
        self._bank = F.normalize(as_float(self._check_features(z)), dim=1)
        self.fitted = True
        return self

    def score_features(self, z: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        z = F.normalize(self._check_features(z, self._bank.shape[1]).to(self._bank.device, self._bank.dtype), dim=1)
        k = min(self.k, len(self._bank))
        sims = [(chunk @ self._bank.T).topk(k, 1).values[:, -1] for chunk in z.split(self.batch_size)]
        return (2 - 2 * torch.cat(sims)).clamp_min(0).sqrt()


class Uncertainty(Detector):
    """Predictive uncertainty as an OOD score: with one model, MC dropout (Gal & Ghahramani 2016) over
    ``samples`` passes; with a list of models, a deep ensemble (Lakshminarayanan et al. 2017). ``measure``
    is ``"mutual_information"`` (epistemic part, BALD: Houlsby et al. 2011) or ``"entropy"`` (total
    predictive entropy); see :mod:`safetylab.robust.uncertainty`. Higher score = more anomalous.
    ``score_features`` takes probability samples (S, N, C). Nothing to fit: ``fit`` returns the detector.

    MC dropout's masks come from torch's global generator: seed it (an entry point does) for scores that
    repeat.
    """

    MEASURES = ("mutual_information", "entropy")

    def __init__(self, model_or_models: nn.Module | Sequence[nn.Module], measure: str = "mutual_information",
                 samples: int = 20, batch_size: int = 1024):
        if measure not in self.MEASURES:
            raise SafetylabError(f"measure must be one of {', '.join(self.MEASURES)}, got {measure!r}")
        if not isinstance(model_or_models, nn.Module) and not (
                isinstance(model_or_models, Sequence) and len(model_or_models) > 0
                and all(isinstance(m, nn.Module) for m in model_or_models)):
            raise SafetylabError("model_or_models must be a model (MC dropout) or a non-empty list of models (deep "
                                 f"ensemble), got {type(model_or_models).__name__}")
        ensemble = not isinstance(model_or_models, nn.Module)
        super().__init__(model_or_models[0] if ensemble else model_or_models, batch_size)
        self.model_or_models, self.measure = model_or_models, measure
        self.samples = check_count(samples, "samples")

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly scores (N,) of the inputs ``x``, on CPU; higher = more anomalous."""
        if isinstance(self.model_or_models, nn.Module):
            probs = mc_dropout_probs(self.model_or_models, x, self.samples, self.batch_size)
        else:
            probs = ensemble_probs(self.model_or_models, x, self.batch_size)
        return self.score_features(probs)

    def score_features(self, probs: torch.Tensor) -> torch.Tensor:
        split = uncertainty_split(probs)
        return split.epistemic if self.measure == "mutual_information" else split.total


DETECTORS: dict[str, type] = {"msp": MSP, "odin": ODIN, "energy": Energy, "mahalanobis": Mahalanobis, "knn": KNN,
                              "mc-dropout": Uncertainty}
