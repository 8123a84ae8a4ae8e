"""The guard's layers, each a :class:`~safetylab.control.guard.Layer` returning one result shape.

- :class:`RulesLayer`: length limits, invisible characters, and patterns (regular expressions on the text after
  NFKC normalisation and case folding, so full-width and styled look-alikes match too), each pattern with its
  decision — ``modify`` redacts the match (secrets in an output, say);
- :class:`ClassifierLayer`: a :class:`~safetylab.control.classifier.TextClassifier`'s log-odds against an
  ``escalate`` and a ``block`` threshold, on the prompt (input) or the response (output);
- :class:`~safetylab.control.ood.OODLayer` (in :mod:`.ood`): an out-of-distribution gate on the served model's
  own representation of the prompt;
- :class:`MonitorLayer`: a :mod:`safetylab.interp.monitors` monitor (a probe or an SAE latent read from the
  served model's activations) that blocks or escalates when it fires.

Thresholds are numbers in the guard's file; :mod:`safetylab.control.build` calibrates them on validation data
to a target false-positive rate and writes the rates it measured beside them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from safetylab.control.classifier import TextClassifier
from safetylab.control.guard import SEVERITY, Layer, LayerResult
from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError

# Unicode "format" characters (zero-width spaces and joiners, bidi controls, tag characters) and C0/C1 controls
# other than tab and newline: invisible in a rendered prompt, a classic carrier of hidden instructions.
_INVISIBLE = re.compile(r"[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u00ad\u061c\u115f\u1160\u17b4\u17b5"
                        r"\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0"
                        r"\U000e0000-\U000e007f]")
REDACTED = "[redacted]"


def strip_invisible(text: str) -> str:
    """``text`` without invisible format and control characters (tab and newline kept)."""
    return _INVISIBLE.sub("", text)


def normalise(text: str) -> str:
    """The form patterns are matched against: NFKC (full-width and styled letters to plain ones), case-folded,
    invisible characters removed."""
    return strip_invisible(unicodedata.normalize("NFKC", text)).casefold()


@dataclass(frozen=True)
class Rule:
    """A pattern (a regular expression, matched case-insensitively on the normalised text), the decision when
    it matches, and the reason given."""

    pattern: str
    decision: str = "block"
    reason: str = ""

    def __post_init__(self):
        require_choice(self.decision, "decision", tuple(SEVERITY))
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise SafetylabError(f"rule pattern {self.pattern!r}: not a regular expression ({e})") from None


class RulesLayer(Layer):
    """Limits and patterns: longer than ``max_chars`` → ``length`` (block); invisible characters → ``invisible``
    (``modify`` strips them, ``block`` refuses, ``allow`` ignores); then each rule in order, the most severe match
    deciding. A ``modify`` rule replaces its matches with ``[redacted]`` in the text passed on."""

    def __init__(self, name: str = "rules", rules: Sequence[Rule] = (), max_chars: int | None = None,
                 length: str = "block", invisible: str = "modify"):
        require(max_chars is None or (isinstance(max_chars, int) and max_chars >= 1), "max_chars",
                "an integer >= 1 or null", max_chars)
        require_choice(length, "length", ("escalate", "block", "halt"))
        require_choice(invisible, "invisible", ("allow", "modify", "escalate", "block"))
        self.name, self.rules, self.max_chars = name, tuple(rules), max_chars
        self.length, self.invisible = length, invisible
        self._compiled = [re.compile(r.pattern, re.IGNORECASE) for r in self.rules]

    def check(self, text: str, prompt: str | None = None) -> LayerResult:
        if self.max_chars is not None and len(text) > self.max_chars:
            return LayerResult(self.name, self.length, float(len(text)),
                               f"{len(text)} characters, over the limit of {self.max_chars}")
        decision, reasons, changed = "allow", [], text
        if self.invisible != "allow" and _INVISIBLE.search(text):
            decision, changed = self.invisible, strip_invisible(text)
            reasons.append("invisible characters")
        plain = normalise(changed)
        for rule, pattern in zip(self.rules, self._compiled):
            if rule.decision == "modify":
                redacted, n = pattern.subn(REDACTED, changed)
                if n:
                    changed = redacted
                    decision = max(decision, "modify", key=SEVERITY.__getitem__)
                    reasons.append(rule.reason or f"redacted {n} match(es) of {rule.pattern!r}")
            elif pattern.search(plain):
                decision = max(decision, rule.decision, key=SEVERITY.__getitem__)
                reasons.append(rule.reason or f"matched {rule.pattern!r}")
        return LayerResult(self.name, decision, 1.0 if reasons else 0.0, "; ".join(reasons),
                           text=changed if changed != text else None)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "rules", "rules": len(self.rules), "max_chars": self.max_chars}


def threshold_decision(score: float, escalate: float | None, block: float | None) -> str:
    """``block`` when ``score > block``, else ``escalate`` when ``score > escalate``, else ``allow``."""
    if block is not None and score > block:
        return "block"
    if escalate is not None and score > escalate:
        return "escalate"
    return "allow"


class ScoreLayer(Layer):
    """A layer that scores one text and compares it with ``escalate`` and ``block`` thresholds."""

    kind = "score"

    def __init__(self, name: str, escalate: float | None, block: float | None, what: str):
        if escalate is None and block is None:
            raise SafetylabError(f"guard layer {name}: set escalate, block or both thresholds")
        if escalate is not None and block is not None and escalate > block:
            raise SafetylabError(f"guard layer {name}: escalate ({escalate}) above block ({block}); expected "
                                 "escalate <= block")
        self.name, self.escalate, self.block, self.what = name, escalate, block, what

    def score(self, text: str, prompt: str | None) -> float:
        raise NotImplementedError

    def check(self, text: str, prompt: str | None = None) -> LayerResult:
        score = float(self.score(text, prompt))
        if score != score:
            raise SafetylabError(f"{self.name}: NaN score")
        decision = threshold_decision(score, self.escalate, self.block)
        limit = self.block if decision == "block" else self.escalate
        reason = "" if decision == "allow" else f"{self.what} {score:.3g} > {limit:.3g}"
        return LayerResult(self.name, decision, score, reason)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "escalate": self.escalate, "block": self.block}


class ClassifierLayer(ScoreLayer):
    """A text classifier's log-odds on the checked text (``reads="text"``: the prompt for an input layer, the
    response for an output layer) or on prompt and response together (``reads="exchange"``)."""

    kind = "classifier"

    def __init__(self, classifier: TextClassifier, name: str = "classifier", escalate: float | None = None,
                 block: float | None = None, reads: str = "text"):
        super().__init__(name, escalate, block, f"{classifier.labels[1]} log-odds")
        require_choice(reads, "reads", ("text", "exchange"))
        self.classifier, self.reads = classifier, reads

    def score(self, text: str, prompt: str | None) -> float:
        joined = text if self.reads == "text" or prompt is None else f"{prompt} {text}"
        return float(self.classifier.score([joined])[0])


class MonitorLayer(ScoreLayer):
    """A :mod:`safetylab.interp.monitors` monitor on the prompt (its score: a probe's log-odds or an SAE
    latent's activation), ``decision`` when it fires (its own calibrated threshold, unless ``threshold`` is
    given)."""

    kind = "monitor"
    blocking = True

    def __init__(self, monitor, name: str | None = None, decision: str = "block", threshold: float | None = None):
        require_choice(decision, "decision", ("escalate", "block", "halt"))
        limit = monitor.threshold if threshold is None else threshold
        if limit is None:
            raise SafetylabError(f"monitor layer {monitor.name}: the monitor has no threshold; calibrate it or "
                                 "give one")
        super().__init__(name or monitor.name, limit if decision == "escalate" else None,
                         None if decision == "escalate" else limit, f"{monitor.name} score")
        self.monitor, self.decision = monitor, decision

    def score(self, text: str, prompt: str | None) -> float:
        return float(self.monitor.score([text])[0])

    def check(self, text: str, prompt: str | None = None) -> LayerResult:
        result = super().check(text, prompt)
        if result.decision == "block" and self.decision == "halt":
            return LayerResult(result.layer, "halt", result.score, result.reason)
        return result


__all__ = ["ClassifierLayer", "MonitorLayer", "REDACTED", "Rule", "RulesLayer", "ScoreLayer", "normalise",
           "strip_invisible", "threshold_decision"]
