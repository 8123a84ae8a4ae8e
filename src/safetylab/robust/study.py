"""The robustness study on the built-in digits, as stages of :mod:`safetylab.core.study`.

``safetylab robust attack|calibrate|ood|shift`` run one stage, ``safetylab robust report`` runs them all
(over several seeds with ``--seeds``), and the audit composes :data:`STAGES` with its own config:

- ``attack``: robust accuracy against ε under FGSM, PGD and the AutoAttack-style ensemble, per model;
- ``calibrate``: ECE, NLL and Brier, temperature scaling, MC dropout and the deep ensemble, clean and shifted;
- ``ood``: every OOD detector against held-out digits, corrupted digits and synthetic noise;
- ``shift``: accuracy, calibration and the OOD score under each corruption at severities 1–5;
- ``selective``: risk–coverage and the abstaining classifier.

What the stages share comes through the context, made once per process (``ctx.cached``): the digits,
the model under study (the classifier of ``ctx.inputs["model"]`` when given, else a standard one), the
adversarially trained models, the deep ensemble and the fitted detectors. Trained models are saved under
``RUN/artifacts/models/NAME`` and loaded from there, so a resumed study does not train them again. Each
stage writes its plots under ``RUN/STAGE/``.

Seeds: :func:`~safetylab.core.study.run_stages` seeds each stage (MC dropout draws from that); every
other stream is derived from ``config.seed`` by purpose: the digits split, each model's training
(``"train", NAME``), the ensemble's members (``"ensemble", i``), the attacks, the shifted and OOD sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from safetylab.core.config import require, require_choice
from safetylab.core.io import save_figure
from safetylab.core.seeding import derive_seed
from safetylab.core.study import Context, Section, Stage, Table
from safetylab.core.tensors import is_count, predict_logits
from safetylab.models.classifier import (
    ARCHS,
    ClassifierTrainConfig,
    build_classifier,
    load_classifier,
    save_classifier,
    train_or_load,
)
from safetylab.models.digits import Digits, load_digits
from safetylab.robust.calibration import (
    TemperatureScaled,
    calibration_metrics,
    fit_temperature,
    plot_reliability,
    reliability_bins,
)
from safetylab.robust.evaluate import ENSEMBLE, robustness_curve
from safetylab.robust.ood import DETECTORS, Detector, Uncertainty, ood_metrics
from safetylab.robust.selective import (
    Criterion,
    SelectiveClassifier,
    aurc,
    msp_score,
    plot_risk_coverage,
    risk_coverage,
    threshold_for_coverage,
)
from safetylab.robust.shift import IMAGE_SHIFTS, plot_shift, shift_report, synthetic_ood
from safetylab.robust.training import LOSSES
from safetylab.robust.uncertainty import ensemble_probs, mc_dropout_probs, train_ensemble, uncertainty_split

DETECTOR_NAMES = (*DETECTORS, "ensemble")  # "ensemble": the deep ensemble's mutual information
TRAININGS = ("pgd", "trades")  # the adversarial trainings the study compares with the standard one


def model_name(train: ClassifierTrainConfig) -> str:
    """How tables name the model an adversarial training makes: ``"pgd (eps 0.15)"``."""
    return f"{train.method} (eps {train.eps:g})"


@dataclass(frozen=True)
class RobustStudyConfig:
    """The digits study. ``standard`` trains the model under study (unless one is given); ``adversarial``
    lists the robust trainings compared with it (:func:`with_trainings` sets them by method name)."""

    seed: int = 0
    arch: str = "cnn"
    standard: ClassifierTrainConfig = field(default_factory=lambda: ClassifierTrainConfig(epochs=30))
    adversarial: tuple[ClassifierTrainConfig, ...] = (ClassifierTrainConfig(method="pgd", epochs=30, eps=0.15),)
    eps: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
    attack_steps: int = 100  # APGD iterations
    square_queries: int = 1000
    ensemble_members: int = 5
    mc_samples: int = 20
    detectors: tuple[str, ...] = ("msp", "odin", "energy", "mahalanobis", "knn", "mc-dropout", "ensemble")
    coverage: float = 0.9  # target coverage of the abstaining classifier on validation data
    ood_tpr: float = 0.95  # share of in-distribution validation inputs the OOD criterion lets through

    def __post_init__(self):
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        require_choice(self.arch, "arch", ARCHS)
        require(self.standard.method == "standard", "standard", "a config with method standard",
                self.standard.method)
        require(all(t.method in TRAININGS for t in self.adversarial), "adversarial",
                f"trainings by method {' or '.join(TRAININGS)}", tuple(t.method for t in self.adversarial))
        names = [model_name(t) for t in self.adversarial]
        require(len(set(names)) == len(names), "adversarial", "trainings that differ in method or eps", names)
        require(len(self.eps) > 0 and all(0 <= e < math.inf for e in self.eps), "eps",
                "one or more finite radii >= 0", self.eps)
        for name in ("attack_steps", "square_queries", "ensemble_members", "mc_samples"):
            require(is_count(getattr(self, name)), name, "an integer >= 1", getattr(self, name))
        require(len(self.detectors) > 0 and set(self.detectors) <= set(DETECTOR_NAMES), "detectors",
                f"one or more of {', '.join(DETECTOR_NAMES)}", self.detectors)
        for name in ("coverage", "ood_tpr"):
            require(0 <= getattr(self, name) <= 1, name, "a number in [0, 1]", getattr(self, name))


QUICK = RobustStudyConfig(
    standard=ClassifierTrainConfig(epochs=10),
    adversarial=(ClassifierTrainConfig(method="pgd", epochs=10, eps=0.15, steps=5),),
    eps=(0.0, 0.1, 0.2), attack_steps=20, square_queries=200, ensemble_members=3, mc_samples=10,
)


def study_config(quick: bool = False, seed: int = 0) -> RobustStudyConfig:
    """The full study, or with ``quick`` fewer epochs, radii, steps, queries and members, for ``seed``."""
    return replace(QUICK if quick else RobustStudyConfig(), seed=seed)


def with_trainings(config: RobustStudyConfig, methods: Sequence[str]) -> RobustStudyConfig:
    """``config`` comparing the trainings ``methods`` (some of pgd, trades) with the standard one, each
    with the settings of the config's first adversarial training (epochs, ε, steps), or else PGD's
    defaults at ε 0.15 for as many epochs as the standard training."""
    methods = tuple(methods)
    require(len(methods) > 0 and set(methods) <= set(TRAININGS) and len(set(methods)) == len(methods), "trainings",
            f"one or more of {', '.join(TRAININGS)}", methods)
    template = config.adversarial[0] if config.adversarial else ClassifierTrainConfig(
        method="pgd", epochs=config.standard.epochs, eps=0.15)
    return replace(config, adversarial=tuple(replace(template, method=m) for m in methods))


# ----------------------------------------------------------------------------- what the stages share
def digits(ctx: Context) -> Digits:
    return ctx.cached("digits", lambda: load_digits(ctx.config.seed))


def _train(ctx: Context, name: str, train: ClassifierTrainConfig) -> nn.Module:
    """The model ``name`` saved in the run, or one trained by ``train`` from its own seed and saved."""
    data = digits(ctx)
    spec = {"arch": ctx.config.arch, "num_classes": data.num_classes}
    return train_or_load(ctx.run.artifacts / "models" / name, spec, (data.x_train, data.y_train),
                         replace(train, seed=derive_seed(ctx.config.seed, "train", name)), LOSSES)


def studied(ctx: Context) -> tuple[str, nn.Module]:
    """``(name, model)`` of the model under study: the classifier of ``ctx.inputs["model"]`` (a ``robust
    train`` run) when given, else a standard one trained here."""
    def make() -> tuple[str, nn.Module]:
        given = ctx.inputs.get("model")
        if given is not None:
            return "given model", load_classifier(given)[0]
        return "standard", _train(ctx, "standard", ctx.config.standard)
    return ctx.cached("studied", make)


def models(ctx: Context) -> dict[str, nn.Module]:
    """The model under study first, then one per adversarial training (``artifacts/models/METHOD-eps``)."""
    name, model = studied(ctx)
    return {name: model, **ctx.cached("adversarial", lambda: {
        model_name(t): _train(ctx, f"{t.method}-eps{t.eps:g}", t) for t in ctx.config.adversarial})}


def ensemble(ctx: Context) -> list[nn.Module]:
    """``ensemble_members`` standard models, differing only in their seeds (Lakshminarayanan et al. 2017),
    saved under ``artifacts/models/ensemble/I``."""
    def make() -> list[nn.Module]:
        config, data = ctx.config, digits(ctx)
        directory = ctx.run.artifacts / "models" / "ensemble"
        paths = [directory / str(i) for i in range(config.ensemble_members)]
        if all((p / "model.safetensors").is_file() for p in paths):
            return [load_classifier(p)[0] for p in paths]
        spec = {"arch": config.arch, "num_classes": data.num_classes}
        members = train_ensemble(lambda: build_classifier(spec), (data.x_train, data.y_train),
                                 replace(config.standard, seed=config.seed), config.ensemble_members)
        for member, path in zip(members, paths):
            save_classifier(member, spec, path)
        return members
    return ctx.cached("ensemble", make)


def detectors(ctx: Context) -> dict[str, Detector]:
    """Each detector named in the config, for the model under study, fitted on the training digits."""
    def make() -> dict[str, Detector]:
        config, data, (_, model) = ctx.config, digits(ctx), studied(ctx)
        build = {name: (lambda cls=cls: cls(model)) for name, cls in DETECTORS.items()}
        build |= {"mc-dropout": lambda: Uncertainty(model, samples=config.mc_samples),
                  "ensemble": lambda: Uncertainty(ensemble(ctx))}
        return {name: build[name]().fit((data.x_train, data.y_train)) for name in config.detectors}
    return ctx.cached("detectors", make)


def shifted_test(ctx: Context, severity: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The test digits under every corruption family at ``severity``, with their labels."""
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        data = digits(ctx)
        g = torch.Generator().manual_seed(derive_seed(ctx.config.seed, "shifted test", severity))
        x = torch.cat([shift(data.x_test, severity, g) for shift in IMAGE_SHIFTS.values()])
        return x, data.y_test.repeat(len(IMAGE_SHIFTS))
    return ctx.cached(f"shifted test {severity}", make)


