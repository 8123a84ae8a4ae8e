"""Calibration of a classifier's probabilities: expected calibration error and reliability bins, negative
log-likelihood, Brier score, temperature scaling, and the reliability diagram.

Every metric takes ``probs`` ``(N, classes)`` (rows that sum to 1) and integer ``labels`` ``(N,)``; the
prediction is the argmax and its confidence the largest probability. Metrics are computed on the CPU in
float64 and returned as Python floats.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.core.io import save_figure
from safetylab.core.tensors import check_count, check_labels, check_positive, check_probs, model_device, model_dtype

NLL_FLOOR = 1e-12  # p_y is clamped here: a certain, wrong prediction costs −log 1e-12 ≈ 27.6, not infinity


class ReliabilityBins(NamedTuple):
    """Per-bin statistics of a reliability diagram (``n_bins`` equal-width confidence bins).

    Empty bins have ``count`` 0 and NaN ``accuracy`` and ``confidence``.
    """

    edges: torch.Tensor  # (n_bins + 1,) float64: i / n_bins
    count: torch.Tensor  # (n_bins,) int64: examples whose confidence falls in the bin
    accuracy: torch.Tensor  # (n_bins,) float64: fraction of those predicted correctly
    confidence: torch.Tensor  # (n_bins,) float64: their mean confidence


# ----------------------------------------------------------------------------- checks
def _cpu(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise SafetylabError(f"{name} must be a tensor, got {type(t).__name__}")
    return t.detach().cpu()


def _checked(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs`` and ``labels`` (as int64) on the CPU, after the shared checks."""
    probs = check_probs(_cpu(probs, "probs"))
    labels = check_labels(_cpu(labels, "labels"), probs.shape[1], len(probs), "labels")
    return probs, labels


# ----------------------------------------------------------------------------- metrics
def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Count, accuracy and mean confidence of the predictions in each of ``n_bins`` equal-width bins of
    confidence (Naeini et al. 2015, "Obtaining well calibrated probabilities using Bayesian binning";
    Guo et al. 2017, "On calibration of modern neural networks").

    Bin m (0-based) holds the confidences in (m/B, (m+1)/B]; the first bin also holds 0, and a confidence
    of exactly 1.0 falls in the last bin. Edges are i/B rounded to the dtype of ``probs``, the same
    number one gets by writing the literal (0.6 as float32 is the edge 3/5 as float32), and a confidence
    equal to an edge belongs to the bin on its left. The comparison is exact, so a confidence that
    differs from i/B only by rounding error is assigned as that rounding dictates.
    """
    probs, labels = _checked(probs, labels)
    n_bins = check_count(n_bins, "n_bins")
    conf, pred = probs.max(1)
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    # searchsorted (right=False) finds the first edge >= conf: conf in (edges[m], edges[m + 1]] gives m + 1.
    index = torch.searchsorted(edges.to(probs.dtype).double(), conf.double()) - 1
    index = index.clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins)
    correct = torch.bincount(index, weights=(pred == labels).double(), minlength=n_bins)
    conf_sum = torch.bincount(index, weights=conf.double(), minlength=n_bins)
    empty = count == 0
    accuracy = torch.where(empty, math.nan, correct / count.clamp(min=1))
    confidence = torch.where(empty, math.nan, conf_sum / count.clamp(min=1))
    return ReliabilityBins(edges, count, accuracy, confidence)


def _ece_of_bins(bins: ReliabilityBins) -> float:
    """Σ_m |B_m|/N · |acc(B_m) − conf(B_m)| over the non-empty bins."""
    full = bins.count > 0
    gap = (bins.accuracy[full] - bins.confidence[full]).abs()
    return (bins.count[full] * gap).sum().item() / bins.count.sum().item()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (Naeini et al. 2015; Guo et al. 2017, "On calibration of modern neural
    networks"), eq. 3 of Guo et al.:

        ECE = Σ_m |B_m| / N · |acc(B_m) − conf(B_m)|

    over ``n_bins`` equal-width confidence bins B_m assigned as in :func:`reliability_bins` (right-closed
    bins, 0 in the first, 1.0 in the last). In [0, 1]; 0 for a perfectly calibrated classifier.
    """
    return _ece_of_bins(reliability_bins(probs, labels, n_bins))


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class, −(1/N) Σ_i log p_{i,y_i} (the cross-entropy).

    p_y is clamped below at ``NLL_FLOOR`` = 1e-12, so a zero probability on the true class costs
    −log 1e-12 ≈ 27.6 rather than infinity.
    """
    probs, labels = _checked(probs, labels)
    p_true = probs.double().gather(1, labels[:, None])[:, 0]
    return -p_true.clamp(min=NLL_FLOOR).log().mean().item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score (Brier 1950, "Verification of forecasts expressed in terms of probability"):

        BS = (1/N) Σ_i Σ_c (p_ic − 1[y_i = c])²

    the sum over classes, not divided by the number of classes C, so it lies in [0, 2] (scikit-learn's
    ``brier_score_loss`` for more than two classes; for two classes scikit-learn halves it by default).
    """
    probs, labels = _checked(probs, labels)
    one_hot = F.one_hot(labels, probs.shape[1]).double()
    return (probs.double() - one_hot).pow(2).sum(1).mean().item()


