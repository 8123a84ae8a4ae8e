"""Guard files: a YAML file that names the guard's layers in order, validated when it is loaded.

::

    format: safetylab.guard/1
    on_error: block                   # a layer that raises: block (fail closed) or halt
    input:
      - kind: rules
        max_chars: 2000
        invisible: modify
        rules:
          - {pattern: "ignore (all |your )?(previous )?(rules|instructions)", decision: escalate,
             reason: instruction override}
      - kind: classifier              # a TextClassifier directory, relative to this file
        path: input-classifier
        escalate: 0.4                 # log-odds thresholds
        block: 2.1
        calibration: {fpr: 0.01, measured_fpr: 0.008, tpr: 0.97}   # written by the builder, for people
      - kind: ood                     # needs the served model
        path: ood
        escalate: 0.62
      - kind: monitor                 # a safetylab.interp monitor directory; needs the served model
        path: ../interp/monitor/harmful-intent
        decision: block
    output:
      - kind: classifier
        path: output-classifier
        reads: exchange              # prompt and response (YAML reads a bare `on` as true)
        block: 1.5
    tripwires:                        # safetylab.control.tripwires
      - {kind: repeated_attempts, count: 5, window_s: 60, action: lock_key}
      - {kind: output_anomaly, window: 100, max_rate: 0.2}

Every layer takes a ``name`` (default: its kind, then a number if repeated). Each entry is checked against its
kind's fields; an error names the file, the list, the entry's index and the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from safetylab.control.guard import Guard, Layer
from safetylab.control.layers import ClassifierLayer, MonitorLayer, Rule, RulesLayer
from safetylab.control.tripwires import wire_from_dict
from safetylab.core.config import config_from_dict, read_config_file, require
from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_text

FORMAT = "safetylab.guard/1"
KINDS = ("rules", "classifier", "ood", "monitor")
NEEDS_MODEL = ("ood", "monitor")


@dataclass(frozen=True)
class RulesSpec:
    name: str | None = None
    rules: tuple[Rule, ...] = ()
    max_chars: int | None = None
    length: str = "block"
    invisible: str = "modify"


@dataclass(frozen=True)
class ClassifierSpec:
    path: str
    name: str | None = None
    escalate: float | None = None
    block: float | None = None
    reads: str = "text"
    calibration: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OODSpec:
    path: str
    name: str | None = None
    escalate: float | None = None
    block: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MonitorSpec:
    path: str
    name: str | None = None
    decision: str = "block"
    threshold: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)


SPECS = {"rules": RulesSpec, "classifier": ClassifierSpec, "ood": OODSpec, "monitor": MonitorSpec}


@dataclass(frozen=True)
class GuardSpec:
    """A guard file's content: the layer entries (kind and spec) of each stage, checked."""

    input: tuple[tuple[str, Any], ...] = ()
    output: tuple[tuple[str, Any], ...] = ()
    on_error: str = "block"
    tripwires: tuple[dict[str, Any], ...] = ()

    def __post_init__(self):
        require(self.on_error in ("block", "halt"), "on_error", "block or halt", self.on_error)

    @property
    def needs_model(self) -> bool:
        return any(kind in NEEDS_MODEL for kind, _ in (*self.input, *self.output))


def parse_guard(data: Any, where: str = "guard") -> GuardSpec:
    """The :class:`GuardSpec` of a guard file's parsed YAML ``data``; ``where`` (the file) prefixes errors."""
    if not isinstance(data, dict):
        raise SafetylabError(f"{where}: expected a mapping with format, input and output, got {type(data).__name__}")
    unknown = sorted(set(data) - {"format", "on_error", "input", "output", "tripwires"})
    if unknown:
        raise SafetylabError(f"{where}: unknown key {unknown[0]!r} (expected format, on_error, input, output, "
                             "tripwires)")
    if data.get("format") != FORMAT:
        raise SafetylabError(f"{where}: format is {data.get('format')!r}; expected {FORMAT!r}")
    stages = {}
    for stage in ("input", "output"):
        entries = data.get(stage) or []
        if not isinstance(entries, list):
            raise SafetylabError(f"{where}: {stage} must be a list of layers, got {type(entries).__name__}")
        parsed = []
        for i, entry in enumerate(entries):
            at = f"{where}: {stage}[{i}]"
            if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
                got = entry.get("kind") if isinstance(entry, dict) else type(entry).__name__
                raise SafetylabError(f"{at}: kind is {got!r}; expected one of {', '.join(KINDS)}")
            fields = {k: v for k, v in entry.items() if k != "kind"}
            try:
                parsed.append((entry["kind"], config_from_dict(SPECS[entry["kind"]], fields, where=at)))
            except SafetylabError as e:
                raise SafetylabError(str(e) if str(e).startswith(at) else f"{at}: {e}") from None
        names = layer_names(parsed)
        if len(set(names)) != len(names):
            raise SafetylabError(f"{where}: {stage} layer names must be unique, got {names}")
        stages[stage] = tuple(parsed)
    wires = data.get("tripwires") or []
    if not isinstance(wires, list):
        raise SafetylabError(f"{where}: tripwires must be a list, got {type(wires).__name__}")
    names = [wire_from_dict(entry, f"{where}: tripwires[{i}]").name for i, entry in enumerate(wires)]
    if len(set(names)) != len(names):
        raise SafetylabError(f"{where}: tripwire names must be unique, got {names}")
    try:
        return GuardSpec(stages["input"], stages["output"], data.get("on_error", "block"), tuple(wires))
    except SafetylabError as e:
        raise SafetylabError(f"{where}: {e}") from None


