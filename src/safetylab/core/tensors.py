"""Tensor checks and the small helpers that classifier code shares (:mod:`safetylab.models.classifier`,
:mod:`safetylab.robust`, :mod:`safetylab.verify`).

A classifier here is any ``nn.Module`` that maps a batch of inputs ``(N, ...)`` in a stated range (a
:data:`Range` ``(low, high)``, passed as ``bounds``, [0, 1] by default; any normalisation lives inside
the model) to logits ``(N, classes)``.
Inputs are torch tensors in the floating-point dtype the model computes in (:func:`check_inputs`).
Every check raises :class:`~safetylab.core.errors.SafetylabError` naming the argument and what was
expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from numbers import Integral, Real

import torch
from torch import nn

from safetylab.core.errors import SafetylabError

Range = tuple[float, float]  # (low, high): the range every input value lies in
Data = tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
NORMS = ("linf", "l2")  # the threat models of attacks and adversarial training


# ----------------------------------------------------------------------------- numbers
def is_count(n: object) -> bool:
    """Whether ``n`` is an integer >= 1 (a bool is not)."""
    return isinstance(n, Integral) and not isinstance(n, bool) and n >= 1


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_count(n: int, name: str) -> int:
    """A number of steps, restarts, samples, members, a batch size: an integer >= 1."""
    if not is_count(n):
        raise SafetylabError(f"{name} must be an integer >= 1, got {n!r}")
    return int(n)


def check_eps(eps: float, name: str = "eps") -> float:
    """A radius (or another amount that may be 0): a finite number >= 0."""
    if not (_is_real(eps) and 0 <= eps < math.inf):
        raise SafetylabError(f"{name} must be a finite number >= 0, got {eps!r}")
    return float(eps)


def check_positive(value: float, name: str) -> float:
    """A step size or a temperature: a finite number > 0."""
    if not (_is_real(value) and 0 < value < math.inf):
        raise SafetylabError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_fraction(value: float, name: str) -> float:
    """A share or a probability: a number in [0, 1]."""
    if not (_is_real(value) and 0 <= value <= 1):
        raise SafetylabError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- tensors
def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite: one float64 sum, non-finite if any value is NaN or ±∞ (a
    fifth of the time of the elementwise check, which runs only when the sum is not finite: a sum of
    huge finite float64 values can overflow)."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64))) or bool(torch.isfinite(t).all())


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the model computes in: that of its first floating-point parameter (or buffer); None for
    a model that holds neither."""
    return next((t.dtype for t in chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)


def check_inputs(model: nn.Module, x: object, name: str = "x") -> torch.Tensor:
    """``x`` as a batch of inputs for ``model``: a non-empty torch tensor ``(N, ...)`` of finite values in
    the dtype the model computes in (:func:`model_dtype`; any floating-point dtype for a model without
    parameters).

    Refused rather than converted (torchattacks and pytorch-ood do not convert them either; there they
    fail with a raw error from the model's first layer): numpy arrays and other non-tensors; integer
    tensors (raw pixel values must be scaled into the input range first); and another floating-point
    dtype than the model's (a float64 batch for a float32 model is almost always a mistake, and casting
    it silently would drop the precision the caller asked for).
    """
    if not isinstance(x, torch.Tensor):
        raise SafetylabError(f"{name} must be a torch.Tensor batch of inputs (N, ...), got {type(x).__name__}: "
                             "convert it with torch.as_tensor(...)")
    if x.dim() == 0 or len(x) == 0:
        raise SafetylabError(f"{name} must be a non-empty batch of inputs (N, ...), got shape {tuple(x.shape)}")
    dtype = model_dtype(model)
    if not x.is_floating_point():
        raise SafetylabError(f"{name} must be a floating-point tensor{f' ({dtype})' if dtype else ''}, got {x.dtype}: "
                             "scale integer inputs such as raw pixel values into the input range and convert them")
    if dtype is not None and x.dtype != dtype:
        raise SafetylabError(f"{name} is {x.dtype} but the model computes in {dtype}: convert one to the other "
                             f"({name}.to({dtype}) or model.to({x.dtype}))")
    if not all_finite(x):
        raise SafetylabError(f"{name} holds NaN or infinite values")
    return x


@contextmanager
def model_takes(x: torch.Tensor, name: str = "x") -> Iterator[None]:
    """Run the model on the batch ``x`` inside: an error it raises on the way (a layer that cannot take the
    inputs' shape) becomes one that names the shape, most often a single input without its batch
    dimension, rather than a shape error from deep inside the model. Running out of memory is no shape
    error and passes through."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, IndexError) as e:
        raise SafetylabError(f"the model cannot take {name} of shape {tuple(x.shape)} as a batch of {len(x)} "
                             f"inputs of shape {tuple(x.shape[1:])} ({type(e).__name__}: {e}); a single input "
                             f"needs its batch dimension: {name}.unsqueeze(0)") from e


def probe(model: nn.Module, x: object, name: str = "x",
          forward: Callable[[torch.Tensor], object] | None = None) -> object:
    """Check ``x`` with :func:`check_inputs`, then return ``forward(x[:1])`` (the model by default), run
    once in eval mode without gradients on the model's device (:func:`model_takes`): for callers that
    need the model's output before their own pass (the number of classes, to check labels)."""
    x = check_inputs(model, x, name)
    with model_takes(x, name), torch.no_grad(), eval_mode(model):
        return (forward or model)(x[:1].to(model_device(model)))


def classes_of(model: nn.Module, x: object, name: str = "x") -> int:
    """The number of classes ``model`` predicts, from :func:`probe` on the batch ``x``."""
    return check_logits(probe(model, x, name), 1).shape[1]


def as_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it is: scores and probabilities keep a float64 model's precision,
    and half-precision logits are widened before softmax and log-sum-exp."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def check_range(x: torch.Tensor, bounds: Range = (0.0, 1.0), name: str = "x") -> torch.Tensor:
    """Inputs must lie in ``bounds``; normalise inside the model, not before the attack."""
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(map(_is_real, bounds))
            and bounds[0] < bounds[1]):
        raise SafetylabError(f"bounds must be (low, high) with low < high, got {bounds!r}")
    lo, hi = bounds
    if x.numel() == 0:
        raise SafetylabError(f"{name} is empty: expected a batch of at least one input")
    if not all_finite(x):
        raise SafetylabError(f"{name} holds NaN or infinite values")
    x_min, x_max = (v.item() for v in torch.aminmax(x))
    if x_min < lo or x_max > hi:
        raise SafetylabError(f"{name} must lie in [{lo}, {hi}] (the input range; normalise inside the model), "
                             f"got values in [{x_min:.4g}, {x_max:.4g}]")
    return x


