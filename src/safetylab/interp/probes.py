"""Linear probes on cached activations, by layer, with control tasks so that a probe that memorises does
not count.

A probe is scikit-learn's ``StandardScaler`` then L2-regularised ``LogisticRegression`` (multinomial for
more than two labels), fitted on activations ``(n, d)`` read at each prompt's last token
(:func:`safetylab.interp.data.prompt_activations`). The fitted :class:`Probe` keeps only tensors (the
scaler's mean and scale, the weights and biases), so it predicts in torch on any device, gives its weights
as directions in the activation space (for steering or ablation), and saves as safetensors + JSON with the
model and hook point it reads, refusing to load for another.

:func:`probe_by_layer` reports per hook point the held-out accuracy, the accuracy of the same probe on a
control task, their difference, **selectivity** (Hewitt & Liang 2019, "Designing and Interpreting Probes
with Control Tasks"), and the majority-class baseline. The control task gives each input *type*
(:func:`safetylab.interp.concepts.prompt_type`) a random label drawn from the task's label distribution,
the same wherever the type occurs; a probe can only learn it by memorising types, so high accuracy with
low selectivity says the probe, not the representation, did the work.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from safetylab.core.config import require
from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_bytes, atomic_write_text, read_json
from safetylab.core.seeding import derive_seed
from safetylab.interp.concepts import Concept
from safetylab.interp.data import prompt_activations
from safetylab.interp.hooks import Hooks, check_signature, model_signature

FORMAT = "safetylab.probe/1"
WEIGHTS, META = "probe.safetensors", "probe.json"


@dataclass(frozen=True)
class ProbeConfig:
    """``c``: scikit-learn's inverse L2 strength on standardised activations; ``control_seed`` fixes the
    control task's labels."""

    c: float = 1.0
    max_iter: int = 2000
    control_seed: int = 0
    batch_size: int = 64

    def __post_init__(self):
        require(self.c > 0 and math.isfinite(self.c), "c", "a finite number > 0", self.c)
        for name in ("max_iter", "batch_size"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1",
                    getattr(self, name))
        require(isinstance(self.control_seed, int) and self.control_seed >= 0, "control_seed", "an integer >= 0",
                self.control_seed)


