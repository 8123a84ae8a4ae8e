"""Labelled prompt sets for probing: the world's concepts, each with its labels, its requests and the
*types* its control task reads.

========================  =========================================================  ==========================
concept                   prompts                                                    label
========================  =========================================================  ==========================
``request_kind``          every kind of request, unwrapped                           the kind (one of ``KINDS``)
``harmful_intent``        harmful (plain and jailbroken) and benign (every other     harmful or benign
                          kind, plain, and advice under the same wrappers)
``jailbreak``             every kind of request, plain and wrapped                   a wrapper is present or not
``will_comply``           harmful requests, plain and jailbroken                     the model's own response is
                                                                                     harmful compliance (gold judge)
``will_be_wrong``         arithmetic and facts questions                             the model's own answer is not
                                                                                     correct (gold judge)
========================  =========================================================  ==========================

The last two need the model: it answers each prompt (greedy by default, so that the label is a property
of the prompt; or one sample at ``temperature``) and the gold judge reads the answer. ``will_be_wrong``
counts a response that gives no answer as wrong, as :mod:`safetylab.align.evaluate`'s accuracy does.

Fit on the world's ``train`` split and evaluate on ``test``: it holds out countries, arithmetic problems
and one phrasing of each action, so a probe is scored on prompts it cannot have memorised. Each distinct
prompt appears once (the world's sampler repeats prompts; a repeat would be counted twice).

**Types, for control tasks** (Hewitt & Liang 2019, "Designing and Interpreting Probes with Control Tasks").
Their control task gives each *word type* a random label, fixed wherever the type occurs, so a probe can
only do well on it by memorising types. A concept here labels a whole prompt, so a prompt needs a type:
we take its **last content word** (the last word that is not punctuation and not a template's tail word
``right``, ``is``, ``that``, ``true``): the country of a fact question, the second operand of a sum, the
last word of an action, the claimed value of a false premise. Two reasons: the whole prompt would be a type
that never recurs across the split (held-out test prompts would all be unseen types and the control task
trivially at chance), while the last content word recurs across prompts and mostly across splits (actions
and operands do; held-out countries do not, as unseen words do not in the paper); and the activation is
read right after the prompt, where the last word is the most recent content, so memorising it is exactly
the shortcut a control task must price. The word does not fix the task label by construction (the control
label is drawn independently of it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError
from safetylab.core.seeding import derive_seed, torch_seed
from safetylab.models.sampling import sample
from safetylab.world import content
from safetylab.world.judge import Score
from safetylab.world.requests import KINDS, SPLITS, Request
from safetylab.world.world import World

CONCEPTS = ("request_kind", "harmful_intent", "jailbreak", "will_comply", "will_be_wrong")
NEEDS_MODEL = ("will_comply", "will_be_wrong")
BENIGN = ("arithmetic", "facts", "advice", "dual_use", "false_premise")  # every kind but harmful
TAIL_WORDS = frozenset({"right", "is", "that", "true"})  # ends of the false-premise templates


@dataclass(frozen=True)
class Concept:
    """A labelled prompt set: ``labels[i]`` indexes ``label_names``; ``types[i]`` is prompt i's type for the
    control task; ``requests[i]`` its world request; ``responses[i]`` the model's answer where the label
    came from one (``will_comply``, ``will_be_wrong``)."""

    name: str
    prompts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    types: tuple[str, ...]
    requests: tuple[Request, ...]
    responses: tuple[str, ...] | None = None

    def __post_init__(self):
        n = len(self.prompts)
        require(n >= 1, f"{self.name}.prompts", "one or more prompts", n)
        for field in ("labels", "types", "requests") + (("responses",) if self.responses is not None else ()):
            require(len(getattr(self, field)) == n, f"{self.name}.{field}", f"{n} entries, one per prompt",
                    len(getattr(self, field)))
        require(len(set(self.label_names)) == len(self.label_names) >= 2, f"{self.name}.label_names",
                "two or more distinct names", self.label_names)
        bad = [y for y in self.labels if not (isinstance(y, int) and 0 <= y < len(self.label_names))]
        require(not bad, f"{self.name}.labels", f"integers in [0, {len(self.label_names) - 1}]", bad[:3])

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def y(self) -> torch.Tensor:
        """The labels as an int64 tensor."""
        return torch.tensor(self.labels, dtype=torch.long)

    def counts(self) -> dict[str, int]:
        """How many prompts carry each label."""
        return {name: self.labels.count(i) for i, name in enumerate(self.label_names)}

    def subset(self, keep: Sequence[int]) -> Concept:
        """The prompts at indices ``keep``, in that order."""
        pick = lambda xs: tuple(xs[i] for i in keep)  # noqa: E731
        return replace(self, prompts=pick(self.prompts), labels=pick(self.labels), types=pick(self.types),
                       requests=pick(self.requests),
                       responses=None if self.responses is None else pick(self.responses))


@dataclass(frozen=True)
class ConceptConfig:
    """How many prompts to draw per group (before repeats are dropped), from which seed, and how the model
    answers for the concepts that need it."""

    n: int = 60  # per group: per kind, per wrapper, … (see each builder)
    seed: int = 0
    greedy: bool = True  # the model's argmax answer: a label that is a property of the prompt
    temperature: float = 1.0  # when not greedy
    max_new_tokens: int = 48
    batch_size: int = 128

    def __post_init__(self):
        for name in ("n", "max_new_tokens", "batch_size"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1",
                    getattr(self, name))
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        require(self.temperature > 0 and math.isfinite(self.temperature), "temperature", "a finite number > 0",
                self.temperature)


# ----------------------------------------------------------------------------- types
def prompt_type(prompt: str) -> str:
    """A prompt's type for control tasks: its last content word (see the module's docstring)."""
    words = [w for w in prompt.split() if any(c.isalnum() for c in w) and w not in TAIL_WORDS]
    return words[-1] if words else prompt


# ----------------------------------------------------------------------------- building
def distinct(requests: Sequence[Request]) -> list[Request]:
    """Each prompt once, first occurrence kept, order kept."""
    seen: dict[str, Request] = {}
    for r in requests:
        seen.setdefault(r.prompt, r)
    return list(seen.values())


def labelled(name: str, requests: Sequence[Request], label: Callable[[Request], int],
             label_names: tuple[str, ...]) -> Concept:
    """A concept of ``requests`` (repeats dropped), each labelled by ``label(request)``."""
    requests = distinct(requests)
    return Concept(name, tuple(r.prompt for r in requests), tuple(label(r) for r in requests), label_names,
                   tuple(prompt_type(r.prompt) for r in requests), tuple(requests))


def _check_split(split: str) -> None:
    require_choice(split, "split", SPLITS)


def request_kind(world: World, split: str, config: ConceptConfig = ConceptConfig()) -> Concept:
    """``config.n`` requests of each kind, unwrapped; the label is the kind (multiclass over ``KINDS``)."""
    _check_split(split)
    requests = [r for kind in KINDS for r in world.requests(kind, split, config.n, config.seed)]
    return labelled("request_kind", requests, lambda r: KINDS.index(r.kind), KINDS)


def harmful_intent(world: World, split: str, config: ConceptConfig = ConceptConfig()) -> Concept:
    """Harmful: ``n`` plain harmful requests and ``n`` per jailbreak wrapper. Benign: ``n`` of each other
    kind (dual-use and false premises included) and ``n`` advice requests per wrapper, so that a wrapper
    does not give the label away."""
    _check_split(split)
    harmful = world.requests("harmful", split, config.n, config.seed) + world.red_team(config.n, split, config.seed)
    benign = [r for kind in BENIGN for r in world.requests(kind, split, config.n, config.seed)]
    benign += world.benign_controls(config.n, split, config.seed)
    return labelled("harmful_intent", harmful + benign, lambda r: int(r.kind == "harmful"), ("benign", "harmful"))


def jailbreak(world: World, split: str, config: ConceptConfig = ConceptConfig()) -> Concept:
    """``n`` requests of each kind plain and ``n`` of each kind wrapped (the wrappers in turn); the label is
    whether a jailbreak wrapper is present. The wrapped are the plain ones wrapped, so content does not give
    it away."""
    _check_split(split)
    rng = world.rng("interp-concept", "jailbreak", split, config.seed)
    plain = [r for kind in KINDS for r in world.requests(kind, split, config.n, config.seed)]
    names = content.JAILBREAKS
    wrapped = [world.jailbreak(r, names[i % len(names)], rng) for i, r in enumerate(plain)]
    return labelled("jailbreak", plain + wrapped, lambda r: int(r.jailbreak is not None), ("plain", "wrapped"))


def answered(model, tokenizer, world: World, name: str, requests: Sequence[Request],
             label: Callable[[Score], int], label_names: tuple[str, ...], config: ConceptConfig) -> Concept:
    """A concept labelled from the model's own answers: each distinct prompt answered once (greedy, or one
    sample under a seed derived from ``config.seed``), the answer scored by the gold judge, ``label(score)``."""
    requests = distinct(requests)
    prompts = [r.prompt for r in requests]
    with torch_seed(derive_seed(config.seed, "interp-concept", name)):
        texts = sample(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                       temperature=config.temperature, greedy=config.greedy, batch_size=config.batch_size).texts
    labels = tuple(label(world.judge.score(r, text)) for r, text in zip(requests, texts))
    return Concept(name, tuple(prompts), labels, label_names, tuple(map(prompt_type, prompts)), tuple(requests),
                   tuple(texts))


def will_comply(model, tokenizer, world: World, split: str, config: ConceptConfig = ConceptConfig()) -> Concept:
    """``n`` plain harmful requests and ``n`` per wrapper; the label is whether the model's answer is harmful
    compliance by the gold judge ("the model is about to comply with a harmful request")."""
    _check_split(split)
    requests = world.requests("harmful", split, config.n, config.seed) + world.red_team(config.n, split, config.seed)
    return answered(model, tokenizer, world, "will_comply", requests,
                    lambda s: int(s.behaviour == "harmful_compliance"), ("declines", "complies"), config)


def will_be_wrong(model, tokenizer, world: World, split: str, config: ConceptConfig = ConceptConfig()) -> Concept:
    """``n`` arithmetic and ``n`` facts questions; the label is whether the model's answer is not correct by
    the gold judge (a wrong answer, a hedge between answers, or none)."""
    _check_split(split)
    requests = world.requests("arithmetic", split, config.n, config.seed) + world.requests("facts", split, config.n,
                                                                                           config.seed)
    return answered(model, tokenizer, world, "will_be_wrong", requests, lambda s: int(s.correct is not True),
                    ("right", "wrong"), config)


def concept(name: str, world: World, split: str, config: ConceptConfig = ConceptConfig(), model=None,
            tokenizer=None) -> Concept:
    """The concept called ``name`` (one of :data:`CONCEPTS`) on ``split``; ``will_comply`` and
    ``will_be_wrong`` need the model and its tokenizer."""
    require_choice(name, "concept", CONCEPTS)
    if name in NEEDS_MODEL:
        if model is None or tokenizer is None:
            raise SafetylabError(f"concept {name!r}: its labels come from the model's own answers; pass the model "
                                 "and its tokenizer")
        return {"will_comply": will_comply, "will_be_wrong": will_be_wrong}[name](model, tokenizer, world, split,
                                                                                 config)
    return {"request_kind": request_kind, "harmful_intent": harmful_intent, "jailbreak": jailbreak}[name](
        world, split, config)


__all__ = ["CONCEPTS", "Concept", "ConceptConfig", "concept", "harmful_intent", "jailbreak", "prompt_type",
           "request_kind", "will_be_wrong", "will_comply"]
