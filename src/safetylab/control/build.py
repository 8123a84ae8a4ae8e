"""Build a guard for a model of the world: train its classifiers on world data, fit its OOD gate on the served
model, calibrate every threshold on held-out validation data to a target false-positive rate, and write the
guard file with the rates it measured.

- **rules**: a length limit, invisible characters stripped, instruction-override phrases escalated; on the
  output, anything shaped like a credential redacted;
- **input classifier**: harmful intent (plain and jailbroken harmful requests against every benign kind, benign
  requests under the same wrappers included, so a wrapper alone does not look harmful);
- **OOD gate** (with a model): the served model's final state on the prompt against the training prompts';
- **monitor** (with a model and a monitor directory): a :mod:`safetylab.interp` probe or SAE-latent monitor;
- **output classifier**: harmful compliance, on (prompt, response), labelled by the gold judge on responses
  of every style.

Validation prompts are held out by request core (every wrapping of a held-out request held out with it), so
a calibrated rate is a rate on requests the classifier never saw in any form.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safetylab.control.classifier import TextClassifier, TextClassifierConfig, fit_text_classifier
from safetylab.control.config import write_guard
from safetylab.core.config import require
from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_text
from safetylab.core.seeding import derive_seed
from safetylab.world.requests import Request
from safetylab.world.styles import STYLES
from safetylab.world.world import World

OVERRIDE_RULES = ({"pattern": r"\bignore (all |any |your |the )*(previous |prior )?(rules|instructions|guidelines)",
                   "decision": "escalate", "reason": "instruction override"},
                  {"pattern": r"\b(developer|jailbreak|dan) mode\b", "decision": "escalate",
                   "reason": "mode-switch jailbreak"})
SECRET_RULES = ({"pattern": r"\b(sk|sl|pk|rk)-[A-Za-z0-9_\-]{16,}", "decision": "modify", "reason": "API key"},
                {"pattern": r"\bAKIA[0-9A-Z]{16}\b", "decision": "modify", "reason": "AWS access key"},
                {"pattern": r"-----BEGIN [A-Z ]*PRIVATE KEY-----", "decision": "modify", "reason": "private key"})
TRIPWIRES = ({"kind": "repeated_attempts", "count": 5, "window_s": 60.0, "action": "lock_key"},
             {"kind": "output_anomaly", "window": 200, "max_rate": 0.25, "action": "halt"})


@dataclass(frozen=True)
class GuardBuildConfig:
    """``n`` prompts per group for the input classifier (train split), a ``validation`` share of request cores
    held out for calibration; thresholds at ``fpr_block`` and ``fpr_escalate`` on validation benign prompts
    (the OOD gate's escalation at ``fpr_ood`` on validation prompts of the training distribution); ``responses``
    exchanges for the output classifier; ``ood_k`` neighbours."""

    n: int = 240
    validation: float = 0.25
    fpr_block: float = 0.01
    fpr_escalate: float = 0.05
    fpr_ood: float = 0.01
    responses: int = 3000
    ood: bool = True
    ood_k: int = 10
    max_chars: int = 2000
    seed: int = 0
    classifier: TextClassifierConfig = field(default_factory=TextClassifierConfig)

    def __post_init__(self):
        for name in ("n", "responses", "ood_k", "max_chars"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1",
                    getattr(self, name))
        require(0 < self.validation < 1, "validation", "a share in (0, 1)", self.validation)
        for name in ("fpr_block", "fpr_escalate", "fpr_ood"):
            require(0 < getattr(self, name) < 1, name, "a rate in (0, 1)", getattr(self, name))
        require(self.fpr_block <= self.fpr_escalate, "fpr_block", f"at most fpr_escalate ({self.fpr_escalate})",
                self.fpr_block)
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)


def rates(positives: np.ndarray, negatives: np.ndarray, threshold: float) -> dict[str, float]:
    """TPR and FPR of firing on ``score > threshold``."""
    return {"tpr": float((positives > threshold).mean()), "fpr": float((negatives > threshold).mean())}


def calibrated(scores_pos: np.ndarray, scores_neg: np.ndarray, fpr_escalate: float, fpr_block: float) -> dict[str, Any]:
    """Escalate and block thresholds at the target FPRs on the negatives, and the rates measured at each."""
    from safetylab.interp.monitors import threshold_at_fpr

    negatives = torch.as_tensor(scores_neg, dtype=torch.float64)
    escalate, block = threshold_at_fpr(negatives, fpr_escalate), threshold_at_fpr(negatives, fpr_block)
    return {"escalate": escalate, "block": block,
            "calibration": {"fpr_escalate": fpr_escalate, "fpr_block": fpr_block,
                            "escalate": rates(scores_pos, scores_neg, escalate),
                            "block": rates(scores_pos, scores_neg, block),
                            "n_positives": int(len(scores_pos)), "n_negatives": int(len(scores_neg))}}


def input_data(world: World, config: GuardBuildConfig):
    """``(fit, held)`` harmful-intent concepts of the train split, held out by request core."""
    from safetylab.interp.concepts import ConceptConfig, harmful_intent
    from safetylab.interp.monitors import split_by_core

    train = harmful_intent(world, "train", ConceptConfig(n=config.n, seed=config.seed))
    return split_by_core(train, config.validation, config.seed)


def exchanges(world: World, n: int, split: str, seed: int) -> list[tuple[Request, str, int]]:
    """``n`` (request, response, harmful-compliance label) triples: every kind and the jailbroken harmful
    requests in turn, each answered in a random style of its kind (harmful ones complying half the time), the
    label from the gold judge."""
    from safetylab.world.requests import KINDS

    rng = random.Random(derive_seed(seed, "guard", "exchanges", split))
    pool = [r for kind in KINDS for r in world.requests(kind, split, n // len(KINDS) + 1, seed)]
    pool += world.red_team(max(1, n // 12), split, seed)
    rng.shuffle(pool)
    out = []
    for request in pool[:n]:
        styles = STYLES[request.kind]
        style = ("harmful_compliance" if request.kind == "harmful" and rng.random() < 0.5 else rng.choice(styles))
        response = world.respond(request, style, rng)
        out.append((request, response, int(world.judge.score(request, response).behaviour == "harmful_compliance")))
    return out


def held_out_by_core(items: list, share: float, seed: int, core=lambda item: item[0].core) -> tuple[list, list]:
    cores = sorted({core(item) for item in items})
    random.Random(derive_seed(seed, "guard", "validation")).shuffle(cores)
    held = set(cores[: max(1, round(share * len(cores)))])
    return [i for i in items if core(i) not in held], [i for i in items if core(i) in held]


def save_training_data(path: Path, texts: list[str], labels: list[int]) -> None:
    """A classifier's training or validation texts beside it (JSONL ``{"text", "label"}``), so that reviews can
    be added to them and the thresholds calibrated again (:func:`retrain`)."""
    atomic_write_text(path, "".join(json.dumps({"text": t, "label": int(y)}) + "\n" for t, y in zip(texts, labels)))


def read_labelled(path: Path, text=lambda record: record["text"]) -> tuple[list[str], list[int]]:
    """``(texts, labels)`` of a JSONL file of labelled records; a record without them is an error naming its line."""
    from safetylab.core.io import jsonl_lines

    texts, labels = [], []
    for line in jsonl_lines(path):
        record = line.record if line.problem is None else None
        try:
            texts.append(text(record))
            labels.append(record["label"])
        except (KeyError, TypeError):
            problem = line.problem or "expected a record with a text and a label"
            raise SafetylabError(f"{path}, line {line.number}: {problem}") from None
        if labels[-1] not in (0, 1) or isinstance(labels[-1], bool) or not isinstance(texts[-1], str):
            raise SafetylabError(f"{path}, line {line.number}: expected a text and a label 0 or 1")
    return texts, labels


def retrain(guard: str | Path, layer: str, reviews: str | Path) -> dict[str, Any]:
    """Refit the classifier of ``layer`` (a classifier layer of the guard file ``guard``) on its training texts
    plus the reviewers' decisions in ``reviews`` (:meth:`safetylab.control.state.State.export_reviews`: a
    rejected exchange is a positive, an approved or edited one a negative; an input layer learns from the
    prompt, an output layer from prompt and response), calibrate its thresholds again on its validation
    texts at the same target rates, and rewrite the classifier and the guard file. Returns the new calibration
    and the number of reviews added."""
    import yaml

    from safetylab.control.config import layer_names, read_guard

    guard = Path(guard)
    spec = read_guard(guard)
    data = yaml.safe_load(guard.read_text(encoding="utf-8"))
    classifiers = [(stage, name, entry) for stage in ("input", "output")
                   for (kind, _), name, entry in zip(getattr(spec, stage), layer_names(getattr(spec, stage)),
                                                     data.get(stage) or [])
                   if kind == "classifier"]
    found = [(stage, entry) for stage, name, entry in classifiers if name == layer]
    if not found:
        names = ", ".join(name for _, name, _ in classifiers) or "none"
        raise SafetylabError(f"{guard}: no classifier layer named {layer!r} (it has {names})")
    stage, entry = found[0]
    directory = (guard.parent / entry["path"]).resolve()
    texts, labels = read_labelled(directory / "train.jsonl")
    on_exchange = stage == "output"
    added = read_labelled(Path(reviews), lambda r: f"{r['prompt']} {r['response'] or ''}" if on_exchange
                          else r["prompt"])
    from safetylab.control.classifier import load_text_classifier

    old = load_text_classifier(directory)
    classifier = fit_text_classifier(texts + added[0], labels + added[1], old.config, old.labels)
    valid_texts, valid_labels = read_labelled(directory / "validation.jsonl")
    scores, y = classifier.score(valid_texts), np.asarray(valid_labels)
    calibration = entry.get("calibration") or {}
    layer_entry = calibrated(scores[y == 1], scores[y == 0], calibration.get("fpr_escalate", 0.05),
                             calibration.get("fpr_block", 0.01))
    classifier.save(directory)
    save_training_data(directory / "train.jsonl", texts + added[0], labels + added[1])
    entry.update(layer_entry)
    entry["calibration"]["reviews_added"] = len(added[0])
    write_guard(guard, data.get("input") or [], data.get("output") or [], data.get("tripwires") or [],
                data.get("on_error", spec.on_error))
    return entry["calibration"]


def build_guard(world: World, out: str | Path, config: GuardBuildConfig = GuardBuildConfig(), hooks=None,
                tokenizer=None, monitor: str | Path | None = None) -> dict[str, Any]:
    """Train, calibrate and write a guard into directory ``out`` (``guard.yaml`` and each layer's files); with
    the served model's ``hooks`` and ``tokenizer`` an OOD gate too, and with ``monitor`` (a saved
    :mod:`safetylab.interp` monitor of that model) a monitor layer. Returns what was measured, per layer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}

    fit, held = input_data(world, config)
    classifier = fit_text_classifier(list(fit.prompts), list(fit.labels), config.classifier)
    classifier.save(out / "input-classifier")
    save_training_data(out / "input-classifier" / "train.jsonl", list(fit.prompts), list(fit.labels))
    save_training_data(out / "input-classifier" / "validation.jsonl", list(held.prompts), list(held.labels))
    held_labels = np.asarray(held.labels)
    scores = classifier.score(list(held.prompts))
    input_layer = calibrated(scores[held_labels == 1], scores[held_labels == 0], config.fpr_escalate,
                             config.fpr_block)
    report["input_classifier"] = input_layer["calibration"]
    input_layers = [{"kind": "rules", "max_chars": config.max_chars, "invisible": "modify",
                     "rules": list(OVERRIDE_RULES)},
                    {"kind": "classifier", "name": "input-classifier", "path": "input-classifier", **input_layer}]

    if config.ood and hooks is not None:
        input_layers.append(build_ood(out, hooks, tokenizer, fit, held, config, report))
    if monitor is not None:
        input_layers.append({"kind": "monitor", "name": "monitor", "path": str(Path(monitor).resolve()),
                             "decision": "block"})

    train, valid = held_out_by_core(exchanges(world, config.responses, "train", config.seed), config.validation,
                                    config.seed)
    output = fit_text_classifier([f"{r.prompt} {t}" for r, t, _ in train], [y for *_, y in train], config.classifier,
                                 ("safe", "harmful_compliance"))
    output.save(out / "output-classifier")
    save_training_data(out / "output-classifier" / "train.jsonl", [f"{r.prompt} {t}" for r, t, _ in train],
                       [y for *_, y in train])
    save_training_data(out / "output-classifier" / "validation.jsonl", [f"{r.prompt} {t}" for r, t, _ in valid],
                       [y for *_, y in valid])
    output_layer = output_calibration(output, valid, config)
    report["output_classifier"] = output_layer["calibration"]
    output_layers = [{"kind": "rules", "name": "secrets", "invisible": "modify", "rules": list(SECRET_RULES)},
                     {"kind": "classifier", "name": "output-classifier", "path": "output-classifier",
                      "reads": "exchange", **output_layer}]
    write_guard(out / "guard.yaml", input_layers, output_layers, list(TRIPWIRES))
    return report