# ----------------------------------------------------------------------------- the probe
@dataclass(frozen=True, eq=False)
class Probe:
    """A fitted linear probe: logits = ((x − mean) / scale) · coefᵀ + intercept.

    ``coef`` is (1, d) for two labels (the logit of ``label_names[1]``) and (k, d) for k > 2 labels (a
    softmax over them). ``hook`` and ``signature`` name the hook point and the model (see
    :func:`~safetylab.interp.hooks.model_signature`) it reads; a probe without them cannot be saved."""

    mean: torch.Tensor
    scale: torch.Tensor
    coef: torch.Tensor
    intercept: torch.Tensor
    label_names: tuple[str, ...]
    hook: str | None = None
    signature: dict[str, Any] | None = None

    def __post_init__(self):
        d, k = self.mean.shape[-1], len(self.label_names)
        rows = 1 if k == 2 else k
        shapes = {"mean": (d,), "scale": (d,), "coef": (rows, d), "intercept": (rows,)}
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise SafetylabError(f"probe: {name} has shape {tuple(getattr(self, name).shape)}; expected {shape} "
                                     f"for {k} labels in d = {d}")

    @property
    def d(self) -> int:
        return self.mean.shape[0]

    def _acts(self, acts: torch.Tensor) -> torch.Tensor:
        if not isinstance(acts, torch.Tensor) or acts.dim() != 2 or acts.shape[1] != self.d:
            got = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
            raise SafetylabError(f"probe{f' at {self.hook}' if self.hook else ''}: activations of shape {got}; "
                                 f"expected (n, {self.d})")
        return acts.to(self.coef.device, self.coef.dtype)

    def logits(self, acts: torch.Tensor) -> torch.Tensor:
        """(n, 1) for two labels (the positive label's log-odds), (n, k) otherwise."""
        return ((self._acts(acts) - self.mean) / self.scale) @ self.coef.T + self.intercept

    def predict_proba(self, acts: torch.Tensor) -> torch.Tensor:
        """(n, k) label probabilities, as scikit-learn's ``predict_proba`` of the fitted pipeline."""
        z = self.logits(acts)
        if len(self.label_names) == 2:
            p = torch.sigmoid(z[:, 0])
            return torch.stack([1 - p, p], 1)
        return torch.softmax(z, 1)

    def predict(self, acts: torch.Tensor) -> torch.Tensor:
        z = self.logits(acts)
        return (z[:, 0] > 0).long() if len(self.label_names) == 2 else z.argmax(1)

    def score(self, acts: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> float:
        """Accuracy on ``(acts, labels)`` (scikit-learn's ``score``)."""
        labels = torch.as_tensor(labels).to(self.coef.device)
        return accuracy(self.predict(acts), labels)

    def log_odds(self, acts: torch.Tensor, label: str | None = None) -> torch.Tensor:
        """(n,) log p(label | x) − log(1 − p(label | x)): the score a monitor thresholds. ``label`` defaults
        to ``label_names[1]`` for two labels and must be named for more."""
        index = self.label_index(label)
        z = self.logits(acts)
        if len(self.label_names) == 2:
            return z[:, 0] if index == 1 else -z[:, 0]
        others = torch.cat([z[:, :index], z[:, index + 1:]], 1)
        return z[:, index] - torch.logsumexp(others, 1)

    def label_index(self, label: str | None) -> int:
        if label is None:
            if len(self.label_names) != 2:
                raise SafetylabError(f"probe with labels {', '.join(self.label_names)}: name the label to score")
            return 1
        if label not in self.label_names:
            raise SafetylabError(f"probe: unknown label {label!r}; expected one of {', '.join(self.label_names)}")
        return self.label_names.index(label)

    @property
    def directions(self) -> torch.Tensor:
        """(rows, d) the weights in the raw activation space, coef / scale: the logit of row r rises by
        ``directions[r] · v`` when the activation moves by v."""
        return self.coef / self.scale

    def direction(self, label: str | None = None) -> torch.Tensor:
        """(d,) the unit vector in activation space along which ``label``'s logit rises fastest (for two
        labels, the positive one by default)."""
        index = self.label_index(label)
        w = self.directions[0] * (1 if index == 1 else -1) if len(self.label_names) == 2 else self.directions[index]
        return w / w.norm()

    def to(self, device: torch.device | str) -> Probe:
        return Probe(self.mean.to(device), self.scale.to(device), self.coef.to(device), self.intercept.to(device),
                     self.label_names, self.hook, self.signature)


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of ``predicted`` equal to ``labels``."""
    if predicted.shape != labels.shape:
        raise SafetylabError(f"accuracy: {tuple(predicted.shape)} predictions for {tuple(labels.shape)} labels")
    return (predicted == labels).double().mean().item()


def _check_data(acts: torch.Tensor, labels: torch.Tensor | Sequence[int], n_labels: int,
                where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2 or len(acts) == 0:
        got = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
        raise SafetylabError(f"{where}: activations of shape {got}; expected (n, d) with n >= 1")
    if not torch.isfinite(acts).all():
        raise SafetylabError(f"{where}: the activations hold NaN or infinite values")
    labels = torch.as_tensor(labels)
    if labels.shape != (len(acts),) or labels.is_floating_point():
        raise SafetylabError(f"{where}: labels of shape {tuple(labels.shape)} ({labels.dtype}); expected {len(acts)} "
                             "integer labels, one per row of activations")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_labels):
        raise SafetylabError(f"{where}: labels must be in [0, {n_labels - 1}], got {labels.min()}..{labels.max()}")
    return acts, labels.long()


def _pipeline(config: ProbeConfig):
    return make_pipeline(StandardScaler(), LogisticRegression(C=config.c, max_iter=config.max_iter))


def fit_probe(acts: torch.Tensor, labels: torch.Tensor | Sequence[int], label_names: Sequence[str] | None = None,
              config: ProbeConfig = ProbeConfig(), hook: str | None = None,
              signature: dict[str, Any] | None = None) -> Probe:
    """A logistic-regression probe for ``labels`` (n,) from ``acts`` (n, d), on standardised activations
    (scikit-learn pipeline; L2 penalty ½‖w‖² + C · Σ log-loss, multinomial over more than two labels).
    ``label_names`` default to ``"0", "1", …``; every label must occur in ``labels``."""
    if label_names is None:
        labels = torch.as_tensor(labels)
        label_names = [str(i) for i in range(int(labels.max()) + 1 if labels.numel() else 0)]
    names = tuple(label_names)
    acts, labels = _check_data(acts, labels, len(names), "fit_probe")
    missing = [names[i] for i in range(len(names)) if not (labels == i).any()]
    if len(names) < 2 or missing:
        raise SafetylabError(f"fit_probe: every label must occur in the training data; missing: "
                             f"{', '.join(missing) or 'a second label'}")
    pipeline = _pipeline(config).fit(acts.double().cpu().numpy(), labels.cpu().numpy())
    scaler, linear = pipeline[0], pipeline[1]
    as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return Probe(as_tensor(scaler.mean_), as_tensor(scaler.scale_), as_tensor(linear.coef_),
                 as_tensor(linear.intercept_), names, hook, signature)


# ----------------------------------------------------------------------------- control tasks
def label_distribution(labels: torch.Tensor, n_labels: int) -> list[float]:
    """The empirical share of each label in ``labels``."""
    counts = torch.bincount(torch.as_tensor(labels).long(), minlength=n_labels).double()
    return (counts / counts.sum()).tolist()


def control_labels(types: Sequence[str], distribution: Sequence[float], seed: int = 0) -> torch.Tensor:
    """Hewitt & Liang's control task: each type gets one label drawn from ``distribution``, the same wherever
    the type occurs (in training and test data alike: the draw depends only on the type and ``seed``)."""
    drawn: dict[str, int] = {}
    for t in types:
        if t not in drawn:
            rng = random.Random(derive_seed(seed, "control-task", t))
            drawn[t] = rng.choices(range(len(distribution)), weights=distribution)[0]
    return torch.tensor([drawn[t] for t in types], dtype=torch.long)


def selectivity(task_accuracy: float, control_accuracy: float) -> float:
    """Selectivity = task accuracy − control-task accuracy (Hewitt & Liang 2019)."""
    return task_accuracy - control_accuracy


def majority_baseline(train_labels: torch.Tensor, test_labels: torch.Tensor) -> float:
    """The test accuracy of always answering the most frequent training label."""
    majority = torch.bincount(torch.as_tensor(train_labels).long()).argmax()
    return (torch.as_tensor(test_labels) == majority).double().mean().item()


# ----------------------------------------------------------------------------- by layer
@dataclass(frozen=True)
class LayerScore:
    """One hook point's probe: held-out ``accuracy``, ``control_accuracy`` (the same probe recipe on the
    control task), ``selectivity`` (their difference), ``majority`` (the majority-class baseline),
    ``train_accuracy``, and the task probe itself. ``types`` is the number of distinct training types and
    ``seen_types`` the share of test prompts whose type occurs in training: with few types the control task
    rests on few draws, and on unseen types it is at chance by construction."""

    hook: str
    accuracy: float
    control_accuracy: float
    selectivity: float
    majority: float
    train_accuracy: float
    types: int
    seen_types: float
    probe: Probe = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, float | int | str]:
        return {"hook": self.hook, "accuracy": round(self.accuracy, 6),
                "control_accuracy": round(self.control_accuracy, 6), "selectivity": round(self.selectivity, 6),
                "majority": round(self.majority, 6), "train_accuracy": round(self.train_accuracy, 6),
                "types": self.types, "seen_types": round(self.seen_types, 6)}


def score_layers(train_acts: Mapping[str, torch.Tensor], test_acts: Mapping[str, torch.Tensor], train: Concept,
                 test: Concept, config: ProbeConfig = ProbeConfig(),
                 signature: dict[str, Any] | None = None) -> dict[str, LayerScore]:
    """Per hook point of ``train_acts``: fit a task probe and a control probe on ``train`` and score both on
    ``test`` (activations already read; :func:`probe_by_layer` reads them)."""
    if train.label_names != test.label_names:
        raise SafetylabError(f"probe: train labels {train.label_names} differ from test labels {test.label_names}")
    missing = [name for name, count in train.counts().items() if count == 0]
    if missing:
        raise SafetylabError(f"probe for {train.name}: no training prompt is labelled {', '.join(missing)} "
                             f"(labels: {train.counts()}); a probe needs every label")
    distribution = label_distribution(train.y, len(train.label_names))
    control_train = control_labels(train.types, distribution, config.control_seed)
    control_test = control_labels(test.types, distribution, config.control_seed)
    train_types = set(train.types)
    seen = sum(t in train_types for t in test.types) / len(test)
    scores = {}
    for hook, x_train in train_acts.items():
        if hook not in test_acts:
            raise SafetylabError(f"probe: {hook} has training activations but no test activations")
        x_test = test_acts[hook]
        probe = fit_probe(x_train, train.y, train.label_names, config, hook, signature)
        task_acc = probe.score(x_test, test.y)
        control_acc = control_accuracy(x_train, control_train, x_test, control_test, config)
        scores[hook] = LayerScore(hook, task_acc, control_acc, selectivity(task_acc, control_acc),
                                  majority_baseline(train.y, test.y), probe.score(x_train, train.y),
                                  len(train_types), seen, probe)
    return scores


def control_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                     config: ProbeConfig = ProbeConfig()) -> float:
    """The test accuracy of the probe recipe fitted to control labels ``y_train`` (whichever labels the draw
    gave; a single one is predicted everywhere)."""
    present = torch.unique(y_train)
    if len(present) < 2:
        return (y_test == present[0]).double().mean().item()
    pipeline = _pipeline(config).fit(x_train.double().cpu().numpy(), y_train.cpu().numpy())
    return accuracy(torch.as_tensor(pipeline.predict(x_test.double().cpu().numpy())), y_test.cpu())


def probe_by_layer(hooks: Hooks, tokenizer, train: Concept, test: Concept, names: Sequence[str] | str,
                   config: ProbeConfig = ProbeConfig()) -> dict[str, LayerScore]:
    """Per hook point in ``names`` (say ``hooks.names_like("resid_post")``): held-out accuracy, control-task
    accuracy, selectivity and the majority baseline of a probe for ``train``'s concept, scored on ``test``,
    from the activations at each prompt's last token."""
    names = hooks.select(names)
    train_acts = prompt_activations(hooks, tokenizer, list(train.prompts), names, batch_size=config.batch_size)
    test_acts = prompt_activations(hooks, tokenizer, list(test.prompts), names, batch_size=config.batch_size)
    return score_layers(train_acts, test_acts, train, test, config, model_signature(hooks.model))


