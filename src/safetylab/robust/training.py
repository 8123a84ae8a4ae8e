"""Training a classifier, plainly or adversarially, in one short loop any ``nn.Module`` can use.

- ``standard``: cross-entropy on clean inputs;
- ``pgd``: Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks":
  min_θ E max_{‖δ‖≤ε} CE(f_θ(x + δ), y), the inner max approximated by PGD with a random start;
- ``trades``: Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy":
  CE(f(x), y) + β · KL(p(x) ‖ p(x′)), with x′ maximising the KL term by PGD from x + 0.001·N(0, I);
- ``noise``: cross-entropy on x + N(0, σ²I), not clipped — the base classifier of randomized smoothing
  (Cohen et al. 2019, "Certified Adversarial Robustness via Randomized Smoothing", §4).

The adversary runs with the model in eval mode (batch-norm statistics and dropout fixed), and the
model's own mode is restored for the update. ε can ramp up linearly over ``eps_warmup_epochs``.
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
from safetylab.robust.attacks import NORMS, pgd, trades_adversary
from safetylab.robust.checks import (
    Bounds,
    Data,
    batches,
    check_labels,
    check_pair,
    check_range,
    is_count,
    is_tensor_pair,
    logits_of,
    model_device,
    probe,
)

METHODS = ("standard", "pgd", "trades", "noise")


@dataclass(frozen=True)
class RobustTrainConfig:
    method: str = "standard"  # one of METHODS
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    eps: float = 0.1  # L∞ radius of the adversary, in input units
    norm: str = "linf"
    steps: int = 7  # PGD steps of the adversary
    step_size: float | None = None  # default 2.5·ε/steps (Madry et al.)
    trades_beta: float = 6.0
    sigma: float = 0.25  # the noise's standard deviation (noise)
    eps_warmup_epochs: int = 0
    seed: int = 0

    def __post_init__(self):
        require_choice(self.method, "method", METHODS)
        require_choice(self.norm, "norm", NORMS)
        for name in ("epochs", "batch_size", "steps"):
            require(is_count(getattr(self, name)), name, "an integer >= 1", getattr(self, name))
        require(0 < self.lr < math.inf, "lr", "a finite number > 0", self.lr)
        require(0 <= self.weight_decay < math.inf, "weight_decay", "a finite number >= 0", self.weight_decay)
        require(0 <= self.eps < math.inf, "eps", "a finite number >= 0 (the adversary's radius)", self.eps)
        require(self.step_size is None or 0 < self.step_size < math.inf, "step_size",
                "a finite number > 0, or None for 2.5·eps/steps", self.step_size)
        require(0 <= self.trades_beta < math.inf, "trades_beta", "a finite number >= 0", self.trades_beta)
        require(0 < self.sigma < math.inf, "sigma", "a finite number > 0 (the training noise's standard deviation)",
                self.sigma)
        require(isinstance(self.eps_warmup_epochs, int) and self.eps_warmup_epochs >= 0, "eps_warmup_epochs",
                "an integer >= 0", self.eps_warmup_epochs)
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)


def epoch_eps(config: RobustTrainConfig, epoch: int) -> float:
    """ε for ``epoch`` (0-based): a linear ramp over ``eps_warmup_epochs``, then the full ε."""
    if config.eps_warmup_epochs <= 0:
        return config.eps
    return config.eps * min(1.0, (epoch + 1) / config.eps_warmup_epochs)


def adversarial_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: RobustTrainConfig, eps: float,
                     bounds: Bounds = (0.0, 1.0), generator: torch.Generator | None = None) -> torch.Tensor:
    """The training loss of one batch under ``config.method`` (the model in its training mode)."""
    if config.method == "noise":
        x = x + config.sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    if config.method in ("standard", "noise") or eps == 0:
        logits = logits_of(model, x)
        return F.cross_entropy(logits, check_labels(y, logits.shape[1], len(x)))
    if config.method == "pgd":
        x_adv = pgd(model, x, y, eps, norm=config.norm, steps=config.steps, step_size=config.step_size,
                    bounds=bounds, early_stop=False, generator=generator)
        return F.cross_entropy(logits_of(model, x_adv), y)
    x_adv = trades_adversary(model, x, eps, norm=config.norm, steps=config.steps, step_size=config.step_size,
                             bounds=bounds, generator=generator)
    logits = logits_of(model, x)
    y = check_labels(y, logits.shape[1], len(x))
    robust = F.kl_div(F.log_softmax(logits_of(model, x_adv), 1), F.log_softmax(logits, 1), log_target=True,
                      reduction="batchmean")
    return F.cross_entropy(logits, y) + config.trades_beta * robust


def train_classifier(model: nn.Module, data: Data, config: RobustTrainConfig = RobustTrainConfig(),
                     bounds: Bounds = (0.0, 1.0), run: RunDir | None = None, quiet: bool = True) -> list[dict]:
    """Train ``model`` in place on ``data`` (a pair of tensors, shuffled each epoch, or a DataLoader);
    return one record per epoch (``loss``, ``eps``), also logged to ``run`` if given."""
    device = model_device(model)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * _n_batches(
        data, config.batch_size), pct_start=0.15)
    history = []
    model.train()
    stream = io.StringIO() if quiet else None
    with Progress(f"train {config.method}", config.epochs, stream=stream) as progress:
        for epoch in range(config.epochs):
            eps, total, count = epoch_eps(config, epoch), 0.0, 0
            for x, y in batches(_shuffled(data, generator), config.batch_size):
                if epoch == count == 0:  # the first batch: inputs the model can take (shape, dtype)
                    probe(model, x, "data inputs")
                x, y = check_range(x.to(device), bounds, "data inputs"), y.to(device)
                loss = adversarial_loss(model, x, y, config, eps, bounds, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total, count = total + loss.item() * len(x), count + len(x)
            record = {"epoch": epoch + 1, "loss": total / count, "eps": eps}
            history.append(record)
            if run is not None:
                run.log(epoch + 1, **record)
            progress.advance(loss=record["loss"])
    optimizer.zero_grad(set_to_none=True)  # a trained model holds no gradients
    model.eval()
    return history


def _shuffled(data: Data, generator: torch.Generator) -> Data:
    if is_tensor_pair(data):
        x, y = check_pair(*data)
        order = torch.randperm(len(x), generator=generator)
        return x[order], y[order]
    return data


def _n_batches(data: Data, batch_size: int) -> int:
    if is_tensor_pair(data):
        return max(1, -(-len(data[0]) // batch_size))
    try:
        return max(1, len(data))
    except TypeError:
        raise SafetylabError("data must be a pair of tensors or a loader with a length (len(loader))") from None


