"""The guard: ordered layers around a model, each returning one result shape, on the input and on the output.

Every layer answers a text with a :class:`LayerResult` — a decision, a score (higher = more suspect, as every
detector in safetylab), a reason and its latency — so layers chain the way LLM Guard's scanners do. The
decisions are ordered by severity::

    allow < modify < escalate < block < halt

``modify`` hands the next layers (and the model) a changed text — invisible characters stripped, say;
``escalate`` lets the request through but queues it for a person; ``block`` stops it; ``halt`` stops it and
trips the server's kill switch. :class:`Guard` runs the input layers on a prompt and the output layers on
(prompt, response); the verdict is the most severe decision, and a ``block`` or ``halt`` ends the pass (the
later layers would not change it). A layer that raises **fails closed**: its result is ``block`` (or the
guard's ``on_error`` decision) with the error as the reason, and the pass goes on to record it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from safetylab.core.config import require_choice
from safetylab.core.errors import SafetylabError

DECISIONS = ("allow", "modify", "escalate", "block", "halt")
SEVERITY = {d: i for i, d in enumerate(DECISIONS)}
STOPS = frozenset({"block", "halt"})
REFUSAL = "i can not help with that ."  # the answer to a stopped request (the server's default, the study's)


@dataclass(frozen=True)
class LayerResult:
    """One layer's answer: ``decision`` (one of :data:`DECISIONS`), ``score`` (higher = more suspect; None for
    a layer without one), ``reason``, ``latency_ms``, and for ``modify`` the changed ``text``."""

    layer: str
    decision: str
    score: float | None = None
    reason: str = ""
    latency_ms: float = 0.0
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"layer": self.layer, "decision": self.decision, "score": self.score, "reason": self.reason,
               "latency_ms": round(self.latency_ms, 4)}
        return out if self.text is None else {**out, "modified": True}


@dataclass(frozen=True)
class Verdict:
    """A pass of the guard over one text: the most severe ``decision``, the ``text`` the next step sees (the
    input after every ``modify``), and each layer's result in order."""

    stage: str
    decision: str
    text: str
    results: tuple[LayerResult, ...] = field(default=())

    @property
    def allowed(self) -> bool:
        """Whether the text goes on (allow, modify or escalate)."""
        return self.decision not in STOPS

    @property
    def reason(self) -> str:
        """The reason of the first layer that decided the verdict."""
        return next((r.reason for r in self.results if r.decision == self.decision), "")

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "decision": self.decision, "reason": self.reason,
                "layers": [r.to_dict() for r in self.results]}


def most_severe(decisions: Sequence[str]) -> str:
    """The most severe of ``decisions`` (``allow`` for none)."""
    return max(decisions, key=SEVERITY.__getitem__, default="allow")


def delivery(verdicts: Sequence[Verdict], refusal: str = REFUSAL, hold: bool = True) -> tuple[str, str | None]:
    """An exchange's decision — the most severe of its ``verdicts`` (the input's, then the output's when the input
    let the text through) — and what its user receives: ``refusal`` for a stopped request, nothing (None) for one
    held for review (``hold``), else the last verdict's text (the answer, as the layers modified it)."""
    decision = most_severe([v.decision for v in verdicts])
    if decision in STOPS:
        return decision, refusal
    if decision == "escalate" and hold:
        return decision, None
    return decision, verdicts[-1].text


class Layer:
    """A guard layer: :meth:`check` a text (for an output layer, ``prompt`` is the prompt it answers) and return
    a :class:`LayerResult`; the guard times it. ``name`` names it in results and logs."""

    name: str = "layer"
    blocking: bool = False  # whether check runs a model (a server then calls it off its event loop)

    def check(self, text: str, prompt: str | None = None) -> LayerResult:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The layer's settings, for the guard's report and the audit log."""
        return {"name": self.name, "kind": type(self).__name__}


class Guard:
    """Input layers run on the prompt, output layers on the response; :meth:`check_input` and
    :meth:`check_output` return a :class:`Verdict`. ``on_error``: the decision of a layer that raised (fail
    closed: ``block`` by default, ``halt`` to stop serving). ``wires``: the tripwires a server running this
    guard watches (:mod:`safetylab.control.tripwires`), kept with the guard as its file keeps them."""

    def __init__(self, input_layers: Sequence[Layer] = (), output_layers: Sequence[Layer] = (),
                 on_error: str = "block", wires: Sequence[Any] = ()):
        require_choice(on_error, "on_error", ("block", "halt"))
        for stage, layers in (("input", input_layers), ("output", output_layers)):
            for i, layer in enumerate(layers):
                if not callable(getattr(layer, "check", None)):
                    raise SafetylabError(f"guard {stage} layer {i}: {type(layer).__name__} has no check(text, "
                                         "prompt); expected a safetylab.control.guard.Layer")
            names = [layer.name for layer in layers]
            if len(set(names)) != len(names):
                raise SafetylabError(f"guard {stage} layers: names must be unique, got {names}")
        self.input_layers, self.output_layers = tuple(input_layers), tuple(output_layers)
        self.on_error, self.wires = on_error, tuple(wires)

    @property
    def blocking(self) -> bool:
        """Whether a layer runs a model (an OOD gate or monitor on the served model's activations)."""
        return any(layer.blocking for layer in (*self.input_layers, *self.output_layers))

    def check_input(self, prompt: str) -> Verdict:
        return self._run("input", self.input_layers, prompt, None)

    def check_output(self, prompt: str, response: str) -> Verdict:
        return self._run("output", self.output_layers, response, prompt)

    def _run(self, stage: str, layers: Sequence[Layer], text: str, prompt: str | None) -> Verdict:
        if not isinstance(text, str):
            raise SafetylabError(f"guard {stage}: expected a string, got {type(text).__name__}")
        results = []
        for layer in layers:
            start = time.perf_counter()
            try:
                result = layer.check(text, prompt)
                if result.decision not in SEVERITY:
                    raise SafetylabError(f"returned decision {result.decision!r}, expected one of {DECISIONS}")
            except Exception as e:  # fail closed: a broken layer stops the request and says why
                result = LayerResult(layer.name, self.on_error, None, f"layer error: {type(e).__name__}: {e}")
            latency = (time.perf_counter() - start) * 1000
            results.append(LayerResult(layer.name, result.decision, result.score, result.reason, latency,
                                       result.text))
            if result.decision == "modify" and result.text is not None:
                text = result.text
            if result.decision in STOPS:
                break
        return Verdict(stage, most_severe([r.decision for r in results]), text, tuple(results))

    def describe(self) -> dict[str, Any]:
        return {"on_error": self.on_error, "input": [layer.describe() for layer in self.input_layers],
                "output": [layer.describe() for layer in self.output_layers],
                "tripwires": [type(w).__name__ for w in self.wires]}


__all__ = ["DECISIONS", "Guard", "Layer", "LayerResult", "REFUSAL", "Verdict", "delivery", "most_severe"]
