"""Predictive uncertainty from samples of the predictive distribution, and how to draw those samples.

- samples: MC dropout (one model, dropout left on at test time) and deep ensembles (several models
  trained from different seeds), each giving class probabilities of shape ``(S, N, C)``: S samples,
  N inputs, C classes;
- measures: the predictive entropy of one distribution, and its split into aleatoric (expected entropy)
  and epistemic (mutual information) parts.

Entropies use the natural logarithm (nats), with 0 · log 0 = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.core.seeding import derive_seed, torch_seed
from safetylab.core.tensors import (
    Data,
    Range,
    as_float,
    check_count,
    check_eval,
    check_probs,
    logits_of,
    model_device,
    predict_logits,
    probe,
)
from safetylab.models.classifier import ClassifierTrainConfig
from safetylab.robust.training import train_classifier

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


# ----------------------------------------------------------------------------- samples
@torch.no_grad()
def mc_dropout_probs(model: nn.Module, x: torch.Tensor, samples: int = 20, batch_size: int = 1024) -> torch.Tensor:
    """Class probabilities ``(samples, N, C)`` with the dropout layers sampling, on CPU (float32, or float64
    for a float64 model).

    Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep
    Learning": p(y | x) ≈ (1/S) Σ_s softmax(f(x; θ ⊙ m_s)), m_s a fresh dropout mask per pass.

    Only the dropout modules are switched to training mode (batch-norm and everything else stay in eval
    mode); every module's own mode is restored afterwards, even on error. ``model`` must be in eval mode.
    """
    check_eval(model)
    dropouts = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]
    if not dropouts:
        raise SafetylabError("model has no dropout module (nn.Dropout, Dropout1d/2d/3d, AlphaDropout): "
                             "MC dropout needs one; use a deep ensemble instead")
    samples, batch_size = check_count(samples, "samples"), check_count(batch_size, "batch_size")
    probe(model, x)
    device = model_device(model)
    flags = [(m, m.training) for m in dropouts]
    try:
        for m in dropouts:
            m.train()
        out = [torch.stack([as_float(logits_of(model, xb)).softmax(1).cpu() for _ in range(samples)])
               for xb in (x[i:i + batch_size].to(device) for i in range(0, len(x), batch_size))]
    finally:
        for m, training in flags:
            m.training = training
    return torch.cat(out, 1)


def ensemble_probs(models: Sequence[nn.Module], x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Class probabilities ``(members, N, C)``, one row per member, on CPU (float32, or float64 for float64
    members).

    Lakshminarayanan et al. 2017, "Simple and Scalable Predictive Uncertainty Estimation using Deep
    Ensembles": p(y | x) ≈ (1/M) Σ_m softmax(f_m(x)). Each member must be in eval mode and all must
    predict the same number of classes.
    """
    if isinstance(models, nn.Module) or len(models) == 0:
        raise SafetylabError("models must be a non-empty list of models (the ensemble members)")
    probs = []
    for i, model in enumerate(models):
        check_eval(model, f"models[{i}]")
        probs.append(predict_logits(model, x, batch_size).softmax(1))
        if probs[i].shape[1] != probs[0].shape[1]:
            raise SafetylabError(f"ensemble members must agree on the classes: models[0] predicts "
                                 f"{probs[0].shape[1]} classes, models[{i}] predicts {probs[i].shape[1]}")
    return torch.stack(probs)


def train_ensemble(build: Callable[[], nn.Module], data: Data,
                   config: ClassifierTrainConfig = ClassifierTrainConfig(), members: int = 5,
                   bounds: Range = (0.0, 1.0)) -> list[nn.Module]:
    """Train ``members`` fresh models from ``build()`` on ``data`` by ``config`` (standard, pgd or trades);
    member i has its own seed ``derive_seed(config.seed, "ensemble", i)``, from which it is initialised
    and trained (Lakshminarayanan et al. 2017: random initialisation and data order alone make the
    members diverse). Derived seeds, not ``seed + i``, so that two ensembles of different seeds never
    share a member. Returns the members in eval mode."""
    check_count(members, "members")
    ensemble = []
    for i in range(members):
        seed = derive_seed(config.seed, "ensemble", i)
        with torch_seed(seed):
            model = build()
            if not isinstance(model, nn.Module):
                raise SafetylabError(f"build() must return a fresh nn.Module, got {type(model).__name__}")
            train_classifier(model, data, replace(config, seed=seed), bounds)
        ensemble.append(model.eval())
    return ensemble


# ----------------------------------------------------------------------------- measures
class UncertaintySplit(NamedTuple):
    """Per-input uncertainties in nats: ``total = aleatoric + epistemic``."""

    total: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy H[p] = −Σ_c p_c log p_c of each row of ``probs`` (N, C), in nats (Shannon 1948,
    "A Mathematical Theory of Communication"); 0 for a one-hot row, log C for a uniform one."""
    check_probs(probs, "probs")
    return _entropy(probs)


def uncertainty_split(probs_samples: torch.Tensor) -> UncertaintySplit:
    """Split the uncertainty of ``probs_samples`` (S, N, C) into its aleatoric and epistemic parts:

        total      = H[E_s p_s]                  (predictive entropy)
        aleatoric  = E_s H[p_s]                  (expected entropy)
        epistemic  = total − aleatoric           (mutual information I(y; θ | x), ≥ 0 by Jensen)

    Houlsby et al. 2011, "Bayesian Active Learning for Classification and Preference Learning" (BALD);
    Depeweg et al. 2018, "Decomposition of Uncertainty in Bayesian Deep Learning for Efficient and
    Risk-sensitive Learning". The epistemic part is clamped at 0 against rounding.
    """
    check_probs(probs_samples, "probs_samples", dims=3)
    total = _entropy(probs_samples.mean(0))
    aleatoric = _entropy(probs_samples).mean(0)
    return UncertaintySplit(total, aleatoric, (total - aleatoric).clamp_min(0))


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(probs, probs).sum(-1)
