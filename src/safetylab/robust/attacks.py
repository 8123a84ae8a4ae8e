"""Adversarial attacks on any classifier: FGSM, PGD, APGD (CE and DLR) and the black-box Square attack.

Threat model: x′ with ‖x′ − x‖_p ≤ ε (p = ∞ or 2) inside the input range ``bounds`` ([0, 1] by default;
any normalisation lives inside the model). Every attack returns x′ of the same shape, inside the ball
and the range, and leaves the model as it found it: it runs in eval mode, each submodule's own mode is
restored afterwards, and parameter gradients are never touched (gradients are taken with respect to the
input only). Untargeted attacks seek argmax f(x′) ≠ y; targeted ones (``targeted=True``, ``y`` holding
the target classes) seek argmax f(x′) = y. Every argument is checked before the first gradient: x is a
batch in the model's dtype (:func:`~safetylab.core.tensors.check_inputs`), y one label per input, and
each step count, step size and loss name a valid one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.core.tensors import (
    NORMS,
    Range,
    check_count,
    check_eps,
    check_fraction,
    check_labels,
    check_positive,
    check_range,
    classes_of,
    eval_mode,
    logits_of,
    model_device,
)

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- losses
def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy −log softmax(z)_y."""
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y − max_{i≠y} z_i: positive while the point is classified as y (Carlini & Wagner 2017)."""
    z_y = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf"))
    return z_y - others.max(1).values


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio, Croce & Hein 2020 ("Reliable evaluation of adversarial robustness
    with an ensemble of diverse parameter-free attacks"), eq. 6:

        DLR(z, y) = −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3)

    with z sorted z_π1 ≥ z_π2 ≥ z_π3; invariant to shifting and rescaling the logits. Needs ≥ 3 classes.
    """
    if logits.shape[1] < 3:
        raise SafetylabError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    top = logits.sort(1, descending=True).values
    return -margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


LOSSES: dict[str, Loss] = {"ce": ce_loss, "dlr": dlr_loss}


def loss_by_name(name: str) -> Loss:
    """The attack loss ``name`` (a key of ``LOSSES``)."""
    if not isinstance(name, str) or name not in LOSSES:
        raise SafetylabError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
    return LOSSES[name]


