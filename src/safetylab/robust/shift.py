"""Distribution shift: corruptions of images and feature vectors at five severities, far-OOD inputs, and a
report of how a classifier (and an OOD detector) fares under each shift.

After Hendrycks & Dietterich 2019 ("Benchmarking neural network robustness to common corruptions and
perturbations"): each corruption family is a pure function ``(x, severity, generator) -> x′`` with
severities 1..5 growing in strength, read from a table of five parameters per family (module constants
below). Image families take ``(N, C, H, W)`` inputs in [0, 1] of any size and return x′ of the same shape
in [0, 1]; feature families take ``(N, D)`` inputs and clip only when ``bounds`` is given. All randomness
comes from ``generator`` (torch's global generator when it is None) and is drawn on the generator's device,
so a seeded CPU generator draws the same numbers whatever x's device; every family draws the same random
numbers at every severity, so raising the severity strengthens the same corruption rather than drawing a
new one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.core.io import save_figure
from safetylab.core.tensors import Range, as_float, check_eval, check_labels, check_range, predict_logits
from safetylab.robust.calibration import calibration_metrics
from safetylab.robust.ood import auroc

Shift = Callable[[torch.Tensor, int, "torch.Generator | None"], torch.Tensor]
SEVERITIES = (1, 2, 3, 4, 5)

# Severity tables: entry s − 1 is the parameter at severity s.
NOISE_STDS = (0.08, 0.12, 0.18, 0.26, 0.38)  # Gaussian noise σ (the paper's ImageNet-C table)
BLUR_SIGMAS = (0.4, 0.6, 0.7, 0.8, 1.0)  # Gaussian blur σ in pixels (the paper's CIFAR-10-C table)
CONTRAST_FACTORS = (0.75, 0.5, 0.4, 0.3, 0.15)  # share of the contrast kept (the paper's CIFAR-10-C table)
BRIGHTNESS_OFFSETS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to every pixel (the paper's ImageNet-C table)
ROTATION_DEGREES = (10.0, 20.0, 30.0, 40.0, 50.0)  # rotation angle, random sign per image
TRANSLATION_FRACTIONS = (0.03, 0.06, 0.09, 0.12, 0.15)  # distance moved, as a fraction of the width / height
OCCLUSION_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625)  # patch side / width: 1, 2, 3, 4, 5 pixels on 8×8
FEATURE_NOISE_STDS = (0.2, 0.4, 0.6, 0.8, 1.0)  # noise σ in units of each feature's standard deviation
FEATURE_DROP_SHARES = (0.1, 0.2, 0.3, 0.4, 0.5)  # share of the features set to 0
FEATURE_LOG_GAINS = (0.1, 0.2, 0.3, 0.5, 0.7)  # τ: each feature is multiplied by exp(τ·z), z ~ N(0, 1)
FEATURE_DRIFTS = (0.25, 0.5, 0.75, 1.0, 1.5)  # drift δ in feature standard deviations (RMS over features)
OOD_KINDS = ("uniform", "gaussian", "blobs")
OCCLUSION_FILLS = ("zero", "noise")


# ----------------------------------------------------------------------------- checks and randomness
def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, Integral) or not 1 <= severity <= 5:
        raise SafetylabError(f"severity must be an integer in 1..5, got {severity!r}")
    return int(severity)


def _check_images(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise SafetylabError(f"{name} must be a float tensor of images (N, C, H, W), got {shape}")
    return check_range(x, (0.0, 1.0), name)


def _check_features(x: torch.Tensor, bounds: Range | None, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise SafetylabError(f"{name} must be a float tensor of feature vectors (N, D), got {shape}")
    if x.numel() == 0:
        raise SafetylabError(f"{name} is empty: expected at least one feature vector")
    if not torch.isfinite(x).all():
        raise SafetylabError(f"{name} holds NaN or infinite values")
    return x if bounds is None else check_range(x, bounds, name)


def _rand(shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None,
          normal: bool = False) -> torch.Tensor:
    """U[0, 1) (or N(0, 1)) draws on the generator's device, returned on ``like``'s device and dtype."""
    device = like.device if generator is None else generator.device
    draw = torch.randn if normal else torch.rand
    return draw(tuple(shape), generator=generator, device=device).to(like.device, like.dtype)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    """A per-image value (N,) shaped to broadcast against (N, C, H, W)."""
    return v.view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- image primitives
def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian kernel k_i ∝ exp(−i² / 2σ²), i = −r..r with r = ⌈3σ⌉, in float64."""
    radius = max(1, math.ceil(3 * sigma))
    i = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(i**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of each channel (depthwise conv2d), borders replicated so that a constant
    image stays constant."""
    if not sigma > 0:
        raise SafetylabError(f"sigma must be > 0 (the blur's standard deviation in pixels), got {sigma}")
    k = gaussian_kernel(sigma).to(x.device, x.dtype)
    r, c = len(k) // 2, x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear affine warp; ``theta`` (N, 2, 3) maps each output point to where it samples the input, in
    normalised coordinates (align_corners=False); points from outside the image read 0."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


def rotate(x: torch.Tensor, degrees: float | torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by ``degrees`` (a number or one per image), counter-clockwise as
    displayed (row 0 at the top); corners that come from outside the image are 0.

    Output pixel q samples input point p = R q in pixel units about the centre, R = [[cos α, −sin α],
    [sin α, cos α]]; in normalised coordinates the off-diagonal terms carry the aspect ratio H/W.
    """
    n, _, h, w = x.shape
    angle = torch.deg2rad(torch.as_tensor(degrees, dtype=torch.float64, device=x.device).expand(n))
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1)
    return _warp(x, theta)


