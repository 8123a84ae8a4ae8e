"""The verification study on the built-in digits, as stages of :mod:`safetylab.core.study`: what each
method can certify, for networks trained four ways, and randomized smoothing's certificates.

``safetylab verify bounds|certify|smooth`` run one stage, ``safetylab verify report`` runs them all (over
several seeds with ``--seeds``), and the audit composes :data:`STAGES` with its own config:

- ``bounds``: the width of the margins' bounds and the time per method, at one ε;
- ``certify``: certified accuracy against ε under IBP, CROWN, α-CROWN and exact verification, beside
  PGD's robust accuracy (an upper bound on what any certificate can reach), for a normally trained, a
  PGD-trained, an IBP-trained and a CROWN-IBP-trained network;
- ``smooth``: randomized smoothing's certified accuracy against the L2 radius for several σ, each with a
  base classifier trained under that noise, beside CROWN's deterministic L2 certificates.

The network is the digits MLP (64 → 64 → 64 → 8), small enough for exact verification. The networks are
trained by the one loop of :mod:`safetylab.models.classifier` with the losses of :data:`LOSSES` (PGD's
and TRADES' from :mod:`safetylab.robust`, the certified and noise losses from :mod:`.training`), each from
its own seed ``derive_seed(seed, "train", NAME)``, saved under ``RUN/artifacts/models/NAME`` and loaded
from there when the study resumes. A classifier given by the user arrives as ``ctx.inputs["model"]``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from safetylab.core.config import require, require_choice
from safetylab.core.io import save_figure
from safetylab.core.runs import RunDir
from safetylab.core.seeding import derive_seed
from safetylab.core.study import Context, Section, Stage, Table
from safetylab.core.tensors import is_count, predict_logits
from safetylab.models.classifier import ClassifierTrainConfig, Loss, accuracy, load_classifier, train_or_load
from safetylab.models.digits import Digits, load_digits
from safetylab.robust import pgd, pgd_loss, trades_loss
from safetylab.verify.bounds import compute_bounds
from safetylab.verify.exact import verify_exact
from safetylab.verify.regions import l2_ball, linf_ball, margin_spec
from safetylab.verify.smoothing import SmoothedClassifier, certified_accuracy_at
from safetylab.verify.training import LOSSES as CERTIFIED_LOSSES
from safetylab.verify.training import certified_config

BOUND_METHODS = ("ibp", "crown", "alpha-crown")
TRAININGS = ("standard", "pgd", "ibp", "crown-ibp")
METHODS = ("standard", "pgd", "trades", "ibp", "crown-ibp", "noise")  # what `safetylab verify train` trains
LOSSES: dict[str, Loss] = {**CERTIFIED_LOSSES, "pgd": pgd_loss, "trades": trades_loss}


@dataclass(frozen=True)
class VerifyStudyConfig:
    """The digits verification study. ``trainings`` names the networks compared, each trained by its own
    config (``standard``, ``pgd``, ``ibp``, ``crown_ibp``), whose method must be its name."""

    seed: int = 0
    hidden: int = 64
    trainings: tuple[str, ...] = TRAININGS
    standard: ClassifierTrainConfig = field(default_factory=lambda: ClassifierTrainConfig(epochs=30))
    pgd: ClassifierTrainConfig = field(default_factory=lambda: ClassifierTrainConfig(method="pgd", eps=0.1, epochs=30))
    ibp: ClassifierTrainConfig = field(default_factory=lambda: certified_config(
        "ibp", eps=0.1, epochs=40, warmup_epochs=2, ramp_epochs=20))
    crown_ibp: ClassifierTrainConfig = field(default_factory=lambda: certified_config(
        "crown-ibp", eps=0.1, epochs=40, warmup_epochs=2, ramp_epochs=20))
    eps: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15)
    examples: int = 100  # test digits certified at each ε by every method
    exact_time_limit: float = 5.0  # seconds per digit for exact verification ("unknown" beyond)
    attack_steps: int = 50
    alpha_iterations: int = 20
    bounds_eps: float = 0.02
    sigmas: tuple[float, ...] = (0.12, 0.25, 0.5)
    smooth_epochs: int = 30  # of each base classifier, trained under its σ's noise
    smooth_examples: int = 100
    smooth_n0: int = 100
    smooth_n: int = 10_000
    smooth_alpha: float = 0.001
    radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)

    def __post_init__(self):
        require(len(self.trainings) > 0 and set(self.trainings) <= set(TRAININGS)
                and len(set(self.trainings)) == len(self.trainings), "trainings",
                f"one or more of {', '.join(TRAININGS)}, each once", self.trainings)
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        for name in TRAININGS:
            method = self.training(name).method
            require(method == name, name.replace("-", "_"), f"a config with method {name}", method)
        for name in ("hidden", "examples", "attack_steps", "alpha_iterations", "smooth_epochs", "smooth_examples",
                     "smooth_n0", "smooth_n"):
            require(is_count(getattr(self, name)), name, "an integer >= 1", getattr(self, name))
        for name in ("eps", "radii"):
            require(_radii(getattr(self, name)), name, "one or more finite numbers >= 0", getattr(self, name))
        require(_radii(self.sigmas) and min(self.sigmas) > 0, "sigmas", "one or more finite noise levels > 0",
                self.sigmas)
        require(0 <= self.bounds_eps < math.inf, "bounds_eps", "a finite number >= 0", self.bounds_eps)
        require(0 < self.exact_time_limit < math.inf, "exact_time_limit", "a finite number of seconds > 0",
                self.exact_time_limit)
        require(0 < self.smooth_alpha < 1, "smooth_alpha", "a probability in (0, 1)", self.smooth_alpha)

    def training(self, name: str) -> ClassifierTrainConfig:
        """The config that trains the network ``name``."""
        return {"standard": self.standard, "pgd": self.pgd, "ibp": self.ibp, "crown-ibp": self.crown_ibp}[name]


def _radii(values: tuple[float, ...]) -> bool:
    return len(values) > 0 and all(0 <= v < math.inf for v in values)


QUICK = VerifyStudyConfig(
    standard=ClassifierTrainConfig(epochs=10),
    pgd=ClassifierTrainConfig(method="pgd", eps=0.1, epochs=10, steps=5),
    ibp=certified_config("ibp", eps=0.1, epochs=12, warmup_epochs=1, ramp_epochs=6),
    crown_ibp=certified_config("crown-ibp", eps=0.1, epochs=12, warmup_epochs=1, ramp_epochs=6),
    eps=(0.0, 0.02, 0.05, 0.1), examples=50, exact_time_limit=2.0, attack_steps=20,
    alpha_iterations=10, sigmas=(0.25, 0.5), smooth_epochs=10, smooth_examples=50, smooth_n=2_000,
    radii=(0.0, 0.25, 0.5, 0.75, 1.0),
)


def study_config(quick: bool = False, seed: int = 0) -> VerifyStudyConfig:
    """The full study, or with ``quick`` fewer epochs, radii, examples and samples, for ``seed``."""
    return replace(QUICK if quick else VerifyStudyConfig(), seed=seed)


# ----------------------------------------------------------------------------- networks
def network_config(method: str, eps: float = 0.1, sigma: float = 0.25, epochs: int = 40,
                   seed: int = 0) -> ClassifierTrainConfig:
    """How ``safetylab verify train`` trains one network by ``method`` (one of :data:`METHODS`): IBP and
    CROWN-IBP with :func:`~.training.certified_config`'s schedule, ε ramped over half the epochs."""
    require_choice(method, "method", METHODS)
    if method in ("ibp", "crown-ibp"):
        return certified_config(method, eps=eps, epochs=epochs, ramp_epochs=epochs // 2, seed=seed)
    return ClassifierTrainConfig(method=method, eps=eps, sigma=sigma, epochs=epochs, seed=seed)


def train_network(directory: str | Path, train: ClassifierTrainConfig, hidden: int, digits: Digits,
                  run: RunDir | None = None) -> nn.Module:
    """The MLP saved in ``directory``, or a new one trained by ``train`` (from ``train.seed``) and saved there."""
    spec = {"arch": "mlp", "num_classes": digits.num_classes, "hidden": hidden}
    return train_or_load(directory, spec, (digits.x_train, digits.y_train), train, LOSSES, run=run)


def digits(ctx: Context) -> Digits:
    return ctx.cached("digits", lambda: load_digits(ctx.config.seed))


def network(ctx: Context, name: str, train: ClassifierTrainConfig) -> nn.Module:
    """The network ``name`` of this run, trained from ``derive_seed(seed, "train", name)`` or loaded."""
    return ctx.cached(f"network {name}", lambda: train_network(
        ctx.run.artifacts / "models" / name, replace(train, seed=derive_seed(ctx.config.seed, "train", name)),
        ctx.config.hidden, digits(ctx)))


def networks(ctx: Context) -> dict[str, nn.Module]:
    """The classifier of ``ctx.inputs["model"]`` (a ``verify train`` or ``robust train`` run) alone when
    given, else one network per training of the config."""
    given = ctx.inputs.get("model")
    if given is not None:
        return {"given model": ctx.cached("given model", lambda: load_classifier(given)[0])}
    return {name: network(ctx, name, ctx.config.training(name)) for name in ctx.config.trainings}


# ----------------------------------------------------------------------------- stages
def bounds_stage(ctx: Context) -> Section:
    """Mean width of the margins' bounds, share verified and seconds per method, at ``bounds_eps``."""
    config, data, found_networks = ctx.config, digits(ctx), networks(ctx)
    x, y = data.x_test[:config.examples], data.y_test[:config.examples]
    region, spec = linf_ball(x, config.bounds_eps), margin_spec(y, data.num_classes)
    rows = []
    for name, model in found_networks.items():
        for method in BOUND_METHODS:
            start = time.perf_counter()
            found = compute_bounds(model, region, spec, method, **_options(method, config))
            seconds = time.perf_counter() - start
            rows.append({"model": name, "method": method, "width": (found.upper - found.lower).mean().item(),
                         "lower": found.lower.mean().item(), "verified": found.verified().float().mean().item(),
                         "seconds": seconds})
    columns = ["model", "method", "width", "lower", "verified", "seconds"]
    best = {name: min((r for r in rows if r["model"] == name), key=lambda r: r["width"])["method"]
            for name in found_networks}
    return Section(
        title=f"Bounds on the margins at eps {config.bounds_eps:g}",
        summary="; ".join(f"{name}: tightest {method}" for name, method in best.items()),
        tables=[Table(f"Margins' bounds over {len(x)} test digits, L∞ eps {config.bounds_eps:g}: mean width "
                      "(upper − lower), mean lower bound, share verified, seconds",
                      columns, [[r[c] for c in columns] for r in rows])],
        data={"rows": rows})


def certify_stage(ctx: Context) -> Section:
    """Certified accuracy against ε per model and method, PGD's robust accuracy beside it; exact
    verification after PGD (an attack that succeeds decides a digit without a program)."""
    config, data = ctx.config, digits(ctx)
    x, y = data.x_test[:config.examples], data.y_test[:config.examples]
    spec = margin_spec(y, data.num_classes)
    rows, seconds = [], {}
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "certify", "pgd"))
    for name, model in networks(ctx).items():
        clean = accuracy(model, x, y)
        for eps in config.eps:
            region = linf_ball(x, eps)
            row: dict[str, Any] = {"model": name, "eps": eps, "clean": clean}
            x_adv = pgd(model, x, y, eps, steps=config.attack_steps, generator=generator) if eps > 0 else x
            attacked = predict_logits(model, x_adv).argmax(1) != y
            row["pgd"] = 1.0 - attacked.float().mean().item()
            for method in BOUND_METHODS:
                start = time.perf_counter()
                row[method] = compute_bounds(model, region, spec, method, **_options(method, config)) \
                    .verified().float().mean().item()
                seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - start
            start = time.perf_counter()
            row["exact"], row["exact unknown"] = _exact(model, x, y, eps, attacked, config.exact_time_limit,
                                                        data.num_classes)
            seconds["exact"] = seconds.get("exact", 0.0) + time.perf_counter() - start
            rows.append(row)
    columns = ["model", "eps", "clean", "pgd", *BOUND_METHODS, "exact", "exact unknown"]
    path = _plot_certified(rows, ctx.stage_dir("certify") / "certified_accuracy.png")
    at = min(config.eps, key=lambda e: abs(e - config.ibp.eps))  # the radius the certified networks train for
    summary = "; ".join(f"{r['model']}: PGD {r['pgd']:.2f}, IBP {r['ibp']:.2f}, CROWN {r['crown']:.2f}, "
                        f"α-CROWN {r['alpha-crown']:.2f}, exact {r['exact']:.2f}" for r in rows if r["eps"] == at)
    return Section(
        title="Certified accuracy against ε (L∞)", summary=f"at eps {at:g}: {summary}",
        tables=[Table(f"Share of {len(x)} test digits classified correctly on the whole L∞ ball, by method (exact: "
                      f"a MILP, at most {config.exact_time_limit:g} s a digit; 'exact unknown': the time limit "
                      "reached); pgd: robust accuracy under PGD, an upper bound",
                      columns, [[r[c] for c in columns] for r in rows])],
        plots=[ctx.run.relative(path)], data={"rows": rows, "seconds": seconds})


