"""Input regions and output specifications.

A :class:`Region` is, per example, a box ``[lower, upper]`` — an L∞ ball clipped to the input domain, or
any box — optionally intersected with an L2 ball. A specification is a matrix ``C`` (``(B, S, K)``, or
``(S, K)`` for every example) over the ``K`` outputs: the network is verified on the region when every
row's lower bound of ``C · f(x)`` is positive. :func:`margin_spec` gives the usual one, the margins between
the true class and each other class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from safetylab.core.errors import SafetylabError
from safetylab.core.tensors import check_labels


def _check_batch(x: object, name: str) -> torch.Tensor:
    """``x`` must be a floating-point tensor ``(batch, *input_shape)`` holding at least one example."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise SafetylabError(f"{name} must be a floating-point tensor (batch, *input_shape), got {got}")
    if x.dim() < 2 or len(x) == 0:
        raise SafetylabError(f"{name} must be a floating-point tensor (batch, *input_shape) with at least one "
                             f"example, got shape {tuple(x.shape)}")
    return x


@dataclass(frozen=True)
class Region:
    """Per example, the box ``[lower, upper]`` (``(B, *input_shape)`` each), intersected with the L2 ball
    of ``radius`` around ``center`` when those are given. Checked when built: floating-point tensors of
    one shape, dtype and device, finite, ``lower <= upper``."""

    lower: torch.Tensor
    upper: torch.Tensor
    center: torch.Tensor | None = None
    radius: float | None = None

    def __post_init__(self) -> None:
        lower = _check_batch(self.lower, "lower")
        others = {"upper": self.upper} if self.center is None else {"upper": self.upper, "center": self.center}
        for name, t in others.items():
            if not (isinstance(t, torch.Tensor) and (t.shape, t.dtype, t.device) == (lower.shape, lower.dtype,
                                                                                     lower.device)):
                got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise SafetylabError(f"{name} must have lower's shape {tuple(lower.shape)} and dtype {lower.dtype} "
                                     f"on {lower.device}, got {got}")
        if (self.center is None) != (self.radius is None):
            raise SafetylabError("center and radius come together (an L2 ball) or not at all, got only one")
        if self.radius is not None and not (isinstance(self.radius, Real) and 0 <= self.radius < math.inf):
            raise SafetylabError(f"radius must be a finite number >= 0, got {self.radius!r}")
        if not all(torch.isfinite(t).all() for t in (lower, *others.values())):
            raise SafetylabError(f"{', '.join(['lower', *others])} must hold finite numbers")
        if (lower > self.upper).any():
            raise SafetylabError("lower must be <= upper everywhere")

    @property
    def batch(self) -> int:
        return self.lower.shape[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.lower.shape[1:])


def box(lower: torch.Tensor, upper: torch.Tensor) -> Region:
    """The box ``[lower, upper]``, both ``(B, *input_shape)``, ``lower <= upper``."""
    return Region(lower, upper)


def check_region(region: object, input_shape: tuple[int, ...] | None = None) -> Region:
    """``region`` must be a :class:`Region`, of inputs of the network's per-example ``input_shape`` when given."""
    if not isinstance(region, Region):
        raise SafetylabError(f"region must be a Region (box, linf_ball, l2_ball), got {type(region).__name__}")
    if input_shape is not None and region.input_shape != tuple(input_shape):
        raise SafetylabError(f"region holds inputs of shape {region.input_shape} but the network takes {input_shape}")
    return region


def _ball_box(x: torch.Tensor, eps: float, domain: tuple[float, float], norm: str) -> tuple[torch.Tensor, ...]:
    if not eps >= 0:
        raise SafetylabError(f"eps must be >= 0 (the radius of the {norm} ball), got {eps}")
    lo, hi = domain
    if not lo < hi:
        raise SafetylabError(f"domain must be (low, high) with low < high, got {domain}")
    _check_batch(x, "x")
    if not torch.isfinite(x).all() or x.min() < lo or x.max() > hi:
        raise SafetylabError(f"x must lie in the input domain [{lo}, {hi}]: the region would lie outside it")
    return (x - eps).clamp(min=lo), (x + eps).clamp(max=hi)


