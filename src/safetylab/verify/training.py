"""Certified training: train a network so that its bounds, not only its predictions, come out right; and
the noisy training of randomized smoothing's base classifier. Each is a per-batch loss for the one loop
of :mod:`safetylab.models.classifier`, which :func:`train_certified` runs.

The certified losses mix the clean cross-entropy with the cross-entropy of the worst-case logits that
sound lower bounds on the margins allow (:func:`robust_loss`), at an ε that grows from 0 over a ramp
(:func:`~safetylab.models.classifier.schedule`, progress ``t``):

- ``ibp``: Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for Training Verifiably
  Robust Models": ``κ · CE(f(x), y) + (1 − κ) · CE(z̃(ε), y)``, the margins bounded by IBP, κ going from 1
  to ``kappa_end`` = 0.5 while ε goes from 0 to its final value;
- ``crown-ibp``: Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably Robust Neural
  Networks": the margins' lower bound is ``β · CROWN-IBP + (1 − β) · IBP``, β going from 1 to 0 over the
  same ramp (the tighter CROWN-IBP bound steadies the start; plain IBP, cheaper, finishes);
- ``noise``: cross-entropy on x + N(0, σ²I), not clipped — the base classifier of randomized smoothing
  (Cohen et al. 2019, "Certified Adversarial Robustness via Randomized Smoothing", §4).

:func:`certified_config` gives the certified methods their papers' schedule, and
:func:`certified_accuracy` the share of examples a bound method verifies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from safetylab.core.config import require_choice
from safetylab.core.errors import SafetylabError
from safetylab.core.runs import RunDir
from safetylab.core.tensors import (
    Data,
    batches,
    check_eps,
    check_eval,
    check_labels,
    check_range,
    eval_mode,
    logits_of,
    model_device,
)
from safetylab.models.classifier import ClassifierTrainConfig, Loss, Step, fit_classifier, standard_loss
from safetylab.verify.bounds import METHODS as BOUND_METHODS
from safetylab.verify.bounds import Bounds, compute_bounds, crown, ibp
from safetylab.verify.network import trace
from safetylab.verify.regions import linf_ball, margin_spec

METHODS = ("ibp", "crown-ibp")


def certified_config(method: str = "ibp", **changes) -> ClassifierTrainConfig:
    """A :class:`~safetylab.models.classifier.ClassifierTrainConfig` for certified training with Gowal et al.
    2018's schedule: Adam at a constant learning rate 1e-3 (no weight decay), ``warmup_epochs`` = 2 of
    clean training (ε = 0, κ = 1), then ε growing linearly per step from 0 to ``eps · eps_train_factor``
    over ``ramp_epochs`` = 10 while κ falls from 1 to ``kappa_end`` (and, for CROWN-IBP, β from 1 to 0),
    then those values to the end of 20 epochs; ``changes`` override any field. Gowal et al. train at 1.1 ×
    the ε they test; ``eps_train_factor`` = 1.0 (the default) trains at ``eps`` itself."""
    require_choice(method, "method", METHODS)
    return ClassifierTrainConfig(**{"method": method, "epochs": 20, "lr": 1e-3, "weight_decay": 0.0,
                                    "lr_schedule": "constant", "warmup_epochs": 2, "ramp_epochs": 10, **changes})


def robust_loss(margins: torch.Tensor | Bounds, labels: torch.Tensor) -> torch.Tensor:
    """The worst-case cross-entropy ``CE(z̃, y)`` from lower bounds ``m_j`` of the margins ``f_y − f_j``
    (the rows ``e_y − e_j``, ``j ≠ y`` in increasing order, of :func:`margin_spec`): the logits
    ``z̃_y = 0``, ``z̃_j = −m_j``, so the loss is ``log(1 + Σ_j exp(−m_j))``, averaged over the batch.
    It bounds the cross-entropy of every input in the region from above (Wong & Kolter 2018, "Provable
    Defenses against Adversarial Examples via the Convex Outer Adversarial Polytope"; Gowal et al. 2018).

    ``margins`` is ``(B, K − 1)``, or :class:`Bounds` whose ``lower`` it is; ``labels`` ``(B,)``."""
    lower = margins.lower if isinstance(margins, Bounds) else margins
    if not isinstance(lower, torch.Tensor) or lower.dim() != 2 or lower.shape[1] < 1:
        got = tuple(lower.shape) if isinstance(lower, torch.Tensor) else type(lower).__name__
        raise SafetylabError(f"margins must be lower bounds of the margins, shape (batch, classes - 1), got {got}")
    batch, classes = lower.shape[0], lower.shape[1] + 1
    labels = check_labels(labels, classes, batch, "labels").to(lower.device)
    others = ~F.one_hot(labels, classes).bool()  # (B, K): the classes j ≠ y, in order
    worst = lower.new_zeros(batch, classes).masked_scatter(others, -lower)
    return F.cross_entropy(worst, labels)


def margin_lower_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, beta: float,
                        num_classes: int) -> torch.Tensor:
    """Lower bounds ``(B, K − 1)`` of the margins over the L∞ ball of radius ``eps`` (in [0, 1]), with
    gradients to the parameters: IBP, mixed as ``β · CROWN-IBP + (1 − β) · IBP`` when β > 0 (Zhang et
    al. 2020). The model is traced anew, so the bounds follow its current weights."""
    layers = trace(model, tuple(x.shape[1:]), detach=False)
    region, spec = linf_ball(x, eps), margin_spec(y, num_classes)
    lower = ibp(layers, region, spec).lower
    if beta > 0:
        lower = beta * crown(layers, region, spec, intermediate="ibp").lower + (1 - beta) * lower
    return lower


def ibp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: Step) -> tuple[torch.Tensor, dict]:
    """IBP training's loss (Gowal et al. 2018), ``κ · CE(f(x), y) + (1 − κ) · robust_loss(m)``, m the IBP
    lower bounds of the margins over the L∞ ball of radius ``step.eps``; see :func:`_certified_loss`."""
    return _certified_loss(model, x, y, step, beta=0.0)


def crown_ibp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: Step) -> tuple[torch.Tensor, dict]:
    """CROWN-IBP training's loss (Zhang et al. 2020): IBP's, with the margins' lower bounds
    ``β · CROWN-IBP + (1 − β) · IBP`` with β = 1 − t falling from 1 to 0 over the ramp; see
    :func:`_certified_loss`."""
    return _certified_loss(model, x, y, step, beta=1.0 - step.t)


def _certified_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: Step,
                    beta: float) -> tuple[torch.Tensor, dict]:
    """``κ · CE(f(x), y) + (1 − κ) · robust_loss(m)``, m the margins' lower bounds of
    :func:`margin_lower_bounds` (CROWN-IBP's share ``beta``) and ``κ = 1 − t (1 − kappa_end)`` at the
    ramp's progress t (Gowal et al. 2018), computed
    with the model in eval mode: bounds are only sound for a fixed function, so Dropout is off (the
    network trained is the one verified) and BatchNorm keeps its running statistics (not updated) while
    its scale and shift train, an affine map like any other. The model is traced anew each batch, so the
    bounds follow its current weights. Stats: the clean ``accuracy`` and the share ``verified`` (all
    training bounds positive at this ε) before the update, and ``kappa`` and ``beta``."""
    kappa = 1.0 - step.t * (1.0 - step.config.kappa_end)
    with eval_mode(model):
        logits = logits_of(model, x)
        y = check_labels(y, logits.shape[1], len(x))
        lower = margin_lower_bounds(model, x, y, step.eps, beta, logits.shape[1])
    loss = kappa * F.cross_entropy(logits, y) + (1 - kappa) * robust_loss(lower, y)
    return loss, {"accuracy": (logits.argmax(1) == y).float().mean().item(),
                  "verified": (lower > 0).all(1).float().mean().item(), "kappa": kappa, "beta": beta}


def noise_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: Step) -> tuple[torch.Tensor, dict]:
    """The base classifier of randomized smoothing (Cohen et al. 2019, §4): CE(f(x + δ), y), δ ~ N(0, σ²I)
    drawn from ``step.generator``, σ = ``sigma``, not clipped to the input range; stats: the
    ``accuracy`` on the noisy inputs."""
    noise = torch.randn(x.shape, generator=step.generator, dtype=x.dtype).to(x.device)
    return standard_loss(model, x + step.config.sigma * noise, y, step)


LOSSES: dict[str, Loss] = {"standard": standard_loss, "ibp": ibp_loss, "crown-ibp": crown_ibp_loss,
                           "noise": noise_loss}


def train_certified(model: nn.Module, data: Data, config: ClassifierTrainConfig = certified_config(),
                    run: RunDir | None = None, quiet: bool = True) -> list[dict]:
    """Train ``model`` in place on ``data`` (inputs in [0, 1]) by ``config.method`` (ibp, crown-ibp, noise,
    or standard) with :func:`~safetylab.models.classifier.fit_classifier`; return one record per epoch,
    also logged to ``run`` if given: ``loss``, the last step's ``eps``, and the epoch's means of the
    loss's stats (for ibp and crown-ibp: ``accuracy``, ``verified``, ``kappa``, ``beta``). The model is
    left in eval mode."""
    return fit_classifier(model, data, config, LOSSES, (0.0, 1.0), run, quiet)


def certified_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = "ibp",
                       batch_size: int = 256) -> float:
    """The share of examples whose margins over the L∞ ball of radius ``eps`` (inputs in [0, 1]) are all
    bounded below by a positive number with ``method`` (``"ibp"``, ``"crown"`` or ``"alpha-crown"``): each
    is then classified correctly everywhere in its ball. ``model`` must be in eval mode."""
    if method not in BOUND_METHODS:
        raise SafetylabError(f"method must be one of {', '.join(BOUND_METHODS)}, got {method!r}")
    check_eps(eps)
    check_eval(model)
    if batch_size < 1:
        raise SafetylabError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    check_range(x, (0.0, 1.0), "x")
    with torch.no_grad():
        classes = logits_of(model, x[:1].to(device)).shape[1]
    verified = count = 0
    for xb, yb in batches((x, y), batch_size, "x, y"):
        xb, yb = xb.to(device), check_labels(yb, classes, len(xb)).to(device)
        bounds = compute_bounds(model, linf_ball(xb, eps), margin_spec(yb, classes), method)
        verified, count = verified + bounds.verified().sum().item(), count + len(xb)
    return verified / count
