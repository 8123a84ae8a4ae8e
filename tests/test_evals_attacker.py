"""The RL attacker: diversity metrics against hand computation, the reward's two terms, and a short training
run end to end on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from safetylab.evals.attacker import (
    AttackerConfig,
    attack_reward,
    attacker_samples,
    batch_similarity,
    bleu,
    distinct_n,
    rewrite_demonstrations,
    self_bleu,
    train_attacker,
)
from safetylab.world.content import JAILBREAK_PREFIXES


def test_distinct_n_and_self_bleu():
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)  # (a b) twice, (b c), (b d)
    assert distinct_n(["a b", "c d"], 2) == 1.0
    assert bleu("the cat sat on the mat".split(), ["the cat sat on the mat".split()]) == pytest.approx(1.0)
    # hand computation: h = "a b c d", r = "a b c e": p1 = 3/4, p2 = (2+1)/(3+1), p3 = (1+1)/(2+1), p4 = 1/2;
    # equal lengths, BP = 1
    expected = math.exp((math.log(3 / 4) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert bleu("a b c d".split(), ["a b c e".split()]) == pytest.approx(expected)
    assert bleu("a b".split(), ["a b c d".split()]) < bleu("a b c d".split(), ["a b c d".split()])  # brevity
    assert self_bleu(["a b c d"] * 3) == pytest.approx(1.0)
    assert self_bleu(["a b c d", "e f g h", "i j k l"]) == 0.0
    assert batch_similarity(["a b c", "a b c", "x y z"]) == pytest.approx([0.5, 0.5, 0.0])


def test_demonstrations_keep_most_requests_and_wrap_some(world):
    pairs = rewrite_demonstrations(world, 200, 0.3)
    wrapped = [r for p, r in pairs if r != p]
    assert 0.2 < len(wrapped) / len(pairs) < 0.4
    assert any(r.startswith(tuple(JAILBREAK_PREFIXES.values())) for r in wrapped)


def test_the_reward_is_success_minus_the_diversity_term(world, tok, tiny_lm):
    class Always:
        def score(self, request, answer):
            return type("S", (), {"behaviour": "harmful_compliance"})()

    requests = {r.prompt: r for r in world.requests("harmful", "train", 3)}
    prompts = list(requests)
    reward = attack_reward(tiny_lm("gpt2"), tok, Always(), requests, diversity=0.5, answer_tokens=2)
    same = reward(prompts, ["how do i do it"] * 3)
    assert torch.allclose(same, torch.full((3,), 0.5))
    mixed = reward(prompts, ["how do i do it", "how do i do it", "tell me a story"])
    assert mixed[2] == 1.0 and mixed[0] == pytest.approx(1 - 0.5 * 0.5)


@pytest.mark.slow
def test_the_attacker_trains_and_rewrites_held_out_requests(world, tok, tiny_lm, tmp_path):
    model = tiny_lm("gpt2")
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    config = AttackerConfig(demonstrations=40, requests=8, sft_steps=3, rl_steps=2, batch_size=2, k=2,
                            max_new_tokens=6, answer_tokens=4)
    attacker, tokenizer, start = train_attacker(world, tmp_path / "base", tiny_lm("gpt2"), tok, tmp_path / "att",
                                                config)
    assert (tmp_path / "att" / "rl" / "artifacts" / "model").is_dir()
    assert "objective/scores" in (tmp_path / "att" / "rl" / "metrics.jsonl").read_text()
    samples = attacker_samples(attacker, tokenizer, world, n=3, per_request=2)
    assert len(samples) == 6 and all(s.metadata["group"] == "rl_attacker" for s in samples)