def _exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, attacked: torch.Tensor,
           time_limit: float, classes: int) -> tuple[float, float]:
    """Exact verification's verified and unknown shares, the digits PGD broke counted as falsified
    without a program."""
    open_ = (~attacked).nonzero().squeeze(1)
    if len(open_) == 0:
        return 0.0, 0.0
    results = verify_exact(model, linf_ball(x[open_], eps), margin_spec(y[open_], classes), time_limit=time_limit)
    return (sum(r.status == "verified" for r in results) / len(x), sum(r.status == "unknown" for r in results) / len(x))


def smooth_stage(ctx: Context) -> Section:
    """Randomized smoothing's certified accuracy against the L2 radius, one base MLP trained under each σ's
    noise; and CROWN's deterministic L2 certificates of the standard network (or the given one) at the
    same radii."""
    config, data = ctx.config, digits(ctx)
    x, y = data.x_test[:config.smooth_examples], data.y_test[:config.smooth_examples]
    curves: dict[str, list[float]] = {}
    abstained = {}
    for sigma in config.sigmas:
        noisy = ClassifierTrainConfig(method="noise", sigma=sigma, epochs=config.smooth_epochs)
        smoothed = SmoothedClassifier(network(ctx, f"noise-{sigma:g}", noisy), sigma)
        found = smoothed.certify_batch(x, y, config.smooth_n0, config.smooth_n, config.smooth_alpha,
                                       torch.Generator().manual_seed(derive_seed(config.seed, "smoothing", sigma)))
        curves[f"smoothing σ={sigma:g}"] = certified_accuracy_at(found.radius, found.correct, config.radii).tolist()
        abstained[f"{sigma:g}"] = (found.radius == 0).float().mean().item()
    given = ctx.inputs.get("model") is not None
    standard = next(iter(networks(ctx).values())) if given else network(ctx, "standard", config.standard)
    spec = margin_spec(y, data.num_classes)
    name = "CROWN (given network)" if given else "CROWN (standard network)"
    curves[name] = [compute_bounds(standard, l2_ball(x, r), spec, "crown").verified().float().mean().item()
                    for r in config.radii]
    rows = [[name, r, value] for name, values in curves.items() for r, value in zip(config.radii, values)]
    path = _plot_smoothing(curves, config.radii, ctx.stage_dir("smooth") / "smoothing.png")
    best = [(r, max(curves, key=lambda n: curves[n][i]), i) for i, r in enumerate(config.radii) if r > 0]
    return Section(
        title="Randomized smoothing: certified accuracy against the L2 radius",
        summary="; ".join(f"r {r:g}: best {name} {curves[name][i]:.2f}" for r, name, i in best),
        tables=[Table(f"Share of {len(x)} test digits certified correct at L2 radius ≥ r (smoothing: n0 "
                      f"{config.smooth_n0}, n {config.smooth_n}, α {config.smooth_alpha:g})",
                      ["certificate", "radius", "certified accuracy"], rows)],
        plots=[ctx.run.relative(path)], data={"curves": curves, "abstained": abstained})