def calibration_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, ECE (``n_bins`` bins), NLL and Brier score of one set of predictions."""
    probs, labels = _checked(probs, labels)
    return {
        "accuracy": (probs.argmax(1) == labels).double().mean().item(),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
    }


# ----------------------------------------------------------------------------- temperature scaling
def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks", section 4.2):

        T* = argmin_{T > 0} −(1/N) Σ_i log softmax(z_i / T)_{y_i}

    fitted on held-out validation logits with L-BFGS (strong-Wolfe line search) over log T, so that T
    stays positive; starts from T = 1. Dividing by T never changes the argmax, only the confidence.
    If the validation logits classify every example correctly, the NLL keeps falling as T → 0 and the
    fitted T is merely small: fit on data the model sometimes gets wrong.
    """
    logits = _cpu(logits, "logits")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise SafetylabError(f"logits must have shape (N>=1, classes>=2), got {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise SafetylabError("logits hold NaN or infinite values")
    labels = check_labels(_cpu(labels, "labels"), logits.shape[1], len(logits), "labels")
    max_iter = check_count(max_iter, "max_iter")
    z = logits.double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z * torch.exp(-log_t), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return math.exp(log_t.item())


class TemperatureScaled(nn.Module):
    """A classifier whose logits are divided by a temperature T (Guo et al. 2017): f(x) / T.

    ``TemperatureScaled(model, fit_temperature(predict_logits(model, x_val), y_val))``. T is a buffer in
    the model's dtype (it moves with ``.to`` and is saved in the state dict, but is not a parameter). The
    wrapper starts in the wrapped model's mode, so an evaluation-mode model stays ready for evaluation.
    """

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(check_positive(temperature, "temperature"),
                                                         dtype=model_dtype(model), device=model_device(model)))
        self.training = model.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


# ----------------------------------------------------------------------------- plots
def plot_reliability(bins_by_name: dict[str, ReliabilityBins], path: str | os.PathLike,
                     title: str = "Reliability diagram") -> Path:
    """Reliability diagram of one or several models (e.g. before and after temperature scaling): accuracy
    per confidence bin as bars as wide as the bin (side by side when several), against the diagonal of
    perfect calibration, with each model's ECE in the legend; below, the fraction of examples per bin."""
    if not isinstance(bins_by_name, dict) or not bins_by_name:
        raise SafetylabError("bins_by_name must be a non-empty dict of name -> ReliabilityBins")
    for name, bins in bins_by_name.items():
        if not isinstance(bins, ReliabilityBins):
            raise SafetylabError(f"bins_by_name[{name!r}] must be ReliabilityBins (from reliability_bins), "
                                 f"got {type(bins).__name__}")
    fig = Figure(figsize=(5, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    k = len(bins_by_name)
    for i, (name, bins) in enumerate(bins_by_name.items()):
        width = (bins.edges[1:] - bins.edges[:-1]) / k
        left = bins.edges[:-1] + i * width
        top.bar(left.numpy(), bins.accuracy.nan_to_num(0.0).numpy(), width.numpy(), align="edge", alpha=0.75,
                edgecolor="black", linewidth=0.4, label=f"{name} (ECE {_ece_of_bins(bins):.3f})")
        bottom.bar(left.numpy(), (bins.count / bins.count.sum()).numpy(), width.numpy(), align="edge", alpha=0.75)
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    top.legend(loc="upper left")
    bottom.set(xlabel="confidence", ylabel="fraction")
    fig.tight_layout()
    return save_figure(fig, path)