def ood_sets(ctx: Context) -> dict[str, torch.Tensor]:
    """Held-out classes (near-OOD), test digits corrupted at severity 5 (one family per image, in turn), and
    synthetic uniform noise and smooth blobs (far-OOD)."""
    def make() -> dict[str, torch.Tensor]:
        data = digits(ctx)
        g = torch.Generator().manual_seed(derive_seed(ctx.config.seed, "ood sets"))
        n = len(data.x_test)
        families = list(IMAGE_SHIFTS.values())
        corrupted = torch.cat([families[i % len(families)](data.x_test[i:i + 1], 5, g) for i in range(n)])
        far = torch.cat([synthetic_ood(n // 2, data.x_test.shape[1:], "uniform", g),
                         synthetic_ood(n - n // 2, data.x_test.shape[1:], "blobs", g)])
        return {f"held-out digits {'+'.join(map(str, data.ood_classes))}": data.x_ood,
                "corrupted (severity 5)": corrupted, "synthetic noise": far}
    return ctx.cached("ood sets", make)


def _plot_path(ctx: Context, stage: str, name: str) -> Path:
    return ctx.stage_dir(stage) / name


# ----------------------------------------------------------------------------- attacks
def attack_stage(ctx: Context) -> Section:
    """Robust accuracy against ε under FGSM, PGD and the AutoAttack-style ensemble, per model."""
    config, data = ctx.config, digits(ctx)
    rows, warnings = [], []
    for name, model in models(ctx).items():
        curve = robustness_curve(model, (data.x_test, data.y_test), config.eps,
                                 seed=derive_seed(config.seed, "attack"), steps=config.attack_steps,
                                 square_queries=config.square_queries)
        for point in curve:
            rows.append({"model": name, **{k: v for k, v in point.items() if k != "warnings"}})
            warnings += [f"{name}: {w}" for w in point["warnings"]]
    path = _plot_robustness(rows, _plot_path(ctx, "attack", "robust_accuracy.png"))
    columns = ["model", "eps", "clean", "fgsm", "pgd", "ensemble"]
    at = _nearest(config.eps, max(t.eps for t in config.adversarial) if config.adversarial else 0.1)
    summary = "; ".join(f"{r['model']}: clean {r['clean']:.3f}, robust {r['ensemble']:.3f} at eps {at:g}"
                        for r in rows if r["eps"] == at)
    return Section(
        title="Adversarial robustness (L∞)", summary=summary,
        tables=[Table(f"Accuracy under attack on {len(data.y_test)} test digits; ensemble = FGSM, PGD, "
                      f"{', '.join(ENSEMBLE)} each on the survivors",
                      columns, [[r[c] for c in columns] for r in rows])],
        plots=[ctx.run.relative(path)], data={"rows": rows, "warnings": warnings})


def _plot_robustness(rows: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for i, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        mine = [r for r in rows if r["model"] == name]
        eps = [r["eps"] for r in mine]
        for attack, style in (("fgsm", ":"), ("pgd", "--"), ("ensemble", "-")):
            ax.plot(eps, [r[attack] for r in mine], style, marker="o", color=f"C{i}", label=f"{name}: {attack}")
    ax.set(xlabel="ε (L∞, inputs in [0, 1])", ylabel="accuracy", ylim=(0, 1), title="Robust accuracy against ε")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- calibration
def calibrate_stage(ctx: Context) -> Section:
    """ECE, NLL and Brier of the model, temperature-scaled (T fitted on validation), MC dropout and the deep
    ensemble, on the test digits and on the test digits shifted (every corruption family at severity 3)."""
    config, data, (_, model), members = ctx.config, digits(ctx), studied(ctx), ensemble(ctx)
    temperature = fit_temperature(predict_logits(model, data.x_val), data.y_val)
    shifted, y_shifted = shifted_test(ctx)
    predictors = {
        "model": lambda x: predict_logits(model, x).softmax(1),
        "temperature-scaled": lambda x: predict_logits(TemperatureScaled(model, temperature).eval(), x).softmax(1),
        f"MC dropout ({config.mc_samples})": lambda x: mc_dropout_probs(model, x, config.mc_samples).mean(0),
        f"deep ensemble ({len(members)})": lambda x: ensemble_probs(members, x).mean(0),
    }
    clean = {name: predict(data.x_test) for name, predict in predictors.items()}
    moved = {name: predict(shifted) for name, predict in predictors.items()}
    metrics = {name: {**calibration_metrics(clean[name], data.y_test),
                      **{f"{k} (shifted)": v for k, v in calibration_metrics(moved[name], y_shifted).items()}}
               for name in predictors}
    bins = {name: reliability_bins(moved[name], y_shifted) for name in ("model", "temperature-scaled")}
    path = plot_reliability(bins, _plot_path(ctx, "calibrate", "reliability.png"),
                            "Reliability on shifted test digits (severity 3)")
    columns = ["predictor", "accuracy", "ece", "nll", "brier", "accuracy (shifted)", "ece (shifted)", "nll (shifted)"]
    before, after = metrics["model"], metrics["temperature-scaled"]
    split = {}
    for name, x in {"test digits": data.x_test, **ood_sets(ctx)}.items():
        total, aleatoric, epistemic = uncertainty_split(ensemble_probs(members, x))
        split[name] = [total.mean().item(), aleatoric.mean().item(), epistemic.mean().item()]
    return Section(
        title="Uncertainty and calibration",
        summary=f"temperature {temperature:.2f}: ECE {before['ece']:.3f} → {after['ece']:.3f} on test digits, "
                f"{before['ece (shifted)']:.3f} → {after['ece (shifted)']:.3f} under shift",
        tables=[Table("Calibration on the test digits and on them shifted (every corruption at severity 3); ECE "
                      "with 15 equal-width bins", columns,
                      [[name, *(m[c] for c in columns[1:])] for name, m in metrics.items()]),
                Table(f"Mean predictive entropy of the deep ensemble ({len(members)}), split into aleatoric "
                      "(expected entropy) and epistemic (mutual information), in nats",
                      ["inputs", "total", "aleatoric", "epistemic"],
                      [[name, *values] for name, values in split.items()])],
        plots=[ctx.run.relative(path)],
        data={"temperature": temperature, "metrics": metrics, "uncertainty_split": split})


# ----------------------------------------------------------------------------- OOD detection
def ood_stage(ctx: Context) -> Section:
    """AUROC, AUPR-In, AUPR-Out and FPR@95%TPR of every detector, test digits against each OOD set."""
    data, sets = digits(ctx), ood_sets(ctx)
    rows, scores = [], {}
    for name, detector in detectors(ctx).items():
        scores[name] = {"test digits": detector.score(data.x_test)}
        for set_name, x in sets.items():
            scores[name][set_name] = detector.score(x)
            rows.append({"detector": name, "ood": set_name,
                         **ood_metrics(scores[name]["test digits"], scores[name][set_name])})
    path = _plot_histograms(scores, _plot_path(ctx, "ood", "ood_scores.png"))
    columns = ["detector", "ood", "auroc", "aupr_in", "aupr_out", "fpr95"]
    best = {s: max((r for r in rows if r["ood"] == s), key=lambda r: r["auroc"]) for s in sets}
    return Section(
        title="Out-of-distribution detection (higher score = more anomalous)",
        summary="; ".join(f"{s}: best {r['detector']} AUROC {r['auroc']:.3f}" for s, r in best.items()),
        tables=[Table("Test digits (in-distribution) against each OOD set; FPR95 = share of OOD inputs accepted "
                      "when 95% of in-distribution inputs are", columns, [[r[c] for c in columns] for r in rows])],
        plots=[ctx.run.relative(path)], data={"rows": rows})


def _plot_histograms(scores: dict[str, dict[str, torch.Tensor]], path: Path) -> Path:
    cols = 3
    rows = math.ceil(len(scores) / cols)
    fig = Figure(figsize=(4 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, by_set) in zip(axes, scores.items()):
        values = torch.cat(list(by_set.values())).double()
        lo, hi = values.quantile(0.01).item(), values.quantile(0.99).item()
        log = lo > 0 and hi > 20 * lo  # heavy-tailed positive scores (distances): log-spaced bins
        bins = torch.logspace(math.log10(lo), math.log10(hi), 31) if log else torch.linspace(lo, hi + 1e-12, 31)
        for set_name, s in by_set.items():
            ax.hist(s.double().clamp(lo, hi).numpy(), bins=bins.numpy(), weights=torch.full((len(s),), 1 / len(s)),
                    alpha=0.5, label=set_name)
        ax.set(title=name, xlabel="score (higher = more anomalous)", ylabel="share of the set",
               xscale="log" if log else "linear")
    for ax in axes[len(scores):]:
        ax.set_axis_off()
    axes[0].legend(fontsize="x-small")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- distribution shift
def shift_stage(ctx: Context) -> Section:
    """Accuracy, calibration and the OOD score (Mahalanobis when studied, else the first detector) under
    each corruption family at severities 1–5."""
    config, data, (_, model), found = ctx.config, digits(ctx), studied(ctx), detectors(ctx)
    detector_name = "mahalanobis" if "mahalanobis" in found else next(iter(found))
    rows = shift_report(model, data.x_test, data.y_test, detector=found[detector_name],
                        seed=derive_seed(config.seed, "shift"))
    paths = [plot_shift(rows, _plot_path(ctx, "shift", "shift_accuracy.png")),
             plot_shift(rows, _plot_path(ctx, "shift", "shift_ece.png"), "ece")]
    columns = ["shift", "severity", "accuracy", "ece", "nll", "brier", "ood_score", "ood_auroc"]
    worst = min(rows, key=lambda r: r["accuracy"])
    return Section(
        title="Distribution shift",
        summary=f"clean accuracy {rows[0]['accuracy']:.3f}; worst {worst['shift']} at severity "
                f"{worst['severity']}: {worst['accuracy']:.3f}",
        tables=[Table(f"Test digits under each corruption; OOD score from {detector_name}", columns,
                      [[r[c] for c in columns] for r in rows])],
        plots=[ctx.run.relative(p) for p in paths], data={"rows": rows})


# ----------------------------------------------------------------------------- selective prediction
def selective_stage(ctx: Context, ood_detector: str = "mahalanobis") -> Section:
    """Risk–coverage of each doubt score, and the abstaining classifier: an MSP threshold for the target
    coverage and an OOD threshold that lets ``ood_tpr`` of validation digits through, both chosen on
    validation data, applied to test digits, shifted test digits and held-out digits; abstentions carry
    their reasons."""
    config, data, (_, model), found = ctx.config, digits(ctx), studied(ctx), detectors(ctx)
    sets = {"test digits": (data.x_test, data.y_test), "shifted (severity 3)": shifted_test(ctx)}
    correct = {name: predict_logits(model, x).argmax(1) == y for name, (x, y) in sets.items()}
    curves, aurcs = {}, []
    for name, detector in found.items():
        scores = {set_name: detector.score(x) for set_name, (x, _) in sets.items()}
        curves[name] = risk_coverage(scores["shifted (severity 3)"], correct["shifted (severity 3)"])
        aurcs.append([name, *(aurc(scores[n], correct[n]) for n in sets)])
    path = plot_risk_coverage(curves, _plot_path(ctx, "selective", "risk_coverage.png"),
                              "Risk–coverage on shifted test digits (severity 3)")
    msp = msp_score(model)
    criteria = [Criterion("msp", msp, threshold_for_coverage(msp(data.x_val), config.coverage))]
    if ood_detector in found:
        d = found[ood_detector]
        criteria.append(Criterion(ood_detector, d.score, threshold_for_coverage(d.score(data.x_val), config.ood_tpr)))
    selective = SelectiveClassifier(model, criteria)
    rows, examples = [], []
    for name, (x, y) in {**sets, "held-out digits (never right)": (data.x_ood, None)}.items():
        decided = selective.predict(x)
        fired = {c.name: sum(a.criterion == c.name for a in decided.abstentions()) / len(x) for c in criteria}
        accepted = ~decided.abstained
        risk = None if y is None or not accepted.any() else (decided.labels[accepted] != y[accepted]).double().mean()
        rows.append([name, decided.coverage, None if risk is None else risk.item(),
                     None if y is None else 1 - correct[name].double().mean().item(), *fired.values()])
        examples += [r for r in decided.reasons if r][:2]
    test, shifted = rows[0], rows[1]
    return Section(
        title="Selective prediction (abstain and escalate)",
        summary=f"error {test[3]:.3f} → {test[2]:.3f} on test digits at coverage {test[1]:.3f}, "
                f"{shifted[3]:.3f} → {shifted[2]:.3f} on shifted ones at {shifted[1]:.3f}; "
                f"{1 - rows[2][1]:.3f} of held-out digits escalated",
        tables=[Table("AURC of each doubt score (lower is better)", ["score", *(f"aurc ({n})" for n in sets)], aurcs),
                Table(f"The abstaining classifier: MSP at {config.coverage:.0%} validation coverage and "
                      f"{ood_detector} letting {config.ood_tpr:.0%} of validation digits through; 'fired' = share "
                      "of inputs on which a criterion fired",
                      ["inputs", "coverage", "selective risk", "risk without abstaining",
                       *(f"{c.name} fired" for c in criteria)], rows)],
        plots=[ctx.run.relative(path)], data={"example_reasons": examples})


def _nearest(values, target: float) -> float:
    return min(values, key=lambda v: abs(v - target))


STAGES = (
    Stage("attack", "robust accuracy against ε under FGSM, PGD and an AutoAttack-style ensemble", attack_stage),
    Stage("calibrate", "calibration, temperature scaling, MC dropout and a deep ensemble", calibrate_stage),
    Stage("ood", "OOD detectors against held-out, corrupted and synthetic inputs", ood_stage),
    Stage("shift", "accuracy, calibration and OOD score under each corruption", shift_stage),
    Stage("selective", "risk–coverage and the abstaining classifier", selective_stage),
)