def linf_ball(x: torch.Tensor, eps: float, domain: tuple[float, float] = (0.0, 1.0)) -> Region:
    """``{x' : ‖x' − x‖∞ ≤ eps} ∩ domain`` — a box."""
    return box(*_ball_box(x, eps, domain, "L∞"))


def l2_ball(x: torch.Tensor, eps: float, domain: tuple[float, float] = (0.0, 1.0)) -> Region:
    """``{x' : ‖x' − x‖₂ ≤ eps} ∩ domain``: the clipped L∞ ball of the same radius, which holds it,
    intersected with the L2 ball itself."""
    lower, upper = _ball_box(x, eps, domain, "L2")
    return Region(lower, upper, x, float(eps))


def concretize(a: torch.Tensor, const: torch.Tensor, region: Region) -> torch.Tensor:
    """``min_{x ∈ region} A x + c`` per example and row: ``A x̂ − |A| r`` over the box with centre ``x̂``
    and radius ``r`` (Hölder with the L∞ norm), and, with an L2 ball, the larger of that and
    ``A x₀ − ε ‖A‖₂`` (Hölder with the L2 norm) — both are lower bounds on the intersection.

    ``a`` is ``(B, S, *input_shape)``, ``const`` ``(B, S)``; returns ``(B, S)``."""
    a = a.flatten(2)
    mid = ((region.upper + region.lower) / 2).flatten(1).unsqueeze(-1)
    rad = ((region.upper - region.lower) / 2).flatten(1).unsqueeze(-1)
    bound = (a @ mid - a.abs() @ rad).squeeze(-1) + const
    if region.center is None:
        return bound
    ball = (a @ region.center.flatten(1).unsqueeze(-1)).squeeze(-1) - region.radius * a.norm(dim=-1) + const
    return torch.maximum(bound, ball)


def margin_spec(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``C`` of shape ``(B, K − 1, K)`` whose rows are ``e_y − e_j`` for every class ``j ≠ y``: ``C f(x)``
    are the margins of the true class, and the prediction is certified when all are positive."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 2:
        raise SafetylabError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    labels = check_labels(labels, num_classes, name="labels")
    if len(labels) == 0:
        raise SafetylabError("labels must be non-empty: one class index per example, got none")
    eye = torch.eye(num_classes, device=labels.device)
    others = ~torch.eye(num_classes, dtype=torch.bool, device=labels.device)[labels]  # (B, K)
    rows = eye[labels].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K): e_y − e_j for every j
    return rows[others].reshape(len(labels), num_classes - 1, num_classes)


def check_spec(spec: torch.Tensor | None, batch: int, outputs: int, like: torch.Tensor) -> torch.Tensor:
    """The specification as ``(B, S, K)`` on ``like``'s device, in the wider of its dtype and ``like``'s (a
    float64 specification is never rounded to float32); the identity in ``like``'s dtype when None."""
    if spec is None:
        return torch.eye(outputs, dtype=like.dtype, device=like.device).expand(batch, outputs, outputs)
    if not isinstance(spec, torch.Tensor) or spec.is_complex():
        got = spec.dtype if isinstance(spec, torch.Tensor) else type(spec).__name__
        raise SafetylabError(f"spec must be a tensor (batch, rows, outputs) or (rows, outputs), got {got}")
    if spec.dim() == 2:
        spec = spec.expand(batch, *spec.shape)
    if spec.dim() != 3 or spec.shape[0] != batch or spec.shape[2] != outputs:
        raise SafetylabError(f"spec must have shape (batch={batch}, rows, outputs={outputs}) or (rows, {outputs}), "
                             f"got {tuple(spec.shape)}")
    if spec.shape[1] == 0:
        raise SafetylabError(f"spec must have at least one row (a property to verify), got shape {tuple(spec.shape)}")
    if not torch.isfinite(spec).all():
        raise SafetylabError("spec must hold finite numbers")
    return spec.to(dtype=torch.promote_types(spec.dtype, like.dtype), device=like.device)
