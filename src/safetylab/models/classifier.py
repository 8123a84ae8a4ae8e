"""Classifiers: the digits architectures, saving and loading them (safetensors), and the one training loop.

- architectures: :func:`digits_cnn` and :func:`digits_mlp` (``ARCHS``), built from a spec by
  :func:`build_classifier`, saved and loaded by :func:`save_classifier` / :func:`load_classifier`;
- training: one config (:class:`ClassifierTrainConfig`) and one loop (:func:`fit_classifier`) for every
  method; the loop takes the per-batch loss from a table ``{method: loss}`` the caller hands in, so it
  knows no method itself. :func:`standard_loss` lives here; the adversarial losses (``pgd``, ``trades``)
  in :mod:`safetylab.robust.training`, the certified ones (``ibp``, ``crown-ibp``) in
  :mod:`safetylab.verify.training` and the smoothing base's (``noise``) there too.
  :func:`safetylab.robust.train_classifier` and :func:`safetylab.verify.train_certified` call the loop
  with their tables.

A loss is a small function ``loss(model, x, y, step) -> (loss, stats)``: ``step`` (:class:`Step`) holds
the radius and ramp of the current optimizer step, the config, the input range and the loop's generator;
``stats`` are batch means (accuracy, share verified, …) that the loop averages over the epoch's examples.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import nn

from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_bytes, atomic_write_text, read_json
from safetylab.core.progress import Progress
from safetylab.core.runs import RunDir
from safetylab.core.seeding import derive_seed, torch_seed
from safetylab.core.tensors import (
    NORMS,
    Data,
    Range,
    batches,
    check_labels,
    check_pair,
    check_range,
    is_count,
    is_tensor_pair,
    logits_of,
    model_device,
    predict_logits,
    probe,
)


def digits_cnn(num_classes: int = 8, width: int = 16, hidden: int = 128, dropout: float = 0.2) -> nn.Sequential:
    """A small CNN for 1×8×8 inputs: two convolutions (the second with stride 2), a hidden layer with
    dropout (used by MC dropout; identity in eval mode), and the logits.

    Built only from layers that bound propagation supports (no max-pooling), so the same network can be
    attacked, calibrated and verified.
    """
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * 4 * 4, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def digits_mlp(num_classes: int = 8, hidden: int = 128, dropout: float = 0.2) -> nn.Sequential:
    """A two-hidden-layer MLP on the 64 pixels, for feature-vector experiments and verification."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


ARCHS = {"cnn": digits_cnn, "mlp": digits_mlp}


