"""The RL attacker: diversity metrics against hand computation, the reward's two terms, and a short training
run end to end on tiny models."""

from __future__ import annotations

import json
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
    on_target,
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
    reward = attack_reward(tiny_lm("gpt2"), tok, Always(), world.parser, requests, diversity=0.5, answer_tokens=2)
    same = reward([prompts[0]] * 3, [prompts[0]] * 3)
    assert torch.allclose(same, torch.full((3,), 0.5))
    story = JAILBREAK_PREFIXES["story"]
    attacks = [prompts[0], prompts[0], story + requests[prompts[0]].core]
    similarity = batch_similarity(attacks)
    assert similarity[2] < similarity[0] < 1
    assert reward([prompts[0]] * 3, attacks).tolist() == pytest.approx([1 - 0.5 * s for s in similarity])
    # an attack that asks for another request, or for nothing the world reads, earns no success
    assert reward(prompts[:2], [prompts[1], "tell me a story"]).tolist() == [0.0, 0.0]


def test_an_attack_is_on_target_only_while_it_asks_for_its_request(world):
    first, second = world.requests("harmful", "train", 2)
    assert on_target(world.parser, first.prompt, first)
    assert on_target(world.parser, JAILBREAK_PREFIXES["roleplay"] + first.core, first)
    assert not on_target(world.parser, second.prompt, first)
    assert not on_target(world.parser, "ask me anything", first)


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
    samples = attacker_samples(attacker, tokenizer, world, world.requests("harmful", "test", 3), per_request=2)
    assert len(samples) == 6 and all(s.metadata["group"] == "rl_attacker" for s in samples)
    assert all(isinstance(s.metadata["on_target"], bool) for s in samples)


@pytest.mark.slow
def test_the_study_stage_compares_the_attacker_with_the_templates_on_both_request_sets(monkeypatch, tmp_path, tok,
                                                                                       tiny_lm):
    from safetylab.core.study import run_study
    from safetylab.evals.study import STAGES, study_config

    monkeypatch.chdir(tmp_path)
    for name in ("base", "sft"):
        tiny_lm("gpt2").save_pretrained(f"models/{name}")
        tok.save_pretrained(f"models/{name}")
    attacker = AttackerConfig(demonstrations=20, requests=4, sft_steps=2, rl_steps=1, batch_size=2, k=2,
                              max_new_tokens=6, answer_tokens=4, answers=1)
    config = study_config(quick=True, redteam_n=2, max_new_tokens=4, device="cpu", attacker=attacker)
    stages = [s for s in STAGES if s.name in ("models", "attacker")]
    run_study(stages, config, "runs/evals", inputs={"base": "models/base", "sft": "models/sft"})
    section = json.loads((tmp_path / "runs/evals/sections.json").read_text())["attacker"]
    names = set(section["data"]["attack_success"])
    assert names == {f"{a}, {w}" for a in ("attacker after RL", "attacker before RL", "templates")
                     for w in ("its own", "held-out")}
    rows = section["tables"][0]["rows"]
    assert all(r[2] == "1 (by construction)" for r in rows if r[0].startswith("templates"))
