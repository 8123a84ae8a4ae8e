"""Input regions and output specifications.

A :class:`Region` is, per example, a box ``[lower, upper]`` — an L∞ ball clipped to the input domain, or
any box — optionally intersected with an L2 ball. A specification is a matrix ``C`` (``(B, S, K)``, or
``(S, K)`` for every example) over the ``K`` outputs: the network is verified on the region when every
row's lower bound of ``C · f(x)`` is positive. :func:`margin_spec` gives the usual one, the margins between
the true class and each other class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safetylab.core.errors import SafetylabError


@dataclass(frozen=True)
class Region:
    """Per example, the box ``[lower, upper]`` (``(B, *input_shape)`` each), intersected with the L2 ball
    of ``radius`` around ``center`` when those are given."""

    lower: torch.Tensor
    upper: torch.Tensor
    center: torch.Tensor | None = None
    radius: float | None = None

    @property
    def batch(self) -> int:
        return self.lower.shape[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.lower.shape[1:])


def box(lower: torch.Tensor, upper: torch.Tensor) -> Region:
    """The box ``[lower, upper]``, both ``(B, *input_shape)``, ``lower <= upper``."""
    if lower.shape != upper.shape or lower.dim() < 2:
        raise SafetylabError(f"box: lower and upper must have the same shape (batch, *input_shape), "
                             f"got {tuple(lower.shape)} and {tuple(upper.shape)}")
    if not (torch.isfinite(lower).all() and torch.isfinite(upper).all()):
        raise SafetylabError("box: lower and upper must be finite")
    if (lower > upper).any():
        raise SafetylabError("box: lower must be <= upper everywhere")
    return Region(lower, upper)


def _ball_box(x: torch.Tensor, eps: float, domain: tuple[float, float], norm: str) -> tuple[torch.Tensor, ...]:
    if not eps >= 0:
        raise SafetylabError(f"eps must be >= 0 (the radius of the {norm} ball), got {eps}")
    lo, hi = domain
    if not lo < hi:
        raise SafetylabError(f"domain must be (low, high) with low < high, got {domain}")
    if x.dim() < 2:
        raise SafetylabError(f"x must be a batch (batch, *input_shape), got shape {tuple(x.shape)}")
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
    if labels.dim() != 1 or labels.numel() == 0:
        raise SafetylabError(f"labels must be a non-empty 1-D tensor of class indices, got shape {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise SafetylabError(f"labels must lie in 0..{num_classes - 1}, "
                             f"got {labels.min().item()}..{labels.max().item()}")
    eye = torch.eye(num_classes, device=labels.device)
    others = ~torch.eye(num_classes, dtype=torch.bool, device=labels.device)[labels]  # (B, K)
    rows = eye[labels].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K): e_y − e_j for every j
    return rows[others].reshape(len(labels), num_classes - 1, num_classes)


def check_spec(spec: torch.Tensor | None, batch: int, outputs: int, like: torch.Tensor) -> torch.Tensor:
    """The specification as ``(B, S, K)`` in ``like``'s dtype and device (the identity when None)."""
    if spec is None:
        return torch.eye(outputs, dtype=like.dtype, device=like.device).expand(batch, outputs, outputs)
    if spec.dim() == 2:
        spec = spec.expand(batch, *spec.shape)
    if spec.dim() != 3 or spec.shape[0] != batch or spec.shape[2] != outputs:
        raise SafetylabError(f"spec must have shape (batch={batch}, rows, outputs={outputs}) or (rows, {outputs}), "
                             f"got {tuple(spec.shape)}")
    return spec.to(dtype=like.dtype, device=like.device)
