"""Input checks and the helpers every part of :mod:`safetylab.robust` shares.

A classifier here is any ``nn.Module`` that maps a batch of inputs ``(N, ...)`` in a stated range
(``bounds``, [0, 1] by default; any normalisation lives inside the model) to logits ``(N, classes)``.
Every check raises :class:`~safetylab.core.errors.SafetylabError` naming the argument and what was
expected.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from safetylab.core.errors import SafetylabError

Bounds = tuple[float, float]
Data = tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]


def check_eps(eps: float, name: str = "eps") -> float:
    if not eps >= 0:
        raise SafetylabError(f"{name} must be >= 0 (the radius of the threat model), got {eps}")
    return float(eps)


def check_range(x: torch.Tensor, bounds: Bounds = (0.0, 1.0), name: str = "x") -> torch.Tensor:
    """Inputs must lie in ``bounds``; normalise inside the model, not before the attack."""
    lo, hi = bounds
    if not lo < hi:
        raise SafetylabError(f"bounds must be (low, high) with low < high, got {bounds}")
    if x.numel() == 0:
        raise SafetylabError(f"{name} is empty: expected a batch of at least one input")
    if not torch.isfinite(x).all():
        raise SafetylabError(f"{name} holds NaN or infinite values")
    x_min, x_max = x.min().item(), x.max().item()
    if x_min < lo or x_max > hi:
        raise SafetylabError(f"{name} must lie in [{lo}, {hi}] (the input range; normalise inside the model), "
                             f"got values in [{x_min:.4g}, {x_max:.4g}]")
    return x


def check_labels(y: torch.Tensor, num_classes: int, n: int | None = None, name: str = "y") -> torch.Tensor:
    if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise SafetylabError(f"{name} must be a 1-D integer tensor of class indices, got {y.dtype} {tuple(y.shape)}")
    if n is not None and len(y) != n:
        raise SafetylabError(f"{name} has {len(y)} labels for {n} inputs")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise SafetylabError(f"{name} must hold class indices in [0, {num_classes - 1}], "
                             f"got values in [{y.min().item()}, {y.max().item()}]")
    return y.long()


def check_logits(logits: object, n: int, name: str = "model output") -> torch.Tensor:
    """The model must return a ``(N, classes)`` tensor of logits with classes >= 2."""
    if not isinstance(logits, torch.Tensor):
        raise SafetylabError(f"{name} must be a tensor of logits (N, classes), got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != n or logits.shape[1] < 2:
        raise SafetylabError(f"{name} must have shape (N={n}, classes>=2), got {tuple(logits.shape)}")
    return logits


def check_probs(probs: torch.Tensor, name: str = "probs", dims: int = 2) -> torch.Tensor:
    """Probabilities ``(N, classes)`` (``dims=2``) or ``(samples, N, classes)`` (``dims=3``): classes >= 2,
    not empty, finite, non-negative rows that sum to 1."""
    shape = "(N, classes)" if dims == 2 else "(samples, N, classes)"
    if not isinstance(probs, torch.Tensor) or probs.dim() != dims or probs.shape[-1] < 2:
        got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise SafetylabError(f"{name} must have shape {shape} with classes >= 2, got {got}")
    if probs.numel() == 0:
        raise SafetylabError(f"{name} is empty: expected at least one prediction, got shape {tuple(probs.shape)}")
    if not torch.isfinite(probs).all() or (probs < 0).any() or ((probs.sum(-1) - 1).abs() > 1e-4).any():
        raise SafetylabError(f"{name} must hold probabilities: non-negative rows that sum to 1 over the classes")
    return probs


def check_eval(model: nn.Module, name: str = "model") -> nn.Module:
    """Evaluation must see the deployed model: raise if any submodule is in training mode."""
    if any(m.training for m in model.modules()):
        raise SafetylabError(f"{name} is in training mode: call {name}.eval() before evaluating it "
                             "(dropout and batch-norm statistics would change its predictions)")
    return model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards, even on error."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def logits_of(model: nn.Module, x: torch.Tensor, name: str = "model output") -> torch.Tensor:
    """``model(x)``, checked to be ``(len(x), classes)`` logits."""
    return check_logits(model(x), len(x), name)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def is_tensor_pair(data: object) -> bool:
    """Whether ``data`` is an ``(x, y)`` pair of tensors rather than an iterable of batches."""
    return isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def batches(data: Data, batch_size: int = 512, name: str = "data") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from a pair of tensors or from any iterable of batches (a DataLoader).

    Raises if there is no batch at all, so an empty loader never reads as a perfect score.
    """
    if is_tensor_pair(data):
        x, y = data
        if len(x) != len(y):
            raise SafetylabError(f"{name}: {len(x)} inputs but {len(y)} labels")
        if len(x) == 0:
            raise SafetylabError(f"{name} is empty: expected at least one example")
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    seen = False
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise SafetylabError(f"{name}: each batch must be (inputs, labels), got {type(batch).__name__}")
        seen = True
        yield batch[0], batch[1]
    if not seen:
        raise SafetylabError(f"{name} is empty: the loader yielded no batch")


def gather(data: Data, name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``data`` as one ``(x, y)`` pair of tensors."""
    xs, ys = zip(*batches(data, name=name))
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of an evaluation-mode model on ``x``, in batches, on the model's device, returned on CPU."""
    check_eval(model)
    device = model_device(model)
    if len(x) == 0:
        raise SafetylabError("x is empty: expected at least one input")
    out = [logits_of(model, x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out)