def layer_names(entries) -> list[str]:
    """Each entry's name: its own, else its kind (numbered from the second of a kind on)."""
    names, seen = [], {}
    for kind, spec in entries:
        seen[kind] = seen.get(kind, 0) + 1
        names.append(spec.name or (kind if seen[kind] == 1 else f"{kind}-{seen[kind]}"))
    return names


def read_guard(path: str | os.PathLike) -> GuardSpec:
    """The guard file at ``path``, checked (not yet built: no classifier or model loaded)."""
    return parse_guard(read_config_file(path), str(path))


def load_guard(path: str | os.PathLike, hooks=None, tokenizer=None, text_only: bool = False) -> Guard:
    """Build the guard of the file at ``path``, loading each layer's files (paths relative to the guard file);
    ``hooks`` and ``tokenizer`` of the served model are needed by ``ood`` and ``monitor`` layers. ``text_only``:
    only the layers that read text (rules, classifiers), the guard a process without the served model runs."""
    path = Path(path)
    spec = read_guard(path)
    if spec.needs_model and not text_only and (hooks is None or tokenizer is None):
        raise SafetylabError(f"{path}: its ood and monitor layers read the served model's activations; load it "
                             "with the model's hooks and tokenizer")
    stages = {}
    for stage in ("input", "output"):
        entries = getattr(spec, stage)
        layers = []
        for i, ((kind, layer_spec), name) in enumerate(zip(entries, layer_names(entries))):
            if text_only and kind in ("ood", "monitor"):
                continue
            try:
                layers.append(build_layer(kind, layer_spec, name, path.parent, hooks, tokenizer))
            except SafetylabError as e:
                raise SafetylabError(f"{path}: {stage}[{i}] ({kind}): {e}") from None
        stages[stage] = layers
    wires = [wire_from_dict(entry, f"{path}: tripwires[{i}]") for i, entry in enumerate(spec.tripwires)]
    return Guard(stages["input"], stages["output"], spec.on_error, wires)


def build_layer(kind: str, spec: Any, name: str, base: Path, hooks=None, tokenizer=None) -> Layer:
    """One layer of a guard file, its files found relative to ``base``."""
    if kind == "rules":
        return RulesLayer(name, spec.rules, spec.max_chars, spec.length, spec.invisible)
    target = (base / spec.path).resolve()
    if not target.exists():
        raise SafetylabError(f"path {spec.path!r}: {target} does not exist")
    if kind == "classifier":
        from safetylab.control.classifier import load_text_classifier

        return ClassifierLayer(load_text_classifier(target), name, spec.escalate, spec.block, spec.reads)
    if kind == "ood":
        from safetylab.control.ood import load_ood_layer

        return load_ood_layer(target, hooks, tokenizer, name, spec.escalate, spec.block)
    from safetylab.interp.monitors import load_monitor

    return MonitorLayer(load_monitor(target, hooks, tokenizer), name, spec.decision, spec.threshold)


def write_guard(path: str | os.PathLike, input_layers: list[dict], output_layers: list[dict],
                tripwires: list[dict] = (), on_error: str = "block") -> Path:
    """Write a guard file (each layer and wire a mapping with ``kind`` and its fields), after checking that it
    parses."""
    data = {"format": FORMAT, "on_error": on_error, "input": input_layers, "output": output_layers,
            "tripwires": list(tripwires)}
    parse_guard(data, str(path))
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110)
    atomic_write_text(path, text)
    return Path(path)


__all__ = ["FORMAT", "GuardSpec", "load_guard", "parse_guard", "read_guard", "write_guard"]