# ----------------------------------------------------------------------------- geometry
def _norms(v: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norms, shaped to broadcast against ``v``."""
    return v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: str = "linf",
            bounds: Range = (0.0, 1.0)) -> torch.Tensor:
    """The point of the ε-ball around x (intersected with the box ``bounds``) nearest to x_adv for L∞;
    for L2 the radial projection onto the ball, then the box. Clipping to the box moves every coordinate
    towards x's (which is inside it), so the result stays in the ball."""
    check_norm(norm)
    if norm == "linf":
        return torch.clamp(x_adv, *linf_box(x, eps, bounds))
    delta = x_adv - x
    delta = delta * torch.clamp(eps / (_norms(delta) + 1e-12), max=1.0)
    return torch.clamp(x + delta, *bounds)


def linf_box(x: torch.Tensor, eps: float | torch.Tensor, bounds: Range = (0.0, 1.0),
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The L∞ ball around x intersected with the box ``bounds``, per coordinate: (max(x − ε, low),
    min(x + ε, high)); clamping to it is the L∞ projection."""
    low, high = bounds
    return (x - eps).clamp_min(low), (x + eps).clamp_max(high)


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent unit step: sign(g) for L∞, g / ‖g‖₂ for L2."""
    return grad.sign() if norm == "linf" else grad / (_norms(grad) + 1e-12)


def random_start(x: torch.Tensor, eps: float, norm: str = "linf", bounds: Range = (0.0, 1.0),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform point of the ε-ball around x (L∞: uniform per coordinate; L2: uniform in the ball),
    clipped to the box."""
    check_norm(norm)
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    if norm == "linf":
        return project(x + eps * (2 * noise - 1), x, eps, norm, bounds)
    gauss = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    radius = eps * noise.flatten(1)[:, :1].pow(1.0 / x[0].numel()).view(-1, *[1] * (x.dim() - 1))
    return project(x + radius * gauss / (_norms(gauss) + 1e-12), x, eps, norm, bounds)


# ----------------------------------------------------------------------------- checks and gradients
def check_norm(norm: str) -> str:
    if not isinstance(norm, str) or norm not in NORMS:
        raise SafetylabError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return norm


def _check_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, bounds: Range,
                  ) -> torch.Tensor:
    """The checks every attack shares; returns the labels as int64 on x's device."""
    check_norm(norm)
    check_eps(eps)
    classes = classes_of(model, x)
    device = model_device(model)
    if next(model.parameters(), None) is not None and x.device != device:
        raise SafetylabError(f"x is on {x.device} but the model on {device}: move x there (x.to('{device}')); "
                             "the attack returns x′ on x's device")
    check_range(x, bounds)
    return check_labels(y, classes, len(x)).to(x.device)


def _step_size(eps: float, steps: int, step_size: float | None) -> float:
    """α: ``step_size``, or 2.5·ε/steps when None (Madry et al. 2018)."""
    steps = check_count(steps, "steps")
    return 2.5 * eps / steps if step_size is None else check_positive(step_size, "step_size")


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Loss = ce_loss,
                   targeted: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, per-example loss (negated when ``targeted``: the attack ascends it) and ∂loss/∂x."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_of(model, x)
        value = loss(logits, y)
        if targeted:
            value = -value
        (grad,) = torch.autograd.grad(value.sum(), x, allow_unused=True) if value.requires_grad else (None,)
    if grad is None:
        raise SafetylabError("the model's output has no gradient with respect to its input (it detaches or "
                             "is not differentiable): gradient attacks cannot run; use the black-box "
                             "square attack, and treat gradient-based robustness as masked")
    return logits.detach(), value.detach(), grad.detach()


def _fooled(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


# ----------------------------------------------------------------------------- FGSM and PGD
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
         targeted: bool = False, bounds: Range = (0.0, 1.0)) -> torch.Tensor:
    """Fast gradient sign method, Goodfellow et al. 2015 ("Explaining and harnessing adversarial
    examples"): x′ = clip(x + ε · sign(∇ₓ CE(f(x), y))); for L2 the step is ε · ∇/‖∇‖₂ (fast gradient method)."""
    y = _check_attack(model, x, y, eps, norm, bounds)
    with eval_mode(model):
        _, _, grad = input_gradient(model, x, y, targeted=targeted)
    return project(x + eps * _direction(grad, norm), x, eps, norm, bounds).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf", steps: int = 20,
        step_size: float | None = None, restarts: int = 1, rand_init: bool = True, targeted: bool = False,
        loss: str = "ce", early_stop: bool = True, bounds: Range = (0.0, 1.0),
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent, Madry et al. 2018 ("Towards deep learning models resistant to
    adversarial attacks"):

        x⁰ = x + U(ball) (random start),   xᵗ⁺¹ = Π_{B(x, ε) ∩ box}(xᵗ + α · dir(∇ₓ L(f(xᵗ), y)))

    with dir = sign for L∞ and ∇/‖∇‖₂ for L2, α = ``step_size`` (default 2.5·ε/steps). With
    ``early_stop`` (evaluation) a point keeps the first x′ that fools the model and leaves the batch (the
    batch shrinks once an eighth of it is done, so that few distinct shapes reach the kernels); restarts
    attack only the points not yet fooled. Without it (training) every point takes every step
    and the last iterate is returned.
    """
    y = _check_attack(model, x, y, eps, norm, bounds)
    alpha, restarts, loss_fn = _step_size(eps, steps, step_size), check_count(restarts, "restarts"), loss_by_name(loss)
    x_best = x.detach().clone()
    todo = torch.arange(len(x), device=x.device)
    with eval_mode(model):
        for _ in range(restarts):
            xs, ys = x[todo], y[todo]
            x_adv = random_start(xs, eps, norm, bounds, generator) if rand_init else xs.clone()
            x_found, done = xs.clone(), torch.zeros(len(xs), dtype=torch.bool, device=x.device)
            # the points still attacked, compacted only when an eighth of them is done: each step works on
            # whole tensors, with no indexing (``ids``: their rows in xs; ``box``: the L∞ projection)
            ids, cur, cur_x, cur_y = torch.arange(len(xs), device=x.device), x_adv, xs, ys
            box = linf_box(xs, eps, bounds) if norm == "linf" else None
            for _ in range(steps):
                logits, _, grad = input_gradient(model, cur, cur_y, loss_fn, targeted)
                if early_stop:
                    newly = _fooled(logits, cur_y, targeted) & ~done[ids]
                    x_found[ids[newly]], done[ids[newly]] = cur[newly], True
                    keep = ~done[ids]
                    if keep.sum() <= 0.875 * len(ids):  # leave in eighths: few batch shapes, few kernels
                        ids, cur, cur_x, cur_y, grad = ids[keep], cur[keep], cur_x[keep], cur_y[keep], grad[keep]
                        box = None if box is None else (box[0][keep], box[1][keep])
                    if len(ids) == 0:
                        break
                moved = cur + alpha * _direction(grad, norm)
                cur = torch.clamp(moved, *box) if box is not None else project(moved, cur_x, eps, norm, bounds)
            if not early_stop:
                return cur.detach()
            x_adv[ids] = cur
            x_best[todo] = torch.where(done.view(-1, *[1] * (x.dim() - 1)), x_found, x_adv)
            with torch.no_grad():
                todo = todo[~_fooled(logits_of(model, x_best[todo]), y[todo], targeted)]
            if len(todo) == 0:
                break
    return x_best.detach()


def trades_adversary(model: nn.Module, x: torch.Tensor, eps: float, norm: str = "linf", steps: int = 10,
                     step_size: float | None = None, bounds: Range = (0.0, 1.0),
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """TRADES' inner maximisation, Zhang et al. 2019: x′ = argmax_{x′ ∈ B(x, ε)} KL(p(x) ‖ p(x′)) by PGD
    from x + 0.001·N(0, I) (the KL's gradient vanishes at x′ = x)."""
    check_eps(eps)
    check_norm(norm)
    alpha = _step_size(eps, steps, step_size)
    with eval_mode(model), torch.no_grad():
        target = F.log_softmax(logits_of(model, x), 1)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    x_adv = project(x + 0.001 * noise, x, eps, norm, bounds)

    def kl(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits, 1), target, log_target=True, reduction="none").sum(1)

    with eval_mode(model):
        for _ in range(steps):
            _, _, grad = input_gradient(model, x_adv, target, kl)
            x_adv = project(x_adv + alpha * _direction(grad, norm), x, eps, norm, bounds)
    return x_adv.detach()


# ----------------------------------------------------------------------------- APGD
def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations w_j at which APGD may halve its step (Croce & Hein 2020, §3.2):
    p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), w_j = ⌈p_j · steps⌉."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    w = (math.ceil(round(q * steps, 9)) for q in p[1:])  # round: 0.57 must not become 0.5700000000000001
    return sorted({j for j in w if j <= steps})


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf", steps: int = 100,
         loss: str = "ce", restarts: int = 1, rho: float = 0.75, momentum: float = 0.75, targeted: bool = False,
         bounds: Range = (0.0, 1.0), generator: torch.Generator | None = None) -> torch.Tensor:
    """Auto-PGD, Croce & Hein 2020, Algorithm 1: PGD with momentum and a step size that adapts itself.

        z = Π(xᵏ + ηᵏ · dir(∇L(xᵏ))),   xᵏ⁺¹ = Π(xᵏ + α(z − xᵏ) + (1 − α)(xᵏ − xᵏ⁻¹)),   α = ``momentum``

    starting from η = 2ε. At each checkpoint w_j (:func:`apgd_checkpoints`) the step of a point is halved,
    and the point restarts from its best iterate, if the loss rose in fewer than ρ·(w_j − w_{j−1}) of the
    steps since the last checkpoint, or if the step was not halved then and the best loss has not grown
    since. Returns, per point, the first x′ that fools the model, else the highest-loss iterate.
    """
    y = _check_attack(model, x, y, eps, norm, bounds)
    steps, restarts, loss_fn = check_count(steps, "steps"), check_count(restarts, "restarts"), loss_by_name(loss)
    rho, momentum = check_fraction(rho, "rho"), check_fraction(momentum, "momentum")
    checkpoints = apgd_checkpoints(steps)
    x_out = x.detach().clone()
    todo = torch.arange(len(x), device=x.device)
    with eval_mode(model):
        for _ in range(restarts):
            x_out[todo] = _apgd_run(model, x[todo], y[todo], eps, norm, steps, loss_fn, checkpoints, rho, momentum,
                                    targeted, bounds, generator)
            with torch.no_grad():
                todo = todo[~_fooled(logits_of(model, x_out[todo]), y[todo], targeted)]
            if len(todo) == 0:
                break
    return x_out


def _apgd_run(model, x, y, eps, norm, steps, loss_fn, checkpoints, rho, momentum, targeted, bounds, generator):
    shape = (-1, *[1] * (x.dim() - 1))
    x_adv = random_start(x, eps, norm, bounds, generator)
    logits, value, grad = input_gradient(model, x_adv, y, loss_fn, targeted)
    fooled = _fooled(logits, y, targeted)
    x_found = torch.where(fooled.view(shape), x_adv, x)
    x_best, best, grad_best = x_adv.clone(), value.clone(), grad.clone()
    eta = torch.full((len(x),), 2.0 * eps, device=x.device).view(shape)
    x_prev, value_prev = x_adv.clone(), value.clone()
    rises = torch.zeros(len(x), device=x.device)
    best_at_checkpoint, halved_at_checkpoint = best.clone(), torch.ones(len(x), dtype=torch.bool, device=x.device)
    last = 0
    for k in range(steps):
        z = project(x_adv + eta * _direction(grad, norm), x, eps, norm, bounds)
        a = momentum if k > 0 else 1.0
        x_next = project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x, eps, norm, bounds)
        x_prev, x_adv = x_adv, x_next
        logits, value, grad = input_gradient(model, x_adv, y, loss_fn, targeted)
        newly = _fooled(logits, y, targeted) & ~fooled
        x_found[newly], fooled = x_adv[newly], fooled | newly
        rises += (value > value_prev).float()
        value_prev = value
        better = value > best
        x_best[better], best[better], grad_best[better] = x_adv[better], value[better], grad[better]
        if k + 1 in checkpoints:
            halve = (rises < rho * (k + 1 - last)) | (~halved_at_checkpoint & (best <= best_at_checkpoint))
            eta[halve] /= 2
            x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
            halved_at_checkpoint, best_at_checkpoint = halve, best.clone()
            rises.zero_()
            last = k + 1
    return torch.where(fooled.view(shape), x_found, x_best).detach()


# ----------------------------------------------------------------------------- Square (black box)
def square_p(p_init: float, step: int, steps: int) -> float:
    """The Square attack's schedule for the fraction of pixels changed, halved at fixed points of a
    10,000-query budget rescaled to ``steps`` (Andriushchenko et al. 2020)."""
    t = int(step / steps * 10_000)
    halvings = sum(t > b for b in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2**halvings


@torch.no_grad()
def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 1000, p_init: float = 0.8,
           bounds: Range = (0.0, 1.0), generator: torch.Generator | None = None) -> torch.Tensor:
    """Square attack under L∞, Andriushchenko et al. 2020 ("Square Attack: a query-efficient black-box
    adversarial attack via random search"): score-based, it uses only the logits, never a gradient.

    Starts from vertical stripes of ±ε; each step draws, for every point still classified correctly, a
    random square window of side ≈ √(p · H·W) and sets it to ±ε per channel; the change is kept where it
    lowers the margin z_y − max_{i≠y} z_i. Inputs of shape (N, D) are treated as (N, 1, 1, D) rows.
    """
    y = _check_attack(model, x, y, eps, "linf", bounds)
    steps, p_init = check_count(steps, "steps"), check_fraction(p_init, "p_init")
    with eval_mode(model):
        x4 = x.reshape(len(x), 1, 1, -1) if x.dim() == 2 else x
        if x4.dim() != 4:
            raise SafetylabError(f"square expects inputs (N, C, H, W) or (N, D), got {tuple(x.shape)}")
        n, c, h, w = x4.shape

        def margins(xa: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return margin(logits_of(model, xa.reshape(len(idx), *x.shape[1:])), y[idx])

        signs = torch.randint(0, 2, (n, c, 1, w), generator=generator).to(x.device) * 2 - 1
        x_best = project(x4 + eps * signs, x4, eps, "linf", bounds)
        best = margins(x_best, torch.arange(n, device=x.device))
        for step in range(steps):
            idx = torch.nonzero(best > 0)[:, 0]
            if len(idx) == 0:
                break
            p = square_p(p_init, step, steps)
            side = max(1, min(round(math.sqrt(p * h * w)), max(h, w) - 1)) if h > 1 else max(1, round(p * w))
            sh, sw = min(side, h), min(side, w)
            top = torch.randint(0, h - sh + 1, (len(idx),), generator=generator).to(x.device)
            left = torch.randint(0, w - sw + 1, (len(idx),), generator=generator).to(x.device)
            rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
            in_rows = (rows >= top[:, None]) & (rows < top[:, None] + sh)
            in_cols = (cols >= left[:, None]) & (cols < left[:, None] + sw)
            window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (n', 1, h, w)
            value = eps * (torch.randint(0, 2, (len(idx), c, 1, 1), generator=generator).to(x.device) * 2 - 1)
            candidate = project(torch.where(window, x4[idx] + value, x_best[idx]), x4[idx], eps, "linf", bounds)
            new = margins(candidate, idx)
            better = new < best[idx]
            x_best[idx[better]], best[idx[better]] = candidate[better], new[better]
    return x_best.reshape(x.shape).detach()