def _options(method: str, config: VerifyStudyConfig) -> dict:
    return {"iterations": config.alpha_iterations} if method == "alpha-crown" else {}


def _plot_certified(rows: list[dict], path: Path) -> Path:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = Figure(figsize=(3.2 * len(models), 3.2))
    axes = fig.subplots(1, len(models), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, models):
        mine = [r for r in rows if r["model"] == name]
        eps = [r["eps"] for r in mine]
        ax.plot(eps, [r["pgd"] for r in mine], "k--", label="PGD (upper bound)")
        for i, method in enumerate((*BOUND_METHODS, "exact")):
            ax.plot(eps, [r[method] for r in mine], "o-", color=f"C{i}", label=method, markersize=3)
        ax.set(title=name, xlabel="L∞ eps")
    axes[0].set_ylabel("certified accuracy")
    axes[-1].legend(fontsize="x-small")
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_smoothing(curves: dict[str, list[float]], radii: tuple[float, ...], path: Path) -> Path:
    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    for name, values in curves.items():
        ax.plot(radii, values, "--" if name.startswith("CROWN") else "-", label=name)
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", title="Certified accuracy against the L2 radius")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    return save_figure(fig, path)


STAGES = (
    Stage("bounds", "bounds on the margins by IBP, CROWN and α-CROWN at one ε", bounds_stage),
    Stage("certify", "certified accuracy against ε: IBP, CROWN, α-CROWN and exact, beside PGD", certify_stage),
    Stage("smooth", "randomized smoothing's certified accuracy against the L2 radius", smooth_stage),
)
