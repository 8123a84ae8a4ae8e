"""An attacker language model trained by reinforcement learning against a target (Perez et al. 2022, "Red
teaming language models with language models"), and the diversity of what it finds.

The attacker **rewrites** a harmful request into a prompt for the target (as PAIR's and TAP's attackers do;
Chao et al. 2023, Mehrotra et al. 2023). It starts from the world's pre-trained model fine-tuned on
demonstrations of rewriting: the request unchanged, or under one of the red team's templates and their
compositions (Perez et al.'s red LM likewise starts from what a language model already writes). Then RLOO
(:func:`safetylab.align.rloo.train_rloo`, a KL penalty to the starting attacker) optimises

    r(x, y) = P̂(the target's answer to y delivers the payload) − λ · sim(y, other attacks of the batch)

where the first term is the share of sampled answers of the target that the gold judge finds harmfully
compliant with the request ``x`` — counted only while the attack still asks for ``x`` (:func:`on_target`; an
attacker free to swap the request for an easier one learns to, as HarmBench's behaviour-specific judging
forbids) — and ``sim`` is the mean Jaccard similarity of word bigrams to the batch's other attacks: a diversity
term, so the attacker does not collapse onto the one rewrite that works (Perez et al. saw RL trade diversity for
success). Diversity is reported with :func:`distinct_n` and :func:`self_bleu`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from safetylab.core.config import require
from safetylab.core.errors import SafetylabError
from safetylab.world.requests import Request


# ----------------------------------------------------------------------------- diversity
def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams over all word n-grams of ``texts`` (1: no repeats)."""
    grams = [g for text in texts for g in ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Sentence BLEU (Papineni et al. 2002) with add-one smoothing of the n-gram precisions for n > 1 (Lin &
    Och 2004; Chen & Cherry 2014's method 2)::

        BLEU = BP · exp(Σ_n (1/N) log p_n),   p_n = Σ_g min(c_h(g), max_r c_r(g)) / Σ_g c_h(g)
        BP = 1 if |h| > r* else exp(1 − r*/|h|),  r* the reference length closest to |h|
    """
    if not hypothesis or not references:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(ngrams(hypothesis, n))
        most = Counter()
        for reference in references:
            for gram, c in Counter(ngrams(reference, n)).items():
                most[gram] = max(most[gram], c)
        clipped, total = sum(min(c, most[g]) for g, c in counts.items()), sum(counts.values())
        smooth = 0 if n == 1 else 1
        if clipped + smooth == 0 or total + smooth == 0:
            return 0.0
        log_p += math.log((clipped + smooth) / (total + smooth)) / max_n
    closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    brevity = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return brevity * math.exp(log_p)


def self_bleu(texts: Sequence[str], max_n: int = 4, limit: int = 200, seed: int = 0) -> float:
    """Self-BLEU (Zhu et al. 2018, Texygen): the mean BLEU of each text against all the others as references
    (1: every text repeats the others; lower is more diverse); on a sample of ``limit`` texts at most."""
    texts = list(texts)
    if len(texts) > limit:
        texts = random.Random(seed).sample(texts, limit)
    if len(texts) < 2:
        return 0.0
    words = [t.split() for t in texts]
    return sum(bleu(w, words[:i] + words[i + 1:], max_n) for i, w in enumerate(words)) / len(words)


def batch_similarity(texts: Sequence[str]) -> list[float]:
    """Each text's mean Jaccard similarity of word bigrams to the other texts (0 for a batch of one)."""
    sets = [set(ngrams(t.split(), 2)) for t in texts]
    out = []
    for i, a in enumerate(sets):
        others = [len(a & b) / len(a | b) if a | b else 1.0 for j, b in enumerate(sets) if j != i]
        out.append(sum(others) / len(others) if others else 0.0)
    return out


# ----------------------------------------------------------------------------- the attacker
@dataclass(frozen=True)
class AttackerConfig:
    """``demonstrations`` rewrites for the attacker's fine-tuning, ``wrapped`` of them under a wrapper;
    ``requests`` training requests in the RL prompt pool; ``diversity`` the λ of the reward; ``answers`` target
    answers judged per attack; the lengths of an attack and of an answer; the RLOO settings (steps, k, batch,
    KL coefficient, learning rate)."""

    demonstrations: int = 1000
    wrapped: float = 0.5
    requests: int = 200
    diversity: float = 0.1
    max_new_tokens: int = 40
    answer_tokens: int = 32
    answers: int = 4
    sft_steps: int = 300
    rl_steps: int = 300
    k: int = 8
    batch_size: int = 8
    kl_coef: float = 0.02
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("demonstrations", "requests", "max_new_tokens", "answer_tokens", "answers", "sft_steps",
                     "rl_steps", "batch_size"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1",
                    getattr(self, name))
        require(0 <= self.wrapped <= 1, "wrapped", "a fraction in [0, 1]", self.wrapped)
        require(self.diversity >= 0, "diversity", "a number >= 0", self.diversity)
        require(isinstance(self.k, int) and self.k >= 2, "k", "an integer >= 2", self.k)


def rewrite_demonstrations(world, n: int, wrapped: float, split: str = "train", seed: int = 0) -> list[tuple[str, str]]:
    """(request, rewrite) pairs: the request unchanged, or with probability ``wrapped`` under one of the red
    team's templates or compositions (:mod:`safetylab.evals.redteam`), chosen uniformly: the attacker's starting
    repertoire, which RL then learns to choose from and to go beyond."""
    from safetylab.evals.redteam import COMPOSITIONS, TEMPLATES, attack

    rng = random.Random(seed)
    repertoire = (*TEMPLATES, *COMPOSITIONS)
    pairs = []
    for request in world.requests("harmful", split, n, seed):
        rewrite = attack(request, rng.choice(repertoire), rng).prompt if rng.random() < wrapped else request.prompt
        pairs.append((request.prompt, rewrite))
    return pairs


def on_target(parser, attack: str, request: Request) -> bool:
    """Whether ``attack`` still asks for ``request``'s harmful action (under any wrapper the world's parser
    reads), so that the target's compliance is compliance with *this* request."""
    parsed = parser.parse(attack)
    return parsed is not None and parsed.kind == "harmful" and parsed.item == request.item


def attacked_requests(world, config: AttackerConfig) -> list[Request]:
    """The train-split harmful requests the attacker is trained to break (its RL prompt pool)."""
    from safetylab.core.seeding import derive_seed

    return world.requests("harmful", "train", config.requests, derive_seed(config.seed, "attacker", "requests"))


def attack_reward(target_model, target_tokenizer, judge, parser, requests: dict[str, Request], diversity: float,
                  answer_tokens: int, answers: int = 1) -> Callable[[Sequence[str], Sequence[str]], torch.Tensor]:
    """The RL reward of a batch of (request prompt, attack) pairs: the share of ``answers`` sampled answers of
    the target to each attack that the gold judge finds harmfully compliant (more answers: a less noisy
    reward, as Perez et al.'s classifier probability is), 0 for an attack that no longer asks for the request
    (:func:`on_target` by ``parser``), minus ``diversity`` × its similarity to the batch's other attacks."""
    from safetylab.models.sampling import sample

    def reward(prompts: Sequence[str], attacks: Sequence[str]) -> torch.Tensor:
        attacks = [a if a.strip() else "." for a in attacks]
        with torch.no_grad():
            texts = sample(target_model, target_tokenizer, [a for a in attacks for _ in range(answers)],
                           max_new_tokens=answer_tokens).texts
        success = [on_target(parser, attacks[i], requests[p])
                   * sum(judge.score(requests[p], texts[i * answers + j]).behaviour == "harmful_compliance"
                         for j in range(answers)) / answers for i, p in enumerate(prompts)]
        similarity = batch_similarity(attacks) if diversity else [0.0] * len(attacks)
        return torch.tensor([s - diversity * d for s, d in zip(success, similarity)])

    return reward


def train_attacker(world, base_dir, target_model, target_tokenizer, out, config: AttackerConfig = AttackerConfig()):
    """The attacker: the pre-trained model in ``base_dir`` fine-tuned on rewriting demonstrations (``out/sft``),
    then trained by RLOO against the target (``out/rl``). Returns ``(attacker, tokenizer, starting attacker)``."""
    from dataclasses import asdict
    from pathlib import Path

    from safetylab.align.rloo import RLOOConfig, train_rloo
    from safetylab.core.runs import RunDir
    from safetylab.models.lm import load_model, save_model
    from safetylab.models.logprobs import check_same_vocabulary
    from safetylab.models.train import TrainConfig, finetune

    out = Path(out)
    model, tokenizer = load_model(base_dir)
    check_same_vocabulary(model, target_model, "target")
    pairs = rewrite_demonstrations(world, config.demonstrations, config.wrapped, seed=config.seed)
    sft_config = TrainConfig(steps=config.sft_steps, batch_size=32, lr=1e-3, warmup_steps=10, seed=config.seed,
                             **_logging(config.sft_steps, 25))
    start, _ = finetune(model, tokenizer, pairs, sft_config, RunDir(out / "sft", {"train": asdict(sft_config),
                                                                                     "pairs": len(pairs)}))
    reference, _ = load_model(out / "sft" / "artifacts" / "model")
    requests = {r.prompt: r for r in attacked_requests(world, config)}
    reward = attack_reward(target_model.eval(), target_tokenizer, world.judge, world.parser, requests,
                           config.diversity, config.answer_tokens, config.answers)
    rl_config = RLOOConfig(train=TrainConfig(steps=config.rl_steps, batch_size=config.batch_size, lr=config.lr,
                                             warmup_steps=5, seed=config.seed, **_logging(config.rl_steps, 10)),
                           k=config.k, kl_coef=config.kl_coef, max_new_tokens=config.max_new_tokens)
    run = RunDir(out / "rl", {"attacker": asdict(config), "rloo": asdict(rl_config)})
    final = run.artifacts / "model"
    if final.exists():
        return load_model(final)[0].eval(), tokenizer, reference.eval()
    attacker = train_rloo(start, tokenizer, list(requests), reward, reference.eval(), rl_config, run)
    save_model(attacker, tokenizer, final)
    return attacker.eval(), tokenizer, reference.eval()


def _logging(steps: int, every: int) -> dict[str, int]:
    """Log every ``every`` steps (every step of a shorter run) and checkpoint once, at the end."""
    every = min(every, steps)
    return {"log_every": every, "checkpoint_every": every * math.ceil(steps / every)}


def attacker_samples(attacker, tokenizer, world, requests: Sequence[Request], per_request: int = 4,
                     name: str = "rl_attacker", max_new_tokens: int = AttackerConfig.max_new_tokens) -> list:
    """``requests`` (harmful ones: the attacker's own, or held out) rewritten by ``attacker`` (``per_request``
    samples each) as red-team samples (:func:`safetylab.evals.redteam.redteam_samples`' shape; the group is
    ``name``; ``metadata["on_target"]`` says whether the rewrite still asks for the request:
    :func:`~safetylab.evals.redteam.attack_scorer` counts no success for one that does not)."""
    from dataclasses import asdict

    from safetylab.evals.harness import Sample
    from safetylab.models.sampling import sample

    if per_request < 1:
        raise SafetylabError(f"attacker_samples: per_request: expected an integer >= 1, got {per_request}")
    with torch.no_grad():
        attacks = sample(attacker, tokenizer, [r.prompt for r in requests for _ in range(per_request)],
                         max_new_tokens=max_new_tokens).texts
    samples = []
    for i, attack in enumerate(attacks):
        request = requests[i // per_request]
        samples.append(Sample(f"{name}/{i:04d}", attack if attack.strip() else ".", "", {
            "kind": "harmful", "group": name, "attack": name, "jailbreak": None, "request": asdict(request),
            "on_target": on_target(world.parser, attack, request)}))
    return samples


__all__ = ["AttackerConfig", "attack_reward", "attacked_requests", "attacker_samples", "batch_similarity", "bleu",
           "distinct_n", "on_target", "rewrite_demonstrations", "self_bleu", "train_attacker"]
