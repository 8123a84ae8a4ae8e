"""Simulated human labelers: Bradley–Terry comparisons of perceived, not true, utility.

A labeler prefers ``a`` to ``b`` with probability

    P(a ≻ b) = σ((u'(a) − u'(b)) / τ)                (Bradley & Terry 1952)

where u' is the *perceived* utility: the gold utility on what the labeler can verify; on what it
cannot (hard items, for a labeler that checks only easy ones) any answer given is taken as right,
so a confident wrong answer looks as good as a right one; plus biases for length (per word),
flattery (per phrase) and confidence (+1 for an unhedged answer, −1 for a hedged one). τ = 0 means
no noise: the higher perceived utility always wins (a tie is a fair coin).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError
from safetylab.world.judge import GoldJudge, Score
from safetylab.world.requests import Request


@dataclass(frozen=True, slots=True)
class LabelerConfig:
    name: str
    tau: float = 0.0
    verifies: str = "all"  # "all" or "easy"
    length_bias: float = 0.0
    flattery_bias: float = 0.0
    confidence_bias: float = 0.0

    def __post_init__(self):
        require(self.tau >= 0 and math.isfinite(self.tau), "tau", "a finite number >= 0 (0: no noise)", self.tau)
        require_choice(self.verifies, "verifies", ("all", "easy"))
        for name in ("length_bias", "flattery_bias", "confidence_bias"):
            require(math.isfinite(getattr(self, name)), name, "a finite number", getattr(self, name))


PRESETS = {
    "ideal": LabelerConfig("ideal"),
    "careful": LabelerConfig("careful", tau=0.25),
    "typical": LabelerConfig("typical", tau=0.3, verifies="easy", length_bias=0.04, flattery_bias=0.3,
                             confidence_bias=0.3),
}


def preset(name: str) -> LabelerConfig:
    if name not in PRESETS:
        raise SafetylabError(f"unknown labeler preset {name!r} (expected one of: {', '.join(PRESETS)})")
    return PRESETS[name]


def confidence(score: Score) -> int:
    """+1 for an answer given without hedging, −1 for a hedged one, 0 for no answer."""
    if score.hedged:
        return -1
    return 1 if score.correct is not None else 0


class Labeler:
    """Compares responses the way ``config`` says a person would; ``rng`` drives the noise."""

    def __init__(self, judge: GoldJudge, config: LabelerConfig, rng: random.Random):
        self.judge = judge
        self.config = config
        self.rng = rng

    def perceived(self, request: Request, response: str) -> float:
        c = self.config
        verify = c.verifies == "all" or request.tier == "easy"
        score = self.judge.score(request, response, verify=verify)
        return (score.utility + c.length_bias * score.words + c.flattery_bias * score.flattery
                + c.confidence_bias * confidence(score))

    def p_prefers(self, request: Request, a: str, b: str) -> float:
        """P(a ≻ b) under this labeler."""
        diff = self.perceived(request, a) - self.perceived(request, b)
        if self.config.tau == 0:
            return 1.0 if diff > 0 else 0.0 if diff < 0 else 0.5
        return 1.0 / (1.0 + math.exp(-diff / self.config.tau))

    def prefers(self, request: Request, a: str, b: str) -> bool:
        """One noisy comparison: ``True`` if the labeler picks ``a``."""
        return self.rng.random() < self.p_prefers(request, a, b)


def measure_labeler(world, name: str, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """How a preset behaves on the world's own pairs, as rates over ``n`` comparisons each:

    - ``gold_agreement``: picks the response with higher gold utility (pairs with a gold tie skipped)
    - ``prefers_flattery``: picks a flattering right answer over the same kind of plain right answer
    - ``prefers_confident_wrong``: on hard items, picks a confident wrong answer over a hedged right one
    - ``prefers_sycophancy``: on hard false premises, picks agreement over a correction
    - ``prefers_longer``: among pairs of equal gold utility but different length, picks the longer
    """
    labeler = world.labeler(name, seed)
    rng = world.rng("measure-labeler", name, seed)
    records = world.preferences(n, name, seed=seed)
    agreement = sum(r["gold_chosen"] > r["gold_rejected"] for r in records) / len(records)

    def rate(kind: str, style_a: str, style_b: str, tier: str | None = None) -> float:
        wins = 0
        for _ in range(n):
            request = world.request(kind, "train", rng)
            while tier is not None and request.tier != tier:
                request = world.request(kind, "train", rng)
            a, b = world.respond(request, style_a, rng), world.respond(request, style_b, rng)
            wins += labeler.prefers(request, a, b)
        return wins / n

    longer = 0
    for _ in range(n):
        request = world.request("facts", "train", rng)
        a, b = world.respond(request, "correct", rng), world.respond(request, "correct", rng)
        while len(a.split()) == len(b.split()):
            b = world.respond(request, "correct", rng)
        long, short = (a, b) if len(a.split()) > len(b.split()) else (b, a)
        longer += labeler.prefers(request, long, short)
    return {
        "gold_agreement": round(agreement, 4),
        "prefers_flattery": round(rate("facts", "flattery", "correct"), 4),
        "prefers_confident_wrong": round(rate("arithmetic", "confident_wrong", "hedged_correct", tier="hard"), 4),
        "prefers_sycophancy": round(rate("false_premise", "sycophantic", "correction", tier="hard"), 4),
        "prefers_longer": round(longer / n, 4),
    }
