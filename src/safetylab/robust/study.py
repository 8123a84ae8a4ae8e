"""The robustness study on the built-in digits: one function per question, each returning a report section.

``safetylab robust …`` runs one section, ``safetylab robust report`` and the audit's ``robustness`` stage
run them all. A section is a plain dict — ``title``, ``summary``, ``tables`` (each ``{"title", "columns",
"rows"}``), ``plots`` (paths relative to the run directory) and ``data`` (numbers for later readers) —
the shape of the audit report's sections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_text, save_figure
from safetylab.core.runs import RunDir
from safetylab.core.seeding import seed_everything
from safetylab.robust.calibration import (
    TemperatureScaled,
    calibration_metrics,
    fit_temperature,
    plot_reliability,
    reliability_bins,
)
from safetylab.robust.checks import is_count, predict_logits
from safetylab.robust.data import ARCHS, Digits, build_classifier, load_classifier, load_digits, save_classifier
from safetylab.robust.evaluate import ENSEMBLE, robustness_curve
from safetylab.robust.ood import DETECTORS, Uncertainty, ood_metrics
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
from safetylab.robust.training import RobustTrainConfig, train_classifier
from safetylab.robust.uncertainty import ensemble_probs, mc_dropout_probs, train_ensemble, uncertainty_split

Section = dict[str, Any]
SECTIONS = ("attack", "calibrate", "ood", "shift", "selective")
DETECTOR_NAMES = (*DETECTORS, "ensemble")  # "ensemble": the deep ensemble's mutual information


@dataclass(frozen=True)
class RobustSuiteConfig:
    """The digits study. ``adversarial`` lists the robust trainings compared with the standard one."""

    seed: int = 0
    arch: str = "cnn"
    standard: RobustTrainConfig = field(default_factory=lambda: RobustTrainConfig(epochs=30))
    adversarial: tuple[RobustTrainConfig, ...] = (RobustTrainConfig(method="pgd", epochs=30, eps=0.15),)
    eps: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
    attack_steps: int = 100  # APGD iterations
    square_queries: int = 1000
    ensemble_members: int = 5
    mc_samples: int = 20
    detectors: tuple[str, ...] = ("msp", "odin", "energy", "mahalanobis", "knn", "mc-dropout", "ensemble")
    coverage: float = 0.9  # target coverage of the abstaining classifier on validation data
    ood_tpr: float = 0.95  # share of in-distribution validation inputs the OOD criterion lets through

    def __post_init__(self):
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        require_choice(self.arch, "arch", ARCHS)
        require(len(self.eps) > 0 and all(0 <= e < math.inf for e in self.eps), "eps",
                "one or more finite radii >= 0", self.eps)
        for name in ("attack_steps", "square_queries", "ensemble_members", "mc_samples"):
            require(is_count(getattr(self, name)), name, "an integer >= 1", getattr(self, name))
        require(len(self.detectors) > 0 and set(self.detectors) <= set(DETECTOR_NAMES), "detectors",
                f"one or more of {', '.join(DETECTOR_NAMES)}", self.detectors)
        for name in ("coverage", "ood_tpr"):
            require(0 <= getattr(self, name) <= 1, name, "a number in [0, 1]", getattr(self, name))


QUICK = RobustSuiteConfig(
    standard=RobustTrainConfig(epochs=10),
    adversarial=(RobustTrainConfig(method="pgd", epochs=10, eps=0.15, steps=5),),
    eps=(0.0, 0.1, 0.2), attack_steps=20, square_queries=200, ensemble_members=3, mc_samples=10,
)


def suite_config(quick: bool = False, seed: int = 0) -> RobustSuiteConfig:
    """The full study, or with ``quick`` fewer epochs, radii, steps, queries and members, for ``seed``."""
    return replace(QUICK if quick else RobustSuiteConfig(), seed=seed)


# ----------------------------------------------------------------------------- models
def train_models(config: RobustSuiteConfig, digits: Digits, run: RunDir, model: Path | None = None,
                 ) -> dict[str, nn.Module]:
    """The model under study first — the classifier saved in ``model`` (a ``robust train`` run) when given,
    else a standard one — then each adversarially trained one, saved under ``artifacts/models/NAME``; a
    finished model is loaded instead of retrained, so an interrupted study resumes."""
    models = {"given model": load_classifier(model)[0]} if model is not None else {
        "standard": train_or_load(replace(config.standard, seed=config.seed), config.arch, digits,
                                  run.artifacts / "models" / "standard")}
    for train in config.adversarial:
        models[f"{train.method} (eps {train.eps:g})"] = train_or_load(
            replace(train, seed=config.seed), config.arch, digits, run.artifacts / "models" / train.method)
    return models


def train_or_load(train: RobustTrainConfig, arch: str, digits: Digits, directory: Path,
                  run: RunDir | None = None) -> nn.Module:
    """The classifier saved in ``directory``, or a new one trained by ``train`` and saved there."""
    if (directory / "model.safetensors").is_file():
        return load_classifier(directory)[0]
    spec = {"arch": arch, "num_classes": digits.num_classes}
    torch.manual_seed(train.seed)
    model = build_classifier(spec)
    train_classifier(model, (digits.x_train, digits.y_train), train, run=run)
    save_classifier(model, spec, directory)
    return model.eval()


def deep_ensemble(config: RobustSuiteConfig, digits: Digits, run: RunDir) -> list[nn.Module]:
    """``ensemble_members`` standard models, differing only in their seed (Lakshminarayanan et al. 2017)."""
    directory = run.artifacts / "models" / "ensemble"
    if (directory / "0" / "model.safetensors").is_file():
        return [load_classifier(directory / str(i))[0] for i in range(config.ensemble_members)]
    spec = {"arch": config.arch, "num_classes": digits.num_classes}
    members = train_ensemble(lambda: build_classifier(spec), (digits.x_train, digits.y_train),
                             replace(config.standard, seed=config.seed + 1000), config.ensemble_members)
    for i, member in enumerate(members):
        save_classifier(member, spec, directory / str(i))
    return members


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict_logits(model, x).argmax(1) == y).double().mean().item()


# ----------------------------------------------------------------------------- attacks
def attack_section(models: dict[str, nn.Module], digits: Digits, config: RobustSuiteConfig, run: RunDir) -> Section:
    """Robust accuracy against ε under FGSM, PGD and the AutoAttack-style ensemble, per model."""
    rows, warnings = [], []
    for name, model in models.items():
        curve = robustness_curve(model, (digits.x_test, digits.y_test), config.eps, seed=config.seed,
                                 steps=config.attack_steps, square_queries=config.square_queries)
        for point in curve:
            rows.append({"model": name, **{k: v for k, v in point.items() if k != "warnings"}})
            warnings += [f"{name}: {w}" for w in point["warnings"]]
    path = _plot_robustness(rows, run.plots / "robust_accuracy.png")
    columns = ["model", "eps", "clean", "fgsm", "pgd", "ensemble"]
    at = _nearest(config.eps, max(t.eps for t in config.adversarial) if config.adversarial else 0.1)
    summary = "; ".join(f"{r['model']}: clean {r['clean']:.3f}, robust {r['ensemble']:.3f} at eps {at:g}"
                        for r in rows if r["eps"] == at)
    return {"title": "Adversarial robustness (L∞)", "summary": summary,
            "tables": [{"title": f"Accuracy under attack on {len(digits.y_test)} test digits; ensemble = FGSM, "
                                 f"PGD, {', '.join(ENSEMBLE)} each on the survivors",
                        "columns": columns, "rows": [[r[c] for c in columns] for r in rows]}],
            "plots": [run.relative(path)], "data": {"rows": rows, "warnings": warnings}}


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
def calibration_section(model: nn.Module, ensemble: list[nn.Module], digits: Digits, config: RobustSuiteConfig,
                        run: RunDir) -> Section:
    """ECE, NLL and Brier of the model, temperature-scaled (T fitted on validation), MC dropout and the deep
    ensemble, on the test digits and on the test digits shifted (every corruption family at severity 3)."""
    temperature = fit_temperature(predict_logits(model, digits.x_val), digits.y_val)
    shifted, y_shifted = shifted_test(digits, config.seed)
    predictors = {
        "model": lambda x: predict_logits(model, x).softmax(1),
        "temperature-scaled": lambda x: predict_logits(TemperatureScaled(model, temperature).eval(), x).softmax(1),
        f"MC dropout ({config.mc_samples})": lambda x: mc_dropout_probs(model, x, config.mc_samples).mean(0),
        f"deep ensemble ({len(ensemble)})": lambda x: ensemble_probs(ensemble, x).mean(0),
    }
    clean = {name: predict(digits.x_test) for name, predict in predictors.items()}
    moved = {name: predict(shifted) for name, predict in predictors.items()}
    metrics = {name: {**calibration_metrics(clean[name], digits.y_test),
                      **{f"{k} (shifted)": v for k, v in calibration_metrics(moved[name], y_shifted).items()}}
               for name in predictors}
    bins = {name: reliability_bins(moved[name], y_shifted) for name in ("model", "temperature-scaled")}
    path = plot_reliability(bins, run.plots / "reliability.png", "Reliability on shifted test digits (severity 3)")
    columns = ["predictor", "accuracy", "ece", "nll", "brier", "accuracy (shifted)", "ece (shifted)", "nll (shifted)"]
    before, after = metrics["model"], metrics["temperature-scaled"]
    split = {}
    for name, x in {"test digits": digits.x_test, **ood_sets(digits, config.seed)}.items():
        total, aleatoric, epistemic = uncertainty_split(ensemble_probs(ensemble, x))
        split[name] = [total.mean().item(), aleatoric.mean().item(), epistemic.mean().item()]
    return {"title": "Uncertainty and calibration",
            "summary": f"temperature {temperature:.2f}: ECE {before['ece']:.3f} → {after['ece']:.3f} on test digits, "
                       f"{before['ece (shifted)']:.3f} → {after['ece (shifted)']:.3f} under shift",
            "tables": [{"title": "Calibration on the test digits and on them shifted (every corruption at severity "
                                 "3); ECE with 15 equal-width bins", "columns": columns,
                        "rows": [[name, *(m[c] for c in columns[1:])] for name, m in metrics.items()]},
                       {"title": f"Mean predictive entropy of the deep ensemble ({len(ensemble)}), split into "
                                 "aleatoric (expected entropy) and epistemic (mutual information), in nats",
                        "columns": ["inputs", "total", "aleatoric", "epistemic"],
                        "rows": [[name, *values] for name, values in split.items()]}],
            "plots": [run.relative(path)], "data": {"temperature": temperature, "metrics": metrics,
                                                 "uncertainty_split": split}}


# ----------------------------------------------------------------------------- OOD detection
def ood_sets(digits: Digits, seed: int) -> dict[str, torch.Tensor]:
    """Held-out classes (near-OOD), test digits corrupted at severity 5 (one family per image, in turn), and
    synthetic uniform noise and smooth blobs (far-OOD)."""
    g = torch.Generator().manual_seed(seed)
    n = len(digits.x_test)
    families = list(IMAGE_SHIFTS.values())
    corrupted = torch.cat([families[i % len(families)](digits.x_test[i:i + 1], 5, g) for i in range(n)])
    far = torch.cat([synthetic_ood(n // 2, digits.x_test.shape[1:], "uniform", g),
                     synthetic_ood(n - n // 2, digits.x_test.shape[1:], "blobs", g)])
    return {f"held-out digits {'+'.join(map(str, digits.ood_classes))}": digits.x_ood, "corrupted (severity 5)":
            corrupted, "synthetic noise": far}


def build_detectors(model: nn.Module, ensemble: list[nn.Module], digits: Digits, config: RobustSuiteConfig) -> dict:
    """Each detector named in the config, fitted on the training digits."""
    detectors = {}
    for name in config.detectors:
        if name == "ensemble":
            detector = Uncertainty(ensemble)
        elif name == "mc-dropout":
            detector = Uncertainty(model, samples=config.mc_samples)
        elif name in DETECTORS:
            detector = DETECTORS[name](model)
        else:
            raise SafetylabError(f"detector {name!r}: expected one of {', '.join(DETECTOR_NAMES)}")
        detectors[name] = detector.fit((digits.x_train, digits.y_train))
    return detectors


def ood_section(detectors: dict, digits: Digits, config: RobustSuiteConfig, run: RunDir) -> Section:
    """AUROC, AUPR-In, AUPR-Out and FPR@95%TPR of every detector, test digits against each OOD set."""
    sets = ood_sets(digits, config.seed)
    rows, scores = [], {}
    for name, detector in detectors.items():
        scores[name] = {"test digits": detector.score(digits.x_test)}
        for set_name, x in sets.items():
            scores[name][set_name] = detector.score(x)
            rows.append({"detector": name, "ood": set_name,
                         **ood_metrics(scores[name]["test digits"], scores[name][set_name])})
    path = _plot_histograms(scores, run.plots / "ood_scores.png")
    columns = ["detector", "ood", "auroc", "aupr_in", "aupr_out", "fpr95"]
    best = {s: max((r for r in rows if r["ood"] == s), key=lambda r: r["auroc"]) for s in sets}
    return {"title": "Out-of-distribution detection (higher score = more anomalous)",
            "summary": "; ".join(f"{s}: best {r['detector']} AUROC {r['auroc']:.3f}" for s, r in best.items()),
            "tables": [{"title": "Test digits (in-distribution) against each OOD set; FPR95 = share of OOD inputs "
                                 "accepted when 95% of in-distribution inputs are",
                        "columns": columns, "rows": [[r[c] for c in columns] for r in rows]}],
            "plots": [run.relative(path)], "data": {"rows": rows}}


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
def shift_section(model: nn.Module, detector, digits: Digits, config: RobustSuiteConfig, run: RunDir,
                  detector_name: str = "") -> Section:
    """Accuracy, calibration and the OOD score under each corruption family at severities 1–5."""
    rows = shift_report(model, digits.x_test, digits.y_test, detector=detector, seed=config.seed)
    paths = [plot_shift(rows, run.plots / "shift_accuracy.png"), plot_shift(rows, run.plots / "shift_ece.png", "ece")]
    columns = ["shift", "severity", "accuracy", "ece", "nll", "brier"]
    columns += ["ood_score", "ood_auroc"] if detector else []
    worst = min(rows, key=lambda r: r["accuracy"])
    return {"title": "Distribution shift",
            "summary": f"clean accuracy {rows[0]['accuracy']:.3f}; worst {worst['shift']} at severity "
                       f"{worst['severity']}: {worst['accuracy']:.3f}",
            "tables": [{"title": "Test digits under each corruption" + (f"; OOD score from {detector_name}"
                                                                        if detector else ""),
                        "columns": columns, "rows": [[r[c] for c in columns] for r in rows]}],
            "plots": [run.relative(p) for p in paths], "data": {"rows": rows}}


# ----------------------------------------------------------------------------- selective prediction
def selective_section(model: nn.Module, detectors: dict, digits: Digits, config: RobustSuiteConfig,
                      run: RunDir, ood_detector: str = "mahalanobis") -> Section:
    """Risk–coverage of each doubt score, and the abstaining classifier: an MSP threshold for the target
    coverage and an OOD threshold that lets ``ood_tpr`` of validation digits through, both chosen on
    validation data, applied to test digits, shifted test digits and held-out digits; abstentions carry
    their reasons."""
    sets = {"test digits": (digits.x_test, digits.y_test), "shifted (severity 3)": shifted_test(digits, config.seed)}
    correct = {name: predict_logits(model, x).argmax(1) == y for name, (x, y) in sets.items()}
    curves, aurcs = {}, []
    for name, detector in detectors.items():
        scores = {set_name: detector.score(x) for set_name, (x, _) in sets.items()}
        curves[name] = risk_coverage(scores["shifted (severity 3)"], correct["shifted (severity 3)"])
        aurcs.append([name, *(aurc(scores[n], correct[n]) for n in sets)])
    path = run.relative(plot_risk_coverage(curves, run.plots / "risk_coverage.png",
                                           "Risk–coverage on shifted test digits (severity 3)"))
    msp = msp_score(model)
    criteria = [Criterion("msp", msp, threshold_for_coverage(msp(digits.x_val), config.coverage))]
    if ood_detector in detectors:
        d = detectors[ood_detector]
        criteria.append(Criterion(ood_detector, d.score, threshold_for_coverage(d.score(digits.x_val), config.ood_tpr)))
    selective = SelectiveClassifier(model, criteria)
    rows, examples = [], []
    for name, (x, y) in {**sets, "held-out digits (never right)": (digits.x_ood, None)}.items():
        decided = selective.predict(x)
        fired = {c.name: sum(a.criterion == c.name for a in decided.abstentions()) / len(x) for c in criteria}
        accepted = ~decided.abstained
        risk = None if y is None or not accepted.any() else (decided.labels[accepted] != y[accepted]).double().mean()
        rows.append([name, decided.coverage, None if risk is None else risk.item(),
                     None if y is None else 1 - correct[name].double().mean().item(), *fired.values()])
        examples += [r for r in decided.reasons if r][:2]
    test, shifted = rows[0], rows[1]
    return {"title": "Selective prediction (abstain and escalate)",
            "summary": f"error {test[3]:.3f} → {test[2]:.3f} on test digits at coverage {test[1]:.3f}, "
                       f"{shifted[3]:.3f} → {shifted[2]:.3f} on shifted ones at {shifted[1]:.3f}; "
                       f"{1 - rows[2][1]:.3f} of held-out digits escalated",
            "tables": [{"title": "AURC of each doubt score (lower is better)",
                        "columns": ["score", *(f"aurc ({n})" for n in sets)], "rows": aurcs},
                       {"title": f"The abstaining classifier: MSP at {config.coverage:.0%} validation coverage and "
                                 f"{ood_detector} letting {config.ood_tpr:.0%} of validation digits through; "
                                 "'fired' = share of inputs on which a criterion fired",
                        "columns": ["inputs", "coverage", "selective risk", "risk without abstaining",
                                    *(f"{c.name} fired" for c in criteria)], "rows": rows}],
            "plots": [path], "data": {"example_reasons": examples}}


def shifted_test(digits: Digits, seed: int, severity: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The test digits under every corruption family at ``severity``, with their labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([shift(digits.x_test, severity, g) for shift in IMAGE_SHIFTS.values()])
    return x, digits.y_test.repeat(len(IMAGE_SHIFTS))


# ----------------------------------------------------------------------------- the whole study
def run_suite(config: RobustSuiteConfig, run: RunDir, sections: tuple[str, ...] = SECTIONS,
              model: Path | None = None, log=print) -> dict[str, Section]:
    """Train what the sections need (the standard model comes from ``model`` when given), run them, and
    write ``sections.json``."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SafetylabError(f"sections: unknown {sorted(unknown)}; expected some of {', '.join(SECTIONS)}")
    seed_everything(config.seed)  # MC dropout and the shifts draw from torch's generator: a run repeats
    digits = load_digits(config.seed)
    models = train_models(config, digits, run, model)
    model = next(iter(models.values()))
    log(f"digits: {len(digits.y_train)} train, {len(digits.y_val)} val, {len(digits.y_test)} test, "
        f"{len(digits.x_ood)} held-out; " + ", ".join(f"{n} clean accuracy "
                                                     f"{accuracy(m, digits.x_test, digits.y_test):.3f}"
                                                     for n, m in models.items()))
    out: dict[str, Section] = {}
    needs_ensemble = {"calibrate", "ood", "shift", "selective"} & set(sections)
    ensemble = deep_ensemble(config, digits, run) if needs_ensemble else []
    detectors = build_detectors(model, ensemble, digits, config) if {"ood", "shift", "selective"} & set(sections) \
        else {}
    if "attack" in sections:
        out["attack"] = attack_section(models, digits, config, run)
    if "calibrate" in sections:
        out["calibrate"] = calibration_section(model, ensemble, digits, config, run)
    if "ood" in sections:
        out["ood"] = ood_section(detectors, digits, config, run)
    if "shift" in sections:
        name = "mahalanobis" if "mahalanobis" in detectors else next(iter(detectors))
        out["shift"] = shift_section(model, detectors[name], digits, config, run, name)
    if "selective" in sections:
        out["selective"] = selective_section(model, detectors, digits, config, run)
    for name, section in out.items():
        log(f"{name}: {section['summary']}")
    run.write_json("sections.json", out)
    return out


def tables_markdown(sections: dict[str, Section], run: RunDir) -> Path:
    """Every section's tables as Markdown in ``tables.md`` (written atomically), plots linked."""
    lines = []
    for section in sections.values():
        lines += [f"## {section['title']}", "", section["summary"], ""]
        for table in section["tables"]:
            lines += [f"**{table['title']}**", "", "| " + " | ".join(table["columns"]) + " |",
                      "|" + "---|" * len(table["columns"])]
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table["rows"]]
            lines.append("")
        lines += [f"![{Path(p).stem}]({p})" for p in section["plots"]] + [""]
    path = run.path / "tables.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _cell(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _nearest(values, target: float) -> float:
    return min(values, key=lambda v: abs(v - target))
