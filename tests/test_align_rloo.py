"""RLOO on tiny HF causal LMs: it raises the reward it is given, with TRL's metric names."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from safetylab.align.rloo import RLOOConfig, train_rloo
from safetylab.core import ConfigError, RunDir, SafetylabError
from safetylab.models.train import TrainConfig

TRAIN = TrainConfig(steps=32, batch_size=4, lr=2e-2, warmup_steps=1, log_every=4, checkpoint_every=8, device="cpu")


def _shorter_is_better(prompts, responses):
    return torch.tensor([-float(len(r.split())) for r in responses])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_rloo_raises_the_reward_it_optimises(tiny_lm, tmp_path, tok, world, name):
    policy, reference = tiny_lm(name), tiny_lm(name).eval()
    before = [p.clone() for p in policy.parameters()]
    prompts = [r.prompt for r in world.requests("facts", "train", 16)]
    config = RLOOConfig(train=TRAIN, k=4, kl_coef=0.0, missing_eos_penalty=0.0, max_new_tokens=12)
    run = RunDir(tmp_path / "rloo", {})
    train_rloo(policy, tok, prompts, _shorter_is_better, reference, config, run)
    metrics = run.metrics()
    assert metrics[-1]["objective/scores"] > metrics[0]["objective/scores"] + 1.0  # ~12 words → 0–4
    assert {"objective/kl", "objective/kl_k2", "objective/rlhf_reward", "objective/non_score_reward",
            "objective/entropy", "val/num_eos_tokens"} <= set(metrics[-1])
    assert metrics[-1]["objective/kl"] > 0  # the policy moved away from the reference
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_the_kl_penalty_enters_the_reward(tiny_lm, tmp_path, tok, world):
    policy, reference = tiny_lm("gpt2"), tiny_lm("gpt2").eval()
    prompts = [r.prompt for r in world.requests("facts", "train", 8)]
    config = RLOOConfig(train=replace(TRAIN, steps=4, log_every=1, checkpoint_every=2), k=2, kl_coef=0.5,
                        missing_eos_penalty=0.0, max_new_tokens=6)
    run = RunDir(tmp_path / "rloo", {})
    train_rloo(policy, tok, prompts, _shorter_is_better, reference, config, run)
    for m in run.metrics():
        assert m["objective/non_score_reward"] == pytest.approx(-0.5 * m["objective/kl"], abs=1e-5)
        assert m["objective/rlhf_reward"] == pytest.approx(m["objective/scores"] - 0.5 * m["objective/kl"], abs=1e-4)
    assert run.metrics()[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first step: policy = reference


@pytest.mark.parametrize(("change", "message"), [
    ({"k": 1}, "k: expected an integer >= 2"),
    ({"kl_estimator": "k2"}, "kl_estimator: expected one of k1, k3, got 'k2'"),
    ({"kl_coef": -0.1}, "kl_coef: expected a finite number >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"layout": "rows"}, "layout"),
])
def test_rloo_settings_are_checked_when_the_config_is_built(change, message):
    with pytest.raises(ConfigError, match=message):
        RLOOConfig(train=TRAIN, **change)


def test_every_layout_gives_the_same_steps(tiny_lm, tmp_path, tok, world):
    # the packed layouts compute each prompt once for its k samples: the same losses as padded rows
    prompts = [r.prompt for r in world.requests("facts", "train", 8)]
    logged = {}
    for layout in ("padded", "packed"):
        policy, reference = tiny_lm("gpt2"), tiny_lm("gpt2").eval()
        config = RLOOConfig(train=replace(TRAIN, steps=2, log_every=1, checkpoint_every=2), k=3, kl_coef=0.1,
                            max_new_tokens=8, layout=layout)
        run = RunDir(tmp_path / layout, {})
        train_rloo(policy, tok, prompts, _shorter_is_better, reference, config, run)
        logged[layout] = [m[k] for m in run.metrics() for k in ("objective/kl", "objective/entropy")]
    assert logged["packed"] == pytest.approx(logged["padded"], abs=1e-4)
    assert logged["padded"][2] > 0  # the second step's KL: the first step moved the policy


def test_a_reward_model_with_another_vocabulary_is_an_error(tiny_lm, tmp_path, tok):
    from transformers import GPT2Config, GPT2Model

    from safetylab.align.reward import RewardModel

    policy = tiny_lm("gpt2")
    reward_model = RewardModel(GPT2Model(GPT2Config(vocab_size=len(tok) + 5, n_layer=1, n_head=2, n_embd=32)))
    with pytest.raises(SafetylabError, match="reward model's"):
        train_rloo(policy, tok, ["what is 2 plus 2 ?"], reward_model, policy, RLOOConfig(train=TRAIN),
                   RunDir(tmp_path / "a", {}))