def check_labels(y: object, num_classes: int, n: int | None = None, name: str = "y") -> torch.Tensor:
    """``y`` as int64 class indices: a 1-D integer tensor (of ``n`` labels when given) in [0, num_classes)."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype not in LABEL_DTYPES:
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise SafetylabError(f"{name} must be a 1-D integer tensor of class indices, got {got}")
    if n is not None and len(y) != n:
        raise SafetylabError(f"{name} has {len(y)} labels for {n} inputs")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise SafetylabError(f"{name} must hold class indices in [0, {num_classes - 1}], "
                             f"got values in [{y.min().item()}, {y.max().item()}]")
    return y.long()


def check_logits(logits: object, n: int | None = None, name: str = "model output") -> torch.Tensor:
    """Logits: a ``(N, classes)`` tensor with classes >= 2 and N = ``n`` (any N >= 1 when None)."""
    rows = "N" if n is None else f"N={n}"
    if not isinstance(logits, torch.Tensor):
        raise SafetylabError(f"{name} must be logits of shape ({rows}, classes>=2), got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] < 2 or (len(logits) == 0 if n is None else len(logits) != n):
        raise SafetylabError(f"{name} must be logits of shape ({rows}, classes>=2), got {tuple(logits.shape)}")
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


def check_eval(model: nn.Module, name: str = "model", task: str = "evaluating it") -> nn.Module:
    """The deployed model, fixed: raise if the model or any submodule is in training mode (a Dropout or
    BatchNorm left in training mode inside an eval-mode model changes its outputs too). The one check
    that evaluation, attacks, detectors and verification share; ``task`` completes the error message."""
    if not any(m.training for m in model.modules()):  # the common case, without building names
        return model
    training = [f"{name}.{path}" if path else name for path, m in model.named_modules() if m.training]
    shown = ", ".join(training[:3]) + (f" and {len(training) - 3} more" if len(training) > 3 else "")
    raise SafetylabError(f"{name} is in training mode ({shown}): call {name}.eval() before {task} "
                         "(dropout and batch-norm statistics would change its outputs)")


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


def check_pair(x: torch.Tensor, y: torch.Tensor, name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """A non-empty pair of tensors with one label per input."""
    if len(x) != len(y):
        raise SafetylabError(f"{name}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise SafetylabError(f"{name} is empty: expected at least one example")
    return x, y


def batches(data: Data, batch_size: int = 512, name: str = "data") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from a pair of tensors or from any iterable of batches (a DataLoader).

    Raises if there is no batch at all, so an empty loader never reads as a perfect score.
    """
    if is_tensor_pair(data):
        x, y = check_pair(*data, name)
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    seen = False
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and is_tensor_pair(tuple(batch[:2]))):
            pair = isinstance(data, tuple) and not isinstance(batch, (tuple, list))  # (x, y) of arrays, not batches
            raise SafetylabError(f"{name} must be a pair (x, y) of torch.Tensor or an iterable of such (inputs, "
                                 f"labels) batches, got {_kinds(data if pair else batch)}: convert arrays with "
                                 "torch.as_tensor(...)")
        seen = True
        yield batch[0], batch[1]
    if not seen:
        raise SafetylabError(f"{name} is empty: the loader yielded no batch")


def _kinds(obj: object) -> str:
    """``(ndarray, Tensor)`` for a tuple or list, else the name of the type."""
    return f"({', '.join(type(t).__name__ for t in obj)})" if isinstance(obj, (tuple, list)) else type(obj).__name__


def gather(data: Data, name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``data`` as one ``(x, y)`` pair of tensors."""
    xs, ys = zip(*batches(data, name=name))
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of an evaluation-mode model on the batch ``x`` (:func:`check_inputs`, :func:`model_takes`),
    ``batch_size`` inputs at a time on the model's device, returned on CPU in float32, or float64 for a
    float64 model (:func:`as_float`)."""
    check_eval(model)
    batch_size = check_count(batch_size, "batch_size")
    check_inputs(model, x)
    device = model_device(model)
    with model_takes(x):
        out = [as_float(logits_of(model, x[i:i + batch_size].to(device))).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out)