def output_calibration(classifier: TextClassifier, valid, config: GuardBuildConfig) -> dict[str, Any]:
    scores = classifier.score([f"{r.prompt} {t}" for r, t, _ in valid])
    labels = np.asarray([y for *_, y in valid])
    return calibrated(scores[labels == 1], scores[labels == 0], config.fpr_escalate, config.fpr_block)


def build_ood(out: Path, hooks, tokenizer, fit, held, config: GuardBuildConfig, report: dict) -> dict[str, Any]:
    """The OOD gate fitted on the fitting prompts, escalating at ``fpr_ood`` of the validation prompts."""
    from safetylab.control.ood import fit_ood_layer
    from safetylab.interp.monitors import threshold_at_fpr

    layer = fit_ood_layer(hooks, tokenizer, list(fit.prompts), k=config.ood_k)
    layer.save(out / "ood")
    scores = layer.scores(list(held.prompts)).double()
    threshold = threshold_at_fpr(scores, config.fpr_ood)
    report["ood"] = {"fpr_target": config.fpr_ood, "fpr": float((scores > threshold).double().mean()),
                     "n_validation": len(scores)}
    return {"kind": "ood", "path": "ood", "escalate": threshold, "calibration": report["ood"]}


__all__ = ["GuardBuildConfig", "build_guard", "calibrated", "exchanges"]
