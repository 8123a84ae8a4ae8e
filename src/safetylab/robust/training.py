"""Adversarial training: the per-batch losses of PGD and TRADES training, and ``train_classifier``, the
loop of :mod:`safetylab.models.classifier` with them.

- ``standard``: cross-entropy on clean inputs (:func:`~safetylab.models.classifier.standard_loss`);
- ``pgd``: Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks":
  min_θ E max_{‖δ‖≤ε} CE(f_θ(x + δ), y), the inner max approximated by PGD with a random start;
- ``trades``: Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy":
  CE(f(x), y) + β · KL(p(x) ‖ p(x′)), with x′ maximising the KL term by PGD from x + 0.001·N(0, I).

The adversary runs with the model in eval mode (batch-norm statistics and dropout fixed), and the
model's own mode is restored for the update. ε follows the config's warm-up and ramp
(:func:`~safetylab.models.classifier.schedule`); at ε = 0 both losses are the clean cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from safetylab.core.tensors import Data, Range, check_labels, logits_of
from safetylab.models.classifier import ClassifierTrainConfig, Loss, Step, fit_classifier, standard_loss
from safetylab.robust.attacks import pgd, trades_adversary


def pgd_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: Step) -> tuple[torch.Tensor, dict]:
    """Madry et al. 2018: CE(f(x′), y) with x′ = PGD(x, y) in the ball of radius ``step.eps`` (no early
    stop, a random start from ``step.generator``); stats: ``adversarial_accuracy``, the share of x′ still
    classified right."""
    if step.eps == 0:
        return standard_loss(model, x, y, step)
    c = step.config
    x_adv = pgd(model, x, y, step.eps, norm=c.norm, steps=c.steps, step_size=c.step_size, bounds=step.bounds,
                early_stop=False, generator=step.generator)
    logits = logits_of(model, x_adv)
    return F.cross_entropy(logits, y), {"adversarial_accuracy": (logits.argmax(1) == y).float().mean().item()}


def trades_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: Step) -> tuple[torch.Tensor, dict]:
    """Zhang et al. 2019: CE(f(x), y) + β · KL(p(x) ‖ p(x′)), x′ the TRADES adversary in the ball of radius
    ``step.eps`` and β = ``trades_beta``; stats: the clean ``accuracy``."""
    if step.eps == 0:
        return standard_loss(model, x, y, step)
    c = step.config
    x_adv = trades_adversary(model, x, step.eps, norm=c.norm, steps=c.steps, step_size=c.step_size,
                             bounds=step.bounds, generator=step.generator)
    logits = logits_of(model, x)
    y = check_labels(y, logits.shape[1], len(x))
    robust = F.kl_div(F.log_softmax(logits_of(model, x_adv), 1), F.log_softmax(logits, 1), log_target=True,
                      reduction="batchmean")
    return F.cross_entropy(logits, y) + c.trades_beta * robust, {
        "accuracy": (logits.argmax(1) == y).float().mean().item()}


LOSSES: dict[str, Loss] = {"standard": standard_loss, "pgd": pgd_loss, "trades": trades_loss}


def train_classifier(model: nn.Module, data: Data, config: ClassifierTrainConfig = ClassifierTrainConfig(),
                     bounds: Range = (0.0, 1.0), run=None, quiet: bool = True) -> list[dict]:
    """Train ``model`` in place by ``config.method`` (standard, pgd or trades) with
    :func:`~safetylab.models.classifier.fit_classifier`; returns one record per epoch."""
    return fit_classifier(model, data, config, LOSSES, bounds, run, quiet)
