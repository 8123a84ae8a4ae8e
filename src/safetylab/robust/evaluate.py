"""Robustness evaluation the way AutoAttack users rely on it: an ensemble of diverse attacks, each run
only on the points every earlier attack failed on, with sanity checks for gradient masking.

Croce & Hein 2020 ("Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks") run APGD-CE, APGD-DLR (targeted), FAB and Square; the default ensemble here is
APGD-CE, APGD-DLR and Square (the black-box attack catches defences whose gradients mislead). A point
counts as robust only if it is classified correctly and no attack run on it found an adversarial input,
so adding an attack can only lower robust accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.core.tensors import (
    Data,
    Range,
    check_count,
    check_eps,
    check_eval,
    check_labels,
    check_range,
    classes_of,
    gather,
    logits_of,
    model_device,
)
from safetylab.robust.attacks import apgd, check_norm, fgsm, input_gradient, pgd, square

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]


def attack_by_name(name: str, norm: str = "linf", steps: int = 100, square_queries: int = 1000,
                   bounds: Range = (0.0, 1.0), seed: int = 0) -> Attack:
    """``fgsm``, ``pgd`` (20 steps), ``pgd-restarts`` (3×), ``apgd-ce``, ``apgd-dlr`` or ``square`` as a
    function (model, x, y, ε) -> x′, seeded so that a run repeats."""
    check_norm(norm)
    steps, square_queries = check_count(steps, "steps"), check_count(square_queries, "square_queries")
    generator = torch.Generator().manual_seed(seed)
    attacks: dict[str, Attack] = {
        "fgsm": partial(fgsm, norm=norm, bounds=bounds),
        "pgd": partial(pgd, norm=norm, steps=20, bounds=bounds, generator=generator),
        "pgd-restarts": partial(pgd, norm=norm, steps=20, restarts=3, bounds=bounds, generator=generator),
        "apgd-ce": partial(apgd, norm=norm, steps=steps, loss="ce", bounds=bounds, generator=generator),
        "apgd-dlr": partial(apgd, norm=norm, steps=steps, loss="dlr", bounds=bounds, generator=generator),
        "square": partial(square, steps=square_queries, bounds=bounds, generator=generator),
    }
    if name not in attacks:
        raise SafetylabError(f"attack must be one of {', '.join(attacks)}, got {name!r}")
    if name == "square" and norm != "linf":
        raise SafetylabError("the square attack here is L∞ only; use norm='linf' or leave it out of the ensemble")
    return attacks[name]


ENSEMBLE = ("apgd-ce", "apgd-dlr", "square")
WHITE_BOX = {"fgsm", "pgd", "pgd-restarts", "apgd-ce", "apgd-dlr"}


@dataclass
class RobustnessResult:
    """Clean and robust accuracy at one ε; ``by_attack`` is the robust accuracy after each attack in
    turn (cumulative, so non-increasing); ``robust`` marks the points no attack broke."""

    eps: float
    norm: str
    clean_accuracy: float
    robust_accuracy: float
    by_attack: dict[str, float]
    robust: torch.Tensor
    x_adv: torch.Tensor
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"eps": self.eps, "norm": self.norm, "clean_accuracy": self.clean_accuracy,
                "robust_accuracy": self.robust_accuracy, "by_attack": self.by_attack, "warnings": self.warnings}


def gradient_masking(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tol: float = 1e-5) -> list[str]:
    """Signs that gradient-based attacks would be misled (Athalye et al. 2018, "Obfuscated gradients give a
    false sense of security"), each returned as a sentence; an empty list means none was seen.

    - *randomised*: two forward passes on the same inputs give different logits (a stochastic defence:
      evaluate it with expectation over transformation, not one gradient);
    - *no gradient*: the output does not depend differentiably on the input (it detaches, rounds or
      quantises), or the gradient is zero for most points (shattered gradients);
    - *non-finite gradient*: NaN or infinite input gradients.
    """
    y = check_labels(y, classes_of(model, x), len(x)).to(x.device)
    signs = []
    with torch.no_grad():
        first, second = logits_of(model, x), logits_of(model, x)
    if not torch.allclose(first, second, atol=tol, rtol=tol):
        signs.append("randomised model: two forward passes on the same inputs differ, so a single gradient "
                     "misleads; robust accuracy from gradient attacks is not trustworthy")
    try:
        _, _, grad = input_gradient(model, x, y)
    except SafetylabError:
        return signs + ["no gradient: the output does not depend differentiably on the input; only the "
                        "black-box attack can test this model"]
    if not torch.isfinite(grad).all():
        signs.append("non-finite input gradients (NaN or inf): gradient attacks cannot be trusted")
    elif (grad.flatten(1).abs().amax(1) == 0).float().mean() > 0.5:
        signs.append("zero input gradient on most points (shattered or saturated gradients): gradient attacks "
                     "cannot be trusted; the black-box result is the one to read")
    return signs


def evaluate_robustness(model: nn.Module, data: Data, eps: float, norm: str = "linf",
                        attacks: Sequence[str | tuple[str, Attack]] = ENSEMBLE, bounds: Range = (0.0, 1.0),
                        batch_size: int = 512, seed: int = 0, steps: int = 100,
                        square_queries: int = 1000) -> RobustnessResult:
    """Clean and robust accuracy of an eval-mode ``model`` under the attacks in order, each run only on
    the points still robust (correct, and unbroken by every earlier attack).

    ``attacks`` are names (:func:`attack_by_name`) or ``(name, fn)`` pairs. Each adversarial input is
    checked to lie in the ε-ball and the input range. Warnings flag gradient masking
    (:func:`gradient_masking`) and a black-box attack breaking points that the white-box attacks before it
    could not — the classic sign of masked gradients.
    """
    check_eval(model)
    check_eps(eps)
    check_norm(norm)
    batch_size = check_count(batch_size, "batch_size")
    named = [_named_attack(a, i, norm, steps, square_queries, bounds, seed) for i, a in enumerate(attacks)]
    if not named:
        raise SafetylabError("attacks is empty: robust accuracy without an attack would read as clean accuracy")
    x, y = gather(data)
    classes = classes_of(model, x, "data inputs")
    check_range(x, bounds, "data inputs")
    device = model_device(model)
    x, y = x.to(device), check_labels(y, classes, len(x), "data labels").to(device)
    warnings = gradient_masking(model, x[:batch_size], y[:batch_size])
    if any(w.startswith("no gradient") for w in warnings):
        named = [(n, a) for n, a in named if n not in WHITE_BOX]
    with torch.no_grad():
        robust = torch.cat([logits_of(model, xb).argmax(1) == yb for xb, yb in
                            zip(x.split(batch_size), y.split(batch_size))])
    clean = robust.double().mean().item()
    x_adv, by_attack, white_box_ran = x.clone(), {}, False
    for name, attack in named:
        broken = 0
        for idx in torch.nonzero(robust)[:, 0].split(batch_size):
            if len(idx) == 0:
                break
            x_try = attack(model, x[idx], y[idx], eps)
            _check_threat_model(x_try, x[idx], eps, norm, bounds, name)
            with torch.no_grad():
                fooled = logits_of(model, x_try).argmax(1) != y[idx]
            robust[idx[fooled]] = False
            x_adv[idx[fooled]] = x_try[fooled]
            broken += int(fooled.sum())
        by_attack[name] = robust.double().mean().item()
        if name not in WHITE_BOX and white_box_ran and broken > max(1, 0.01 * len(x)):
            warnings.append(f"{name} (black box) broke {broken} points that the gradient attacks before it "
                            "could not: gradients may be masked")
        white_box_ran |= name in WHITE_BOX
    return RobustnessResult(eps, norm, clean, robust.double().mean().item(), by_attack, robust.cpu(), x_adv.cpu(),
                            warnings)


def _named_attack(attack: str | tuple[str, Attack], i: int, norm: str, steps: int, square_queries: int,
                  bounds: Range, seed: int) -> tuple[str, Attack]:
    """Entry ``i`` of ``attacks`` as a (name, function) pair."""
    if isinstance(attack, str):
        return attack, attack_by_name(attack, norm, steps, square_queries, bounds, seed)
    if not (isinstance(attack, tuple) and len(attack) == 2 and isinstance(attack[0], str) and callable(attack[1])):
        raise SafetylabError(f"attacks[{i}] must be an attack name or a (name, function) pair, got {attack!r}")
    return attack


def _check_threat_model(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, bounds: Range,
                        name: str) -> None:
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        got = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
        raise SafetylabError(f"attack {name} must return x′ of shape {tuple(x.shape)} (that of its inputs), got {got}")
    dist = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    if dist.max() > eps * (1 + 1e-5) + 1e-6 or x_adv.min() < bounds[0] or x_adv.max() > bounds[1]:
        raise SafetylabError(f"attack {name} left the threat model: distance {dist.max().item():.4g} > eps {eps} "
                             f"or values outside {bounds}")


def robustness_curve(model: nn.Module, data: Data, eps_values: Sequence[float], norm: str = "linf",
                     single: Sequence[str] = ("fgsm", "pgd"), ensemble: Sequence[str] = ENSEMBLE,
                     bounds: Range = (0.0, 1.0), seed: int = 0, steps: int = 100,
                     square_queries: int = 1000) -> list[dict]:
    """Robust accuracy against ε: each attack in ``single`` on its own, and the ensemble of all of them
    (``single`` first, then ``ensemble``, each on the survivors), so the ensemble column is the per-point
    worst case and never above any single attack. A single stronger attack (later in ``single``) that
    reports higher robust accuracy than a weaker one is flagged in ``warnings``."""
    rows = []
    eps_values = [check_eps(eps, "eps_values") for eps in eps_values]
    for eps in eps_values:
        row: dict = {"eps": eps}
        for name in single:
            result = evaluate_robustness(model, data, eps, norm, [name], bounds, seed=seed, steps=steps,
                                         square_queries=square_queries)
            row["clean"], row[name] = result.clean_accuracy, result.robust_accuracy
        full = evaluate_robustness(model, data, eps, norm, [*single, *ensemble], bounds, seed=seed, steps=steps,
                                   square_queries=square_queries)
        row["ensemble"], row["clean"] = full.robust_accuracy, full.clean_accuracy
        row["warnings"] = list(full.warnings)
        for weaker, stronger in zip(single, single[1:]):
            if row[stronger] > row[weaker] + 1e-9:
                row["warnings"].append(f"{stronger} reports higher robust accuracy ({row[stronger]:.3f}) than "
                                       f"{weaker} ({row[weaker]:.3f}) at eps {eps}: check its steps and step "
                                       "size, or gradient masking")
        rows.append(row)
    return rows
