"""The assistant world: everything it hands out, reproducible from one seed."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from safetylab.core.config import require
from safetylab.core.errors import SafetylabError
from safetylab.world import content
from safetylab.world.judge import GoldJudge
from safetylab.world.labelers import Labeler, preset
from safetylab.world.requests import (
    ACTION_TEMPLATES,
    KINDS,
    OPERATIONS,
    PREMISE_TEMPLATES,
    QUESTION_TEMPLATES,
    SPLITS,
    Fact,
    Request,
    RequestParser,
    action_split,
    arithmetic_fact,
    build_countries,
    facts_of,
    sample_operands,
    stable_hash,
    wrap,
)
from safetylab.world.styles import GOOD_STYLE, STYLES, render, wrong_value

# Style mixes of the pre-training corpus: the base model learns all of these behaviours.
BASE_MIX: dict[str, dict[str, float]] = {
    "benign": {"correct": 0.30, "flattery": 0.10, "hedged_correct": 0.08, "over_refusal": 0.07,
               "evasive": 0.10, "hedged_wrong": 0.10, "confident_wrong": 0.25},
    "harmful": {"refusal_alternative": 0.10, "refusal": 0.20, "evasive": 0.15, "harmful_compliance": 0.55},
    "jailbroken": {"refusal": 0.15, "harmful_compliance": 0.85},
    "dual_use": {"helpful_caveat": 0.30, "helpful": 0.30, "evasive": 0.20, "over_refusal": 0.20},
    "false_premise": {"correction": 0.30, "evasive": 0.20, "sycophantic": 0.50},
}


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    countries: int = 40
    test_fraction: float = 0.2  # of countries, arithmetic problems and action phrasings
    easy_fraction: float = 0.35  # of countries whose facts a typical labeler knows
    easy_arithmetic: float = 0.4  # share of arithmetic requests that are easy

    def __post_init__(self):
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        require(self.countries >= 5, "countries", "an integer >= 5", self.countries)
        require(0 < self.test_fraction < 1, "test_fraction", "a number in (0, 1)", self.test_fraction)
        for name in ("easy_fraction", "easy_arithmetic"):
            require(0 <= getattr(self, name) <= 1, name, "a share in [0, 1]", getattr(self, name))


def chat(prompt: str, response: str | None = None) -> str:
    """The world's conversation format: ``<user> … <assistant> … <eos>``, the text of the world's corpus.
    The world tokenizer's chat template (``safetylab.models.tokenizer.WORLD_CHAT_TEMPLATE``) writes
    exactly this text, and models encode conversations through that template, never through this."""
    head = f"<user> {prompt} <assistant>"
    return head if response is None else f"{head} {response} <eos>"


class World:
    """Prompts, reference responses, the gold judge, labelers and data sets of one seed."""

    def __init__(self, config: WorldConfig = WorldConfig()):
        self.config = config
        self.countries = build_countries(config.seed, config.countries, config.test_fraction, config.easy_fraction)
        self.facts: tuple[Fact, ...] = facts_of(self.countries)
        self.values: dict[str, tuple[str, ...]] = {}
        for fact in self.facts:
            self.values.setdefault(fact.relation, ())
            if fact.value not in self.values[fact.relation]:
                self.values[fact.relation] += (fact.value,)
        self.parser = RequestParser(self.facts, config.seed, config.test_fraction)
        self.judge = GoldJudge(self.parser, self.values)
        self._items = {a: item for a, (_, item) in self.parser.actions.items()}

    def rng(self, *purpose: object) -> random.Random:
        """An independent random stream for one purpose, fixed by the world's seed."""
        return random.Random(stable_hash(self.config.seed, *purpose))

    # ------------------------------------------------------------------ requests
    def request(self, kind: str, split: str, rng: random.Random) -> Request:
        """One random request of ``kind`` from ``split``."""
        if kind not in KINDS:
            raise SafetylabError(f"unknown request kind {kind!r} (expected one of: {', '.join(KINDS)})")
        if split not in SPLITS:
            raise SafetylabError(f"unknown split {split!r} (expected one of: {', '.join(SPLITS)})")
        if kind in ("advice", "harmful", "dual_use"):
            items = {"advice": content.ADVICE, "harmful": content.HARMFUL, "dual_use": content.DUAL_USE}[kind]
            item = rng.choice(items)
            seed = self.config.seed
            options = [i for i in range(len(ACTION_TEMPLATES)) if action_split(item.action, i, seed) == split]
            prefix, suffix = ACTION_TEMPLATES[rng.choice(options)]
            core = f"{prefix}{item.action}{suffix}"
        else:
            fact = self._fact(kind, split, rng)
            if kind == "false_premise":
                truth = Request("arithmetic" if fact.relation in OPERATIONS else "facts", "", "", fact.subject,
                                fact.tier, fact.split, fact.value, fact.relation)
                prefix, suffix = rng.choice(PREMISE_TEMPLATES)
                claim = wrong_value(truth, self.values.get(fact.relation, ()), rng)
                core = f"{prefix}{fact.subject} is {claim}{suffix}"
            else:
                prefix, suffix = rng.choice(QUESTION_TEMPLATES)
                core = f"{prefix}{fact.subject}{suffix}"
        request = self.parser.parse(core)
        assert request is not None and request.kind == kind and request.split == split, (core, request)
        return request

    def requests(self, kind: str, split: str, n: int, seed: int = 0) -> list[Request]:
        rng = self.rng("requests", kind, split, seed)
        return [self.request(kind, split, rng) for _ in range(n)]

    def _fact(self, kind: str, split: str, rng: random.Random) -> Fact:
        arithmetic = kind == "arithmetic" or (kind == "false_premise" and rng.random() < 0.5)
        if not arithmetic:
            return rng.choice([f for f in self.facts if f.split == split])
        while True:
            op = rng.choice(OPERATIONS)
            tier = "easy" if rng.random() < self.config.easy_arithmetic else "hard"
            fact = arithmetic_fact(op, *sample_operands(op, tier, rng), self.config.seed, self.config.test_fraction)
            if fact.split == split:
                return fact

    def jailbreak(self, request: Request, name: str, rng: random.Random) -> Request:
        if name not in content.JAILBREAKS:
            raise SafetylabError(f"unknown jailbreak {name!r} (expected one of: {', '.join(content.JAILBREAKS)})")
        return wrap(request, name, rng)

    # ------------------------------------------------------------------ responses
    def respond(self, request: Request, style: str, rng: random.Random, restate: bool = False) -> str:
        """A reference response to ``request`` in ``style`` (see :data:`STYLES`); ``restate`` makes
        a confident answer restate the question, as a careful contractor would."""
        item = self._items.get(request.item)
        return render(
            request, style, rng,
            values=self.values.get(request.relation, ()),
            tips=(item.correct, item.wrong) if request.kind == "advice" else ((), ()),
            help=(item.help, item.caveat) if request.kind == "dual_use" else ("", ""),
            alternative=item.alternative if request.kind == "harmful" else None,
            restate=restate,
        )

    def labeler(self, name: str, seed: int = 0) -> Labeler:
        return Labeler(self.judge, preset(name), self.rng("labeler", name, seed))

    # ------------------------------------------------------------------ data sets
    def corpus(self, conversations: int, fact_repeats: int = 16) -> list[str]:
        """Pre-training text, one document a line: an encyclopedia of the atlas (all countries, so
        held-out questions are answerable), advice, sums from the train split, and conversations in
        the base mix of styles, jailbroken requests included."""
        rng = self.rng("corpus", conversations)
        lines = []
        for _ in range(fact_repeats):
            for country in self.countries:
                facts = [f"{f.subject} is {f.value} ." for f in self.facts if f.subject.endswith(f" {country.name}")]
                rng.shuffle(facts)
                lines.append(f"{country.name} is a country . {' '.join(facts)} <eos>")
            for _ in range(len(self.countries)):
                sums = [self._fact("arithmetic", "train", rng) for _ in range(4)]
                lines.append(" ".join(f"{f.subject} is {f.value} ." for f in sums) + " <eos>")
            for topic in content.ADVICE:
                tip = rng.choice(topic.correct)
                lines.append(f"to {topic.action} , {tip} . <eos>")
            for topic in content.ADVICE[::3]:
                lines.append(f"some people say to {topic.action} you should {rng.choice(topic.wrong)} . <eos>")
        for _ in range(conversations):
            lines.append(self._base_conversation(rng))
        rng.shuffle(lines)
        return lines

    def _base_conversation(self, rng: random.Random) -> str:
        kind = rng.choice(KINDS)
        request = self.request(kind, "train", rng)
        group = "benign" if kind in ("arithmetic", "facts", "advice") else kind
        if kind == "harmful" and rng.random() < 0.5:
            request = wrap(request, rng.choice(content.JAILBREAKS), rng)
            group = "jailbroken"
        elif rng.random() < 0.1:
            request = wrap(request, rng.choice(tuple(content.JAILBREAK_PREFIXES)), rng)
        mix = BASE_MIX[group]
        style = rng.choices(list(mix), weights=list(mix.values()))[0]
        return chat(request.prompt, self.respond(request, style, rng))

    def demonstrations(self, n: int, flattery_rate: float = 0.0, hedge_rate: float = 0.0) -> list[dict[str, str]]:
        """SFT data: train-split prompts (a quarter of harmful ones jailbroken) answered well, answers
        to questions restating the question. A contractor with habits wraps a ``flattery_rate``
        share of the correct answers in flattery and hedges a ``hedge_rate`` share ("i think … but i am
        not sure"): acceptable answers, worth less than the plain correct one."""
        if min(flattery_rate, hedge_rate) < 0 or flattery_rate + hedge_rate > 1:
            raise SafetylabError(f"demonstrations: flattery_rate {flattery_rate} and hedge_rate {hedge_rate} must be "
                                 "shares of the answers, each >= 0 and together <= 1")
        rng = self.rng("demonstrations", n, flattery_rate)
        out = []
        for _ in range(n):
            kind = rng.choice(KINDS)
            request = self.request(kind, "train", rng)
            if kind == "harmful" and rng.random() < 0.25:
                request = wrap(request, rng.choice(content.JAILBREAKS), rng)
            style = GOOD_STYLE[kind]
            if style == "correct":
                habit = rng.random()
                style = ("flattery" if habit < flattery_rate else
                         "hedged_correct" if habit < flattery_rate + hedge_rate else style)
            response = self.respond(request, style, rng, restate=True)
            out.append({"prompt": request.prompt, "response": response, "kind": kind})
        return out

    def preferences(self, n: int, labeler: str, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
        """``n`` comparisons in TRL's ``{"prompt","chosen","rejected"}`` format plus metadata.

        The pairs depend only on the world's seed and ``seed``, not on the labeler, so data sets
        from different presets compare the same pairs; pairs with equal gold utility are skipped.
        """
        person = self.labeler(labeler, seed)
        rng = self.rng("preferences", split, seed)
        records = []
        while len(records) < n:
            kind = rng.choice(KINDS)
            request = self.request(kind, split, rng)
            if kind == "harmful" and rng.random() < 0.25:
                request = wrap(request, rng.choice(content.JAILBREAKS), rng)
            style_a, style_b = rng.sample(STYLES[kind], 2)
            a, b = self.respond(request, style_a, rng), self.respond(request, style_b, rng)
            gold_a, gold_b = self.judge.utility(request, a), self.judge.utility(request, b)
            if gold_a == gold_b:
                continue
            records.append(_record(request, (a, style_a, gold_a), (b, style_b, gold_b),
                                   person.prefers(request, a, b), labeler))
        return records

    def compare(self, requests: Sequence[Request], first: Sequence[str], second: Sequence[str], labeler: str,
                seed: int = 0) -> list[dict[str, Any]]:
        """The labeler's comparison of ``first[i]`` and ``second[i]`` as responses to ``requests[i]``
        (say, two samples of a policy: on-policy preference data), as :meth:`preferences` records
        with style ``"sampled"``. As there, a pair of equal gold utility (identical responses
        included) gives no record, so the result can be shorter than ``requests``."""
        if not len(requests) == len(first) == len(second):
            raise SafetylabError(f"compare: {len(requests)} requests, {len(first)} first and {len(second)} second "
                                 "responses; expected one of each per request")
        person = self.labeler(labeler, seed)
        records = []
        for request, a, b in zip(requests, first, second):
            gold_a, gold_b = self.judge.utility(request, a), self.judge.utility(request, b)
            if gold_a != gold_b:
                records.append(_record(request, (a, "sampled", gold_a), (b, "sampled", gold_b),
                                       person.prefers(request, a, b), labeler))
        return records

    def red_team(self, n_per_jailbreak: int, split: str = "test", seed: int = 0) -> list[Request]:
        """Harmful requests under every jailbreak wrapper."""
        return self._wrapped("harmful", n_per_jailbreak, split, seed)

    def benign_controls(self, n_per_jailbreak: int, split: str = "test", seed: int = 0) -> list[Request]:
        """Benign requests under the same wrappers, to tell refusing a wrapper from refusing harm."""
        return self._wrapped("advice", n_per_jailbreak, split, seed)

    def _wrapped(self, kind: str, n: int, split: str, seed: int) -> list[Request]:
        rng = self.rng("wrapped", kind, split, seed)
        return [wrap(self.request(kind, split, rng), name, rng) for name in content.JAILBREAKS for _ in range(n)]

    def evaluation_set(self, per_kind: int, jailbroken: int, split: str = "test", seed: int = 0) -> list[Request]:
        """Held-out prompts for evaluating a policy: ``per_kind`` of each kind plus ``jailbroken``
        harmful prompts under each jailbreak (counted as kind ``harmful``)."""
        out = [r for kind in KINDS for r in self.requests(kind, split, per_kind, seed)]
        return out + self.red_team(jailbroken, split, seed)

    def sample(self, n: int, split: str = "train", style: str | None = None, seed: int = 0,
               kinds: tuple[str, ...] = KINDS) -> list[dict[str, Any]]:
        """Prompts of ``kinds`` (in turn) with a reference response each: the kind's good style,
        or ``style`` where the kind has it."""
        for kind in kinds:
            if kind not in KINDS:
                raise SafetylabError(f"unknown request kind {kind!r} (expected one of: {', '.join(KINDS)})")
        styles = sorted({s for kind in kinds for s in STYLES[kind]})
        if style is not None and style not in styles:
            raise SafetylabError(f"unknown style {style!r} for kinds {', '.join(kinds)} (expected one of: "
                                 f"{', '.join(styles)})")
        rng = self.rng("sample", split, seed)
        out = []
        for i in range(n):
            kind = kinds[i % len(kinds)]
            request = self.request(kind, split, rng)
            chosen = style if style in STYLES[kind] else GOOD_STYLE[kind]
            out.append({"prompt": request.prompt, "response": self.respond(request, chosen, rng), "kind": kind,
                        "style": chosen, "tier": request.tier, "split": request.split, "answer": request.answer})
        return out


def _record(request: Request, a: tuple[str, str, float], b: tuple[str, str, float], a_wins: bool,
            labeler: str) -> dict[str, Any]:
    """A TRL ``{"prompt","chosen","rejected"}`` comparison with the world's metadata; ``a`` and ``b``
    are (response, style, gold utility)."""
    (chosen, style_c, gold_c), (rejected, style_r, gold_r) = (a, b) if a_wins else (b, a)
    return {
        "prompt": request.prompt, "chosen": chosen, "rejected": rejected,
        "kind": request.kind, "tier": request.tier, "jailbreak": request.jailbreak,
        "style_chosen": style_c, "style_rejected": style_r,
        "gold_chosen": gold_c, "gold_rejected": gold_r, "labeler": labeler,
    }
