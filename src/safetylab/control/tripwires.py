"""Tripwires: conditions on the stream of guard verdicts that stop serving (or lock one key) by themselves.

- :class:`ScoreSpike`: a layer's score above a ceiling far beyond its blocking threshold — a monitor reading
  something it was never calibrated for;
- :class:`RepeatedAttempts`: ``count`` blocked requests from one key within ``window_s`` seconds — someone
  searching for a jailbreak;
- :class:`OutputAnomaly`: among the last ``window`` responses, a share above ``max_rate`` flagged by the output
  layers — the model's output distribution has moved (a bad deployment, a poisoned update, a new attack).

:class:`Tripwires` feeds each request's verdicts to every wire and returns the :class:`Trip` s; the server acts
on them (``halt`` pulls the kill switch; ``lock_key`` locks the key) and logs each one. The state is a sliding
window in memory: a restart forgets recent history but not a halt, which the kill switch keeps.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from safetylab.control.guard import Verdict
from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError

ACTIONS = ("halt", "lock_key")


@dataclass(frozen=True)
class Trip:
    """A wire that tripped: its ``name``, the ``action`` to take, why, and the key involved."""

    wire: str
    action: str
    reason: str
    key: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"wire": self.wire, "action": self.action, "reason": self.reason, "key": self.key}


class Wire:
    name: str
    action: str

    def observe(self, key: str | None, verdicts: Sequence[Verdict], now: float) -> Trip | None:
        raise NotImplementedError


@dataclass
class ScoreSpike(Wire):
    """Trips when layer ``layer``'s score exceeds ``ceiling``."""

    layer: str
    ceiling: float
    action: str = "halt"
    name: str = "score_spike"

    def __post_init__(self):
        require_choice(self.action, "action", ACTIONS)

    def observe(self, key, verdicts, now):
        for verdict in verdicts:
            for r in verdict.results:
                if r.layer == self.layer and r.score is not None and r.score > self.ceiling:
                    return Trip(self.name, self.action, f"{self.layer} scored {r.score:.3g} > ceiling "
                                                        f"{self.ceiling:.3g}", key)
        return None


@dataclass
class RepeatedAttempts(Wire):
    """Trips when one key has ``count`` requests decided ``block`` (or worse) within ``window_s`` seconds."""

    count: int = 5
    window_s: float = 60.0
    action: str = "lock_key"
    name: str = "repeated_attempts"
    _times: dict[str, deque] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        require(isinstance(self.count, int) and self.count >= 1, "count", "an integer >= 1", self.count)
        require(self.window_s > 0, "window_s", "a number of seconds > 0", self.window_s)
        require_choice(self.action, "action", ACTIONS)

    def observe(self, key, verdicts, now):
        if key is None or not any(v.decision in ("block", "halt") for v in verdicts):
            return None
        times = self._times.setdefault(key, deque())
        times.append(now)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) >= self.count:
            times.clear()
            return Trip(self.name, self.action, f"{self.count} blocked requests within {self.window_s:g} s", key)
        return None


@dataclass
class OutputAnomaly(Wire):
    """Trips when more than ``max_rate`` of the last ``window`` output verdicts were escalated or blocked (judged
    once the window is full)."""

    window: int = 100
    max_rate: float = 0.2
    action: str = "halt"
    name: str = "output_anomaly"
    _flags: deque = field(default_factory=deque, repr=False)

    def __post_init__(self):
        require(isinstance(self.window, int) and self.window >= 1, "window", "an integer >= 1", self.window)
        require(0 <= self.max_rate < 1, "max_rate", "a rate in [0, 1)", self.max_rate)
        require_choice(self.action, "action", ACTIONS)

    def observe(self, key, verdicts, now):
        outputs = [v for v in verdicts if v.stage == "output"]
        if not outputs:
            return None
        self._flags.append(outputs[-1].decision in ("escalate", "block", "halt"))
        if len(self._flags) > self.window:
            self._flags.popleft()
        rate = sum(self._flags) / len(self._flags)
        if len(self._flags) == self.window and rate > self.max_rate:
            self._flags.clear()
            return Trip(self.name, self.action, f"{rate:.0%} of the last {self.window} responses flagged, over "
                                                f"{self.max_rate:.0%}", key)
        return None


WIRES = {"score_spike": ScoreSpike, "repeated_attempts": RepeatedAttempts, "output_anomaly": OutputAnomaly}


class Tripwires:
    """Every wire, fed each request's verdicts; ``clock`` gives seconds (monotonic)."""

    def __init__(self, wires: Sequence[Wire] = (), clock: Callable[[], float] = time.monotonic):
        names = [w.name for w in wires]
        if len(set(names)) != len(names):
            raise SafetylabError(f"tripwires: names must be unique, got {names}")
        self.wires, self.clock = tuple(wires), clock

    def observe(self, key: str | None, *verdicts: Verdict) -> list[Trip]:
        now = self.clock()
        return [trip for wire in self.wires if (trip := wire.observe(key, verdicts, now)) is not None]


def wire_from_dict(entry: dict, where: str = "tripwire") -> Wire:
    """A wire from a guard file's ``tripwires`` entry (``kind`` and the wire's fields)."""
    from safetylab.core.config import config_from_dict

    if not isinstance(entry, dict) or entry.get("kind") not in WIRES:
        got = entry.get("kind") if isinstance(entry, dict) else type(entry).__name__
        raise SafetylabError(f"{where}: kind is {got!r}; expected one of {', '.join(WIRES)}")
    fields = {k: v for k, v in entry.items() if k != "kind"}
    if any(k.startswith("_") for k in fields):
        raise SafetylabError(f"{where}: unknown key {next(k for k in fields if k.startswith('_'))!r}")
    return config_from_dict(WIRES[entry["kind"]], fields, where)


__all__ = ["ACTIONS", "OutputAnomaly", "RepeatedAttempts", "ScoreSpike", "Trip", "Tripwires", "Wire", "WIRES",
           "wire_from_dict"]
