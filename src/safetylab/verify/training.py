"""Certified training: train a network so that its bounds, not only its predictions, come out right.

The loss mixes the clean cross-entropy with the cross-entropy of the worst-case logits that sound lower
bounds on the margins allow (:func:`robust_loss`), at an ε that grows from 0 over a ramp:

- ``ibp``: Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for Training Verifiably
  Robust Models": ``κ · CE(f(x), y) + (1 − κ) · CE(z̃(ε), y)``, the margins bounded by IBP, κ going from 1
  to ``kappa_end`` = 0.5 while ε goes from 0 to its final value;
- ``crown-ibp``: Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably Robust Neural
  Networks": the margins' lower bound is ``β · CROWN-IBP + (1 − β) · IBP``, β going from 1 to 0 over the
  same ramp (the tighter CROWN-IBP bound steadies the start; plain IBP, cheaper, finishes).

The schedule is per optimizer step (:func:`schedule`), :func:`train_certified` is the loop, and
:func:`certified_accuracy` the share of examples a bound method verifies.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError
from safetylab.core.progress import Progress
from safetylab.core.runs import RunDir
from safetylab.robust.checks import (
    batches,
    check_eps,
    check_eval,
    check_labels,
    check_range,
    is_tensor_pair,
    logits_of,
    model_device,
)
from safetylab.verify.bounds import METHODS as BOUND_METHODS
from safetylab.verify.bounds import Bounds, compute_bounds, crown, ibp
from safetylab.verify.network import trace
from safetylab.verify.regions import linf_ball, margin_spec

METHODS = ("ibp", "crown-ibp")


@dataclass(frozen=True)
class CertifiedTrainConfig:
    """Gowal et al. 2018's schedule: ``warmup_epochs`` of clean training (ε = 0, κ = 1), then ε growing
    linearly per step from 0 to ``eps · eps_train_factor`` over ``ramp_epochs`` while κ falls from 1 to
    ``kappa_end`` (and, for CROWN-IBP, β from 1 to 0), then those values to the end. Gowal et al. train at
    1.1 × the ε they test; ``eps_train_factor`` = 1.0 trains at ``eps`` itself."""

    method: str = "ibp"  # one of METHODS
    eps: float = 0.1  # L∞ radius, in input units (inputs in [0, 1])
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3  # Adam
    warmup_epochs: int = 2
    ramp_epochs: int = 10
    kappa_end: float = 0.5
    eps_train_factor: float = 1.0
    seed: int = 0

    def __post_init__(self):
        require_choice(self.method, "method", METHODS)
        require(0 <= self.eps < math.inf, "eps", "a finite number >= 0 (the radius)", self.eps)
        for name in ("epochs", "batch_size"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        for name in ("warmup_epochs", "ramp_epochs"):
            require(getattr(self, name) >= 0, name, "an integer >= 0", getattr(self, name))
        for name in ("lr", "eps_train_factor"):
            require(0 < getattr(self, name) < math.inf, name, "a finite number > 0", getattr(self, name))
        require(0 <= self.kappa_end <= 1, "kappa_end", "a number in [0, 1] (the clean loss's final weight)",
                self.kappa_end)
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)


def schedule(config: CertifiedTrainConfig, step: int, steps_per_epoch: int) -> tuple[float, float, float]:
    """``(ε, κ, β)`` at optimizer step ``step`` (0-based), with ``W`` warm-up and ``R`` ramp steps
    (epochs × ``steps_per_epoch``): ``t = clip((step + 1 − W) / R, 0, 1)`` (1 once past the warm-up
    when R = 0), ``ε = t · eps · eps_train_factor``, ``κ = 1 − t (1 − kappa_end)`` (Gowal et al. 2018),
    ``β = 1 − t`` for CROWN-IBP (Zhang et al. 2020) and 0 for IBP (its bound has no CROWN part)."""
    warmup, ramp = config.warmup_epochs * steps_per_epoch, config.ramp_epochs * steps_per_epoch
    if ramp == 0:
        t = float(step >= warmup)
    else:
        t = min(1.0, max(0.0, (step + 1 - warmup) / ramp))
    beta = 1.0 - t if config.method == "crown-ibp" else 0.0
    return t * config.eps * config.eps_train_factor, 1.0 - t * (1.0 - config.kappa_end), beta


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


def train_certified(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
                    config: CertifiedTrainConfig = CertifiedTrainConfig(), run: RunDir | None = None,
                    quiet: bool = True) -> list[dict]:
    """Train ``model`` in place on ``data`` (a pair of tensors, inputs in [0, 1], shuffled each epoch by
    a generator seeded with ``config.seed``) with the loss ``κ · CE(f(x), y) + (1 − κ) · robust_loss``;
    return one record per epoch, also logged to ``run`` if given: ``loss``, ``accuracy`` (clean, on the
    epoch's batches before each update), ``verified`` (the share whose training bounds are all positive,
    at that step's ε), and the ``eps``, ``kappa``, ``beta`` of the epoch's last step.

    The model is in eval mode for the whole loop and is left in it: bounds are only sound for a fixed
    function, so Dropout is off (the network trained is the one verified) and BatchNorm keeps its
    running statistics (not updated) while its scale and shift train, an affine map like any other.
    """
    if not is_tensor_pair(data):
        raise SafetylabError(f"data must be a pair of tensors (x, y), got {type(data).__name__}")
    device = model_device(model)
    x_all, y_all = data
    if len(x_all) != len(y_all):
        raise SafetylabError(f"data: {len(x_all)} inputs but {len(y_all)} labels")
    check_range(x_all, (0.0, 1.0), "data inputs")
    steps_per_epoch = -(-len(x_all) // config.batch_size)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history = []
    model.eval()
    stream = io.StringIO() if quiet else None
    with Progress(f"train {config.method}", config.epochs, stream=stream) as progress:
        for epoch in range(config.epochs):
            order = torch.randperm(len(x_all), generator=generator)
            total = correct = verified = count = 0.0
            for i, (x, y) in enumerate(batches((x_all[order], y_all[order]), config.batch_size)):
                eps, kappa, beta = schedule(config, epoch * steps_per_epoch + i, steps_per_epoch)
                x = x.to(device)
                logits = logits_of(model, x)
                y = check_labels(y, logits.shape[1], len(x)).to(device)
                lower = margin_lower_bounds(model, x, y, eps, beta, logits.shape[1])
                loss = kappa * F.cross_entropy(logits, y) + (1 - kappa) * robust_loss(lower, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(x), count + len(x)
                correct += (logits.argmax(1) == y).sum().item()
                verified += (lower > 0).all(1).sum().item()
            record = {"epoch": epoch + 1, "loss": total / count, "accuracy": correct / count,
                      "verified": verified / count, "eps": eps, "kappa": kappa, "beta": beta}
            history.append(record)
            if run is not None:
                run.log(epoch + 1, **record)
            progress.advance(loss=record["loss"], verified=record["verified"])
    optimizer.zero_grad(set_to_none=True)  # a trained model holds no gradients
    return history


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