def build_classifier(spec: dict) -> nn.Sequential:
    """A digits classifier from its spec ``{"arch": "cnn" | "mlp", **keyword arguments}``."""
    spec = dict(spec)
    arch = spec.pop("arch", None)
    if arch not in ARCHS:
        raise SafetylabError(f"classifier spec: arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    try:
        return ARCHS[arch](**spec)
    except TypeError as e:
        raise SafetylabError(f"classifier spec for {arch}: {e}") from None


def save_classifier(model: nn.Module, spec: dict, directory: str | Path) -> Path:
    """``model.safetensors`` and ``classifier.json`` (the spec), each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    atomic_write_bytes(directory / "model.safetensors", save(weights))
    atomic_write_text(directory / "classifier.json", json.dumps(spec, indent=2) + "\n")
    return directory


def load_classifier(directory: str | Path) -> tuple[nn.Sequential, dict]:
    """The classifier saved by :func:`save_classifier`, in eval mode, with its spec. Loading draws nothing
    from torch's global generator, so a study that loads a model gives the numbers of one that had it in
    memory."""
    directory = Path(directory)
    spec_file, weights = directory / "classifier.json", directory / "model.safetensors"
    if not spec_file.is_file() or not weights.is_file():
        raise SafetylabError(f"{directory}: not a saved classifier (expected classifier.json and model.safetensors; "
                             "make one with `safetylab robust train` or `safetylab verify train`)")
    spec = read_json(spec_file)
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the generator as it was
        model = build_classifier(spec)
    try:
        model.load_state_dict(load(weights.read_bytes()))
    except RuntimeError as e:
        raise SafetylabError(f"{weights}: weights do not fit the spec in classifier.json ({e})") from None
    return model.eval(), spec


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The share of ``x`` that the evaluation-mode ``model`` classifies as ``y`` (on any device)."""
    logits = predict_logits(model, x)  # on CPU
    return (logits.argmax(1) == check_labels(y, logits.shape[1], len(x)).cpu()).double().mean().item()


# ----------------------------------------------------------------------------- training
METHODS = ("standard", "pgd", "trades", "noise", "ibp", "crown-ibp")
LR_SCHEDULES = ("one-cycle", "constant")


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """How to train a classifier, whatever the method. The defaults are those of standard and adversarial
    training (AdamW with a one-cycle learning rate, ε at full size from the start);
    :func:`safetylab.verify.training.certified_config` gives certified training its paper's schedule.

    ε follows :func:`schedule`: ``warmup_epochs`` at ε = 0, then a linear ramp per optimizer step over
    ``ramp_epochs`` up to ``eps · eps_train_factor``. ``steps``, ``step_size``, ``norm`` and
    ``trades_beta`` set the adversary of ``pgd`` and ``trades``; ``kappa_end`` the clean loss's final
    weight in ``ibp`` and ``crown-ibp``; ``sigma`` the noise of ``noise``."""

    method: str = "standard"  # one of METHODS
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4  # AdamW's decoupled weight decay
    lr_schedule: str = "one-cycle"  # one-cycle (Smith & Topin 2019, peak after 15 % of the steps) or constant
    eps: float = 0.1  # the radius trained for, in input units
    norm: str = "linf"
    steps: int = 7  # PGD steps of the adversary (pgd, trades)
    step_size: float | None = None  # default 2.5·ε/steps (Madry et al.)
    trades_beta: float = 6.0
    sigma: float = 0.25  # the noise's standard deviation (noise)
    warmup_epochs: int = 0  # epochs at ε = 0 before the ramp
    ramp_epochs: int = 0  # epochs over which ε grows linearly (per step) from 0
    eps_train_factor: float = 1.0  # train at this multiple of eps (Gowal et al. 2018 use 1.1)
    kappa_end: float = 0.5  # the clean loss's weight once the ramp is over (ibp, crown-ibp)
    seed: int = 0

    def __post_init__(self):
        require_choice(self.method, "method", METHODS)
        require_choice(self.norm, "norm", NORMS)
        require_choice(self.lr_schedule, "lr_schedule", LR_SCHEDULES)
        for name in ("epochs", "batch_size", "steps"):
            require(is_count(getattr(self, name)), name, "an integer >= 1", getattr(self, name))
        for name in ("warmup_epochs", "ramp_epochs"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, "an integer >= 0",
                    value)
        for name in ("lr", "eps_train_factor", "sigma"):
            require(0 < getattr(self, name) < math.inf, name, "a finite number > 0", getattr(self, name))
        for name in ("weight_decay", "eps", "trades_beta"):
            require(0 <= getattr(self, name) < math.inf, name, "a finite number >= 0", getattr(self, name))
        require(self.step_size is None or 0 < self.step_size < math.inf, "step_size",
                "a finite number > 0, or None for 2.5·eps/steps", self.step_size)
        require(0 <= self.kappa_end <= 1, "kappa_end", "a number in [0, 1] (the clean loss's final weight)",
                self.kappa_end)
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)


def schedule(config: ClassifierTrainConfig, step: int, steps_per_epoch: int) -> tuple[float, float]:
    """``(ε, t)`` at optimizer step ``step`` (0-based), with ``W`` warm-up and ``R`` ramp steps (epochs ×
    ``steps_per_epoch``): the ramp's progress ``t = clip((step + 1 − W) / R, 0, 1)`` (1 once past the
    warm-up when R = 0) and ``ε = t · eps · eps_train_factor`` (Gowal et al. 2018, "On the Effectiveness
    of Interval Bound Propagation for Training Verifiably Robust Models", §4)."""
    warmup, ramp = config.warmup_epochs * steps_per_epoch, config.ramp_epochs * steps_per_epoch
    t = float(step >= warmup) if ramp == 0 else min(1.0, max(0.0, (step + 1 - warmup) / ramp))
    return t * config.eps * config.eps_train_factor, t


@dataclass(frozen=True)
class Step:
    """What a loss sees of one optimizer step: the radius ``eps`` and the ramp's progress ``t`` in [0, 1]
    (:func:`schedule`), the config, the input range and the loop's generator (random starts, noise)."""

    eps: float
    t: float
    config: ClassifierTrainConfig
    bounds: Range
    generator: torch.Generator


Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor, Step], tuple[torch.Tensor, dict[str, float]]]