def translate(x: torch.Tensor, dx: float | torch.Tensor, dy: float | torch.Tensor) -> torch.Tensor:
    """Move each image's content ``dx`` pixels right and ``dy`` pixels down (numbers or one per image);
    what enters from outside is 0. Whole-pixel shifts move pixels exactly."""
    n, _, h, w = x.shape
    dx = torch.as_tensor(dx, dtype=torch.float64, device=x.device).expand(n)
    dy = torch.as_tensor(dy, dtype=torch.float64, device=x.device).expand(n)
    one, zero = torch.ones_like(dx), torch.zeros_like(dx)
    theta = torch.stack([torch.stack([one, zero, -2 * dx / w], 1), torch.stack([zero, one, -2 * dy / h], 1)], 1)
    return _warp(x, theta)


# ----------------------------------------------------------------------------- image corruption families
def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """x′ = clip(x + σ·ε, 0, 1), ε ~ N(0, I), σ from ``NOISE_STDS``."""
    sigma = NOISE_STDS[_check_severity(severity) - 1]
    x = _check_images(x)
    return (x + sigma * _rand(x.shape, x, generator, normal=True)).clamp(0, 1)


def blur(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian blur with σ pixels from ``BLUR_SIGMAS`` (deterministic; ``generator`` is unused)."""
    sigma = BLUR_SIGMAS[_check_severity(severity) - 1]
    return gaussian_blur(_check_images(x), sigma).clamp(0, 1)


def contrast(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """x′ = m + c·(x − m): pull each image towards its mean m (per channel), keeping a share c of the
    contrast from ``CONTRAST_FACTORS`` (deterministic)."""
    c = CONTRAST_FACTORS[_check_severity(severity) - 1]
    x = _check_images(x)
    m = x.mean((2, 3), keepdim=True)
    return (m + c * (x - m)).clamp(0, 1)


def brightness(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """x′ = min(x + b, 1) with b from ``BRIGHTNESS_OFFSETS`` (deterministic; the paper adds b to the
    HSV value channel, which is the same for grey images)."""
    b = BRIGHTNESS_OFFSETS[_check_severity(severity) - 1]
    return (_check_images(x) + b).clamp(0, 1)


def rotation(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each image by ±α degrees (α from ``ROTATION_DEGREES``, the sign random per image)."""
    alpha = ROTATION_DEGREES[_check_severity(severity) - 1]
    x = _check_images(x)
    sign = torch.where(_rand((len(x),), x, generator) < 0.5, -1.0, 1.0)
    return rotate(x, alpha * sign)


def translation(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Move each image by (f·W·cos φ, f·H·sin φ) pixels, φ ~ U[0, 2π) drawn per image and f from
    ``TRANSLATION_FRACTIONS`` (f·W is 1.2 pixels at 8×8 and 4.8 at 32×32 for severity 5): shifts of a
    fraction of a pixel are bilinear, so small images get a graded curve rather than whole-pixel jumps."""
    f = TRANSLATION_FRACTIONS[_check_severity(severity) - 1]
    x = _check_images(x)
    h, w = x.shape[2:]
    phi = 2 * math.pi * _rand((len(x),), x, generator).double()
    return translate(x, f * w * phi.cos(), f * h * phi.sin())


def occlusion(x: torch.Tensor, severity: int, generator: torch.Generator | None = None,
              fill: str = "zero") -> torch.Tensor:
    """Set a square patch of side s = max(1, round(f·W)) to 0 (``fill="zero"``, Cutout: DeVries & Taylor
    2017, "Improved regularization of convolutional neural networks with cutout") or to U[0, 1) noise
    (``fill="noise"``, random erasing), f from ``OCCLUSION_FRACTIONS``. As in Cutout, the patch's centre is
    uniform over the image and the patch is cut at the border; a higher severity grows the same patch."""
    f = OCCLUSION_FRACTIONS[_check_severity(severity) - 1]
    if fill not in OCCLUSION_FILLS:
        raise SafetylabError(f"fill must be one of {', '.join(OCCLUSION_FILLS)}, got {fill!r}")
    x = _check_images(x)
    n, _, h, w = x.shape
    side = max(1, math.floor(f * w + 0.5))
    centre = (_rand((n, 2), x, generator) * torch.tensor([h, w], device=x.device)).long()
    top, left = _per_image(centre[:, 0] - side // 2), _per_image(centre[:, 1] - side // 2)
    rows = torch.arange(h, device=x.device).view(1, 1, -1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, -1)
    patch = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    value = torch.zeros_like(x) if fill == "zero" else _rand(x.shape, x, generator)
    return torch.where(patch, value, x)


IMAGE_SHIFTS: dict[str, Shift] = {
    "gaussian_noise": gaussian_noise, "blur": blur, "contrast": contrast, "brightness": brightness,
    "rotation": rotation, "translation": translation, "occlusion": occlusion,
}


# ----------------------------------------------------------------------------- feature-vector families
def _feature_std(x: torch.Tensor, std: torch.Tensor | None, reference: torch.Tensor | None) -> torch.Tensor:
    """Each feature's standard deviation: ``std`` as given, else estimated from ``reference`` (N_ref, D),
    else from ``x`` itself."""
    d = x.shape[1]
    if std is not None and reference is not None:
        raise SafetylabError("give std or reference, not both (reference is only used to estimate std)")
    if std is not None:
        std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
        if std.shape != (d,) or not torch.isfinite(std).all() or (std < 0).any():
            raise SafetylabError(f"std must hold one finite value >= 0 per feature, shape ({d},), "
                                 f"got shape {tuple(std.shape)}")
        return std
    source, name = (x, "x") if reference is None else (reference, "reference")
    source = _check_features(source, None, name)
    if source.shape[1] != d or len(source) < 2:
        raise SafetylabError(f"{name} must hold at least 2 feature vectors of size {d} to estimate each "
                             f"feature's std, got shape {tuple(source.shape)}")
    return source.std(0).to(x.device, x.dtype)


def _clip(x: torch.Tensor, bounds: Range | None) -> torch.Tensor:
    return x if bounds is None else x.clamp(*bounds)


def feature_noise(x: torch.Tensor, severity: int, generator: torch.Generator | None = None, *,
                  std: torch.Tensor | None = None, reference: torch.Tensor | None = None,
                  bounds: Range | None = None) -> torch.Tensor:
    """x′_ij = x_ij + λ·σ_j·ε_ij, ε ~ N(0, 1): noise scaled by each feature's standard deviation σ_j
    (``std``, or estimated from ``reference`` or else from x), λ from ``FEATURE_NOISE_STDS``."""
    lam = FEATURE_NOISE_STDS[_check_severity(severity) - 1]
    x = _check_features(x, bounds)
    sigma = _feature_std(x, std, reference)
    return _clip(x + lam * sigma * _rand(x.shape, x, generator, normal=True), bounds)


def feature_dropout(x: torch.Tensor, severity: int, generator: torch.Generator | None = None, *,
                    bounds: Range | None = None) -> torch.Tensor:
    """Set ⌈p·D⌉ features to 0 in every example, the same features for the whole batch (an upstream
    column or sensor lost), p from ``FEATURE_DROP_SHARES``; a higher severity drops more of the same."""
    p = FEATURE_DROP_SHARES[_check_severity(severity) - 1]
    x = _check_features(x, bounds)
    d = x.shape[1]
    order = _rand((d,), x, generator).argsort()
    dropped = torch.zeros(d, dtype=torch.bool, device=x.device)
    dropped[order[:math.ceil(p * d)]] = True
    return _clip(x.masked_fill(dropped, 0.0), bounds)


def feature_scale(x: torch.Tensor, severity: int, generator: torch.Generator | None = None, *,
                  bounds: Range | None = None) -> torch.Tensor:
    """Multiplicative drift x′_ij = x_ij · exp(τ·z_j), z ~ N(0, I_D) drawn once per feature (a gain that
    drifts), τ from ``FEATURE_LOG_GAINS``."""
    tau = FEATURE_LOG_GAINS[_check_severity(severity) - 1]
    x = _check_features(x, bounds)
    return _clip(x * torch.exp(tau * _rand((x.shape[1],), x, generator, normal=True)), bounds)


def feature_shift(x: torch.Tensor, severity: int, generator: torch.Generator | None = None, *,
                  std: torch.Tensor | None = None, reference: torch.Tensor | None = None,
                  bounds: Range | None = None) -> torch.Tensor:
    """Additive drift along a random direction: every example moves by v = δ·σ ⊙ z / rms(z), z ~ N(0, I_D),
    i.e. δ feature standard deviations (root mean square over features), σ as in :func:`feature_noise`,
    δ from ``FEATURE_DRIFTS``."""
    delta = FEATURE_DRIFTS[_check_severity(severity) - 1]
    x = _check_features(x, bounds)
    sigma = _feature_std(x, std, reference)
    z = _rand((x.shape[1],), x, generator, normal=True)
    return _clip(x + delta * sigma * z / z.pow(2).mean().sqrt().clamp_min(1e-12), bounds)


FEATURE_SHIFTS: dict[str, Shift] = {
    "feature_noise": feature_noise, "feature_dropout": feature_dropout, "feature_scale": feature_scale,
    "feature_shift": feature_shift,
}


# ----------------------------------------------------------------------------- far-OOD inputs
def synthetic_ood(n: int, shape: Sequence[int], kind: str = "uniform",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` far out-of-distribution inputs of ``shape`` (per input, e.g. (C, H, W)) in [0, 1], the
    synthetic outliers of Hendrycks, Mazeika & Dietterich 2019 ("Deep anomaly detection with outlier
    exposure"):

    - ``uniform``: U[0, 1) per value;
    - ``gaussian``: clip(0.5 + 0.25·ε, 0, 1), ε ~ N(0, 1);
    - ``blobs``: b ~ Bernoulli(0.7) per value, blurred with σ = max(1, 1.5·min(H, W)/32) pixels (the
      paper's 1.5 at 32×32), values below 0.75 set to 0: smooth blobs with sharp edges. Needs (C, H, W).

    Returned on the generator's device (CPU when it is None).
    """
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise SafetylabError(f"n must be a positive integer (how many inputs), got {n!r}")
    if kind not in OOD_KINDS:
        raise SafetylabError(f"kind must be one of {', '.join(OOD_KINDS)}, got {kind!r}")
    shape = tuple(shape)
    if not shape or not all(isinstance(s, Integral) and s >= 1 for s in shape):
        raise SafetylabError(f"shape must be the positive sizes of one input, e.g. (C, H, W), got {shape}")
    if kind == "blobs" and len(shape) != 3:
        raise SafetylabError(f"blobs need shape (C, H, W), got {shape}")
    like = torch.empty(0, device=torch.device("cpu") if generator is None else generator.device)
    size = (int(n), *shape)
    if kind == "uniform":
        return _rand(size, like, generator)
    if kind == "gaussian":
        return (0.5 + 0.25 * _rand(size, like, generator, normal=True)).clamp(0, 1)
    bits = (_rand(size, like, generator) < 0.7).float()
    smooth = gaussian_blur(bits, max(1.0, 1.5 * min(shape[1:]) / 32)).clamp(0, 1)
    return smooth * (smooth >= 0.75)


# ----------------------------------------------------------------------------- report and plot
class Scorer(Protocol):
    """What shift_report needs of an OOD detector: one score per input, higher = more anomalous."""

    def score(self, x: torch.Tensor) -> torch.Tensor: ...


def _detector_scores(detector: Scorer, x: torch.Tensor) -> torch.Tensor:
    scores = detector.score(x)
    if not isinstance(scores, torch.Tensor) or scores.shape != (len(x),):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise SafetylabError(f"detector.score(x) must return one score per input, shape ({len(x)},), got {shape}")
    return as_float(scores.detach()).cpu()


def shift_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, shifts: Mapping[str, Shift] = IMAGE_SHIFTS,
                 severities: Sequence[int] = SEVERITIES, detector: Scorer | None = None, seed: int = 0,
                 batch_size: int = 1024) -> list[dict[str, Any]]:
    """How an evaluation-mode classifier fares under each shift and severity.

    One row for the clean data (shift ``"none"``, severity 0), then one per (shift, severity), each with
    ``accuracy``, ``ece``, ``nll`` and ``brier`` (:func:`safetylab.robust.calibration.calibration_metrics`).
    With a ``detector`` (``.score(x)``: one score per input, higher = more anomalous) rows also hold its mean
    score ``ood_score`` and ``ood_auroc``, the AUROC of telling the shifted inputs from the clean ones
    (None on the clean row). Every shift at every severity is drawn from a generator seeded with ``seed``,
    so rows repeat and severities differ only in strength. The whole of x is shifted at once, on x's device.
    """
    check_eval(model)
    if "none" in shifts:
        raise SafetylabError('shifts must not use the name "none": it names the clean row')
    severities = [_check_severity(s) for s in severities]
    if not shifts or not severities:
        raise SafetylabError("shifts and severities must each name at least one entry")

    def row(name: str, severity: int, xs: torch.Tensor) -> dict[str, Any]:
        logits = predict_logits(model, xs, batch_size)
        labels = check_labels(y, logits.shape[1], len(xs)).cpu()
        out = {"shift": name, "severity": severity,
               **{k: float(v) for k, v in calibration_metrics(logits.softmax(1), labels).items()}}
        if detector is not None:
            scores = clean_scores if severity == 0 else _detector_scores(detector, xs)
            out["ood_score"] = scores.mean().item()
            out["ood_auroc"] = None if severity == 0 else float(auroc(clean_scores, scores))
        return out

    clean_scores = None if detector is None else _detector_scores(detector, x)
    rows = [row("none", 0, x)]
    for name, shift in shifts.items():
        for severity in severities:
            rows.append(row(name, severity, shift(x, severity, torch.Generator().manual_seed(seed))))
    return rows


def plot_shift(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "accuracy") -> Path:
    """Plot ``metric`` against severity, one line per shift, the clean value (shift ``"none"``) dashed;
    written atomically by :func:`~safetylab.core.io.save_figure` (format from the suffix)."""
    rows = list(rows)
    if not rows or any(metric not in r for r in rows):
        raise SafetylabError(f"rows must be shift_report rows that all hold {metric!r}")
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for name in dict.fromkeys(r["shift"] for r in rows if r["shift"] != "none"):
        points = sorted((r["severity"], r[metric]) for r in rows if r["shift"] == name and r[metric] is not None)
        ax.plot(*zip(*points), "o-", label=name)
    clean = [r[metric] for r in rows if r["shift"] == "none" and r[metric] is not None]
    if clean:
        ax.axhline(clean[0], color="black", linestyle="--", linewidth=1, label="clean")
    ax.set(xlabel="severity", ylabel=metric, xticks=SEVERITIES, title=f"{metric} under distribution shift")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)