# ----------------------------------------------------------------------------- files
def save_probe(probe: Probe, path: str | os.PathLike) -> Path:
    """Write ``probe`` into the directory ``path``: ``probe.safetensors`` (the scaler's mean and scale, the
    weights and biases) and ``probe.json`` (hook point, label names, model signature). Each file is
    written atomically."""
    if probe.hook is None or probe.signature is None:
        raise SafetylabError("save_probe: the probe does not record the hook point and model it reads (fit it with "
                             "hook= and signature=, or through probe_by_layer); it could not be checked when loaded")
    path = Path(path)
    tensors = {"scaler.mean": probe.mean, "scaler.scale": probe.scale, "linear.weight": probe.coef,
               "linear.bias": probe.intercept}
    atomic_write_bytes(path / WEIGHTS, save({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}))
    meta = {"format": FORMAT, "hook": probe.hook, "label_names": list(probe.label_names),
            "model_signature": probe.signature, "d_model": probe.d,
            "scaler": "standard: (x - scaler.mean) / scaler.scale", "labels": "two: sigmoid; more: softmax"}
    atomic_write_text(path / META, json.dumps(meta, indent=2) + "\n")
    return path


def load_probe(path: str | os.PathLike, model=None, hook: str | None = None) -> Probe:
    """The probe saved in ``path``; with ``model`` it must have been made for a model of that shape, and with
    ``hook`` for that hook point, else a :class:`SafetylabError` says what differs."""
    path = Path(path)
    for name in (WEIGHTS, META):
        if not (path / name).is_file():
            raise SafetylabError(f"{path}: no {name}; expected a probe directory written by save_probe")
    meta = read_json(path / META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SafetylabError(f"{path / META}: not a probe file (expected format {FORMAT!r})")
    tensors = load_file(str(path / WEIGHTS))
    expected = {"scaler.mean", "scaler.scale", "linear.weight", "linear.bias"}
    if set(tensors) != expected:
        raise SafetylabError(f"{path / WEIGHTS}: holds {', '.join(sorted(tensors))}; expected "
                             f"{', '.join(sorted(expected))}")
    missing = [k for k in ("hook", "label_names", "model_signature") if k not in meta]
    if missing:
        raise SafetylabError(f"{path / META}: no {', '.join(missing)}; expected a file written by save_probe")
    probe = Probe(tensors["scaler.mean"], tensors["scaler.scale"], tensors["linear.weight"], tensors["linear.bias"],
                  tuple(meta["label_names"]), meta["hook"], meta["model_signature"])
    if hook is not None and hook != probe.hook:
        raise SafetylabError(f"probe {path} reads {probe.hook}; it cannot be used at {hook}")
    if model is not None:
        check_signature(probe.signature, model, f"probe {path}")
    return probe


__all__ = ["LayerScore", "Probe", "ProbeConfig", "accuracy", "control_accuracy", "control_labels", "fit_probe",
           "label_distribution", "load_probe", "majority_baseline", "probe_by_layer", "save_probe", "score_layers",
           "selectivity"]