def standard_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: Step) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the clean inputs, CE(f(x), y); stats: the batch's ``accuracy``."""
    logits = logits_of(model, x)
    y = check_labels(y, logits.shape[1], len(x))
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(1) == y).float().mean().item()}


def fit_classifier(model: nn.Module, data: Data, config: ClassifierTrainConfig = ClassifierTrainConfig(),
                   losses: Mapping[str, Loss] | None = None, bounds: Range = (0.0, 1.0), run: RunDir | None = None,
                   quiet: bool = True) -> list[dict]:
    """Train ``model`` in place on ``data`` (a pair of tensors, shuffled each epoch, or a DataLoader) with the
    loss ``losses[config.method]`` (default: :func:`standard_loss` only); return one record per epoch, also
    logged to ``run`` if given: ``loss``, the last step's ``eps``, and the epoch's mean of each of the
    loss's stats.

    The model is in training mode for the updates (a loss that needs the fixed function, such as a bound,
    switches to eval mode itself) and is left in eval mode. Shuffling, random starts and noise draw from a
    generator seeded with ``derive_seed(config.seed, "training")``; dropout draws from torch's global
    generator, so seed it (or train inside :func:`~safetylab.core.seeding.torch_seed`, as
    :func:`train_or_load` does) for a run that repeats.
    """
    losses = {"standard": standard_loss} if losses is None else losses
    if config.method not in losses:
        raise SafetylabError(f"method {config.method!r}: this trainer has losses for {', '.join(losses)} "
                             "(pgd and trades: safetylab.robust.train_classifier; ibp, crown-ibp and noise: "
                             "safetylab.verify.train_certified)")
    loss_fn = losses[config.method]
    device = model_device(model)
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "training"))
    steps_per_epoch = _n_batches(data, config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch,
                                                    pct_start=0.15) if config.lr_schedule == "one-cycle" else None
    history = []
    model.train()
    stream = io.StringIO() if quiet else None
    with Progress(f"train {config.method}", config.epochs, stream=stream) as progress:
        for epoch in range(config.epochs):
            total, count, sums, eps = 0.0, 0, {}, 0.0
            for i, (x, y) in enumerate(batches(_shuffled(data, generator), config.batch_size)):
                if epoch == i == 0:  # the first batch: inputs the model can take (shape, dtype)
                    probe(model, x, "data inputs")
                x, y = check_range(x.to(device), bounds, "data inputs"), y.to(device)
                eps, t = schedule(config, epoch * steps_per_epoch + i, steps_per_epoch)
                loss, stats = loss_fn(model, x, y, Step(eps, t, config, bounds, generator))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None and scheduler.last_epoch < scheduler.total_steps:
                    scheduler.step()
                total, count = total + loss.item() * len(x), count + len(x)
                for name, value in stats.items():
                    sums[name] = sums.get(name, 0.0) + value * len(x)
            record = {"epoch": epoch + 1, "loss": total / count, "eps": eps,
                      **{name: value / count for name, value in sums.items()}}
            history.append(record)
            if run is not None:
                run.log(epoch + 1, **record)
            progress.advance(loss=record["loss"])
    optimizer.zero_grad(set_to_none=True)  # a trained model holds no gradients
    model.eval()
    return history


def train_or_load(directory: str | Path, spec: dict, data: Data, config: ClassifierTrainConfig,
                  losses: Mapping[str, Loss] | None = None, bounds: Range = (0.0, 1.0),
                  run: RunDir | None = None) -> nn.Module:
    """The classifier saved in ``directory``; else one built from ``spec``, trained by :func:`fit_classifier`
    and saved there. Initialisation and dropout draw from torch's global generator seeded with
    ``config.seed`` inside a :func:`~safetylab.core.seeding.torch_seed` block (restored afterwards), so the
    model depends on its config alone, not on what ran before: a study that resumes with the model on
    disk gives the numbers of one that trained it."""
    directory = Path(directory)
    if (directory / "model.safetensors").is_file():
        return load_classifier(directory)[0]
    with torch_seed(config.seed):
        model = build_classifier(spec)
        fit_classifier(model, data, config, losses, bounds, run)
    save_classifier(model, spec, directory)
    return model.eval()


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
