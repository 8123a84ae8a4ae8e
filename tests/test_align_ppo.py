"""PPO on tiny HF causal LMs: the actor–critic, rollouts, the update, resume with an adaptive β."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from safetylab.align.ppo import ActorCritic, PPOConfig, collect_rollout, ppo_loss, train_ppo
from safetylab.core import ConfigError, RunDir, SafetylabError
from safetylab.models.train import TrainConfig

TRAIN = TrainConfig(steps=48, batch_size=8, lr=2e-2, warmup_steps=1, log_every=4, checkpoint_every=8, device="cpu")
CONFIG = PPOConfig(train=TRAIN, ppo_epochs=2, mini_batches=2, kl_coef=0.0, missing_eos_penalty=0.0, max_new_tokens=12,
                   vf_coef=0.5)


def _shorter_is_better(prompts, responses):
    return torch.tensor([-float(len(r.split())) for r in responses])


def _low_ids(tok):
    """A reward that each token can earn: the share of the response's tokens in the lower half of the
    vocabulary (a random policy gets about 0.5)."""

    def reward(prompts, responses):
        ids = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
        return torch.tensor([sum(i < len(tok) // 2 for i in row) / max(len(row), 1) for row in ids])

    return reward


@pytest.fixture
def prompts(world):
    return [r.prompt for r in world.requests("facts", "train", 16)]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_ppo_raises_the_reward_and_fits_the_critic(tiny_lm, tmp_path, tok, prompts, name):
    policy, reference = tiny_lm(name), tiny_lm(name).eval()
    before = [p.clone() for p in policy.parameters()]
    run = RunDir(tmp_path / "ppo", {})
    trained = train_ppo(policy, tok, prompts, _low_ids(tok), reference, CONFIG, run)
    metrics = run.metrics()
    late = sum(m["objective/scores"] for m in metrics[-3:]) / 3
    assert late > metrics[0]["objective/scores"] + 0.15  # ~0.4 → ~0.6–0.7
    assert metrics[-1]["loss/value_avg"] < metrics[0]["loss/value_avg"]
    assert {"objective/kl", "objective/kl_k1", "objective/kl_k2", "objective/kl_k3", "objective/entropy",
            "objective/rlhf_reward", "objective/non_score_reward", "policy/approxkl_avg", "policy/clipfrac_avg",
            "policy/entropy_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio",
            "val/num_eos_tokens"} <= set(metrics[-1])
    assert metrics[-1]["objective/kl"] > 0
    assert trained is policy and any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_the_first_update_of_a_rollout_is_at_ratio_one(tiny_lm, tok, prompts):
    model = ActorCritic(tiny_lm("gpt2"))
    torch.manual_seed(0)
    rollout = collect_rollout(model, tok, prompts[:6], _shorter_is_better, tiny_lm("gpt2").eval(), 0.1, CONFIG,
                              torch.device("cpu"))
    assert torch.all(rollout.values == 0)  # the value head starts at zero
    assert rollout.stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
    loss, stats = ppo_loss(model, rollout, CONFIG)
    assert stats["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-10)
    assert stats["policy/clipfrac_avg"] == 0.0 and stats["val/ratio"] == pytest.approx(1.0)
    assert torch.isfinite(loss)


def test_without_values_or_kl_the_advantages_discount_the_score_by_lambda(tiny_lm, tok, prompts):
    scored = []

    def reward(p, r):
        scored.append(_shorter_is_better(p, r))
        return scored[-1]

    config = replace(CONFIG, whiten_advantages=False, lam=0.5)
    torch.manual_seed(1)
    rollout = collect_rollout(ActorCritic(tiny_lm("gpt2")), tok, prompts[:5], reward, tiny_lm("gpt2").eval(), 0.0,
                              config, torch.device("cpu"))
    # V = 0, β = 0 and γ = 1: A_t = λ^(tokens after t) · score, and the returns A + V equal A
    for row, score in enumerate(scored[0]):
        real = rollout.mask[row].bool()
        returns, advantages = rollout.returns[row][real], rollout.advantages[row][real]
        assert torch.equal(returns, advantages)
        expected = score * 0.5 ** torch.arange(len(advantages) - 1, -1, -1, dtype=torch.float)
        assert torch.allclose(advantages, expected, atol=1e-6)


def test_each_rollout_feeds_ppo_epochs_times_mini_batches_updates(tiny_lm, tmp_path, tok, prompts):
    calls = []

    def reward(p, r):
        calls.append(len(p))
        return _shorter_is_better(p, r)

    # 4 updates per rollout: steps 0–3, 4–7 and 8–9 (the run ends inside its third rollout)
    config = replace(CONFIG, train=replace(TRAIN, steps=10, log_every=2, checkpoint_every=8))
    run = RunDir(tmp_path / "ppo", {})
    train_ppo(tiny_lm("gpt2"), tok, prompts, reward, tiny_lm("gpt2").eval(), config, run)
    assert calls == [TRAIN.batch_size] * 3
    assert [m["step"] for m in run.metrics()] == [2, 4, 6, 8, 10]


def test_adaptive_beta_is_saved_with_checkpoints_and_a_resumed_run_repeats(tiny_lm, tmp_path, tok, prompts):
    config = replace(CONFIG, train=replace(TRAIN, steps=16, log_every=2, checkpoint_every=8), kl_coef=0.5,
                     kl_target=0.01, kl_horizon=10)
    whole = RunDir(tmp_path / "whole", {})
    train_ppo(tiny_lm("gpt2"), tok, prompts, _shorter_is_better, tiny_lm("gpt2").eval(), config, whole)
    betas = [m["objective/kl_coef"] for m in whole.metrics()]
    assert betas[-1] != betas[0]  # the controller moved β

    calls = []

    def reward_then_crash(p, r):
        calls.append(1)
        if len(calls) == 4:  # a rollout every 4 steps: the 4th starts at step 12, after the checkpoint at 8
            raise KeyboardInterrupt
        return _shorter_is_better(p, r)

    broken = RunDir(tmp_path / "broken", {})
    with pytest.raises(KeyboardInterrupt):
        train_ppo(tiny_lm("gpt2"), tok, prompts, reward_then_crash, tiny_lm("gpt2").eval(), config, broken)
    train_ppo(tiny_lm("gpt2"), tok, prompts, _shorter_is_better, tiny_lm("gpt2").eval(), config, broken)
    assert (broken.path / "metrics.jsonl").read_bytes() == (whole.path / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize(("change", "message"), [
    ({"ppo_epochs": 0}, "ppo_epochs: expected an integer >= 1"),
    ({"train": replace(TRAIN, log_every=2, checkpoint_every=6)}, r"train.checkpoint_every: expected a multiple of "
                                                                  r"ppo_epochs × mini_batches \(4\)"),
    ({"kl_estimator": "k2"}, "kl_estimator"),
    ({"kl_coef": 0.0, "kl_target": 6.0}, "kl_coef: expected a number > 0 to adapt towards kl_target"),
    ({"mini_batches": 4, "ppo_epochs": 1, "train": replace(TRAIN, batch_size=2)}, "mini_batches: expected at most"),
    ({"gamma": 1.5}, r"gamma: expected a number in \[0, 1\]"),
    ({"clip": float("nan")}, "clip"),
])
def test_ppo_settings_are_checked_when_the_config_is_built(change, message):
    with pytest.raises(ConfigError, match=message):
        replace(CONFIG, **change)


def test_a_reference_with_another_vocabulary_is_an_error(tiny_lm, tmp_path, tok, prompts):
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok) + 5, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(SafetylabError, match="share one tokenizer"):
        train_ppo(tiny_lm("gpt2"), tok, prompts, _shorter_is_better, other, CONFIG, RunDir(tmp_path / "a", {}))


def test_a_prompt_longer_than_the_context_is_named(tiny_lm, tmp_path, tok, prompts):
    long = " ".join(["what is 2 plus 2 ?"] * 40)
    with pytest.raises(SafetylabError, match=r"prompt 2 has \d+ tokens .*context of 128"):
        train_ppo(tiny_lm("gpt2"), tok, [prompts[0], long], _shorter_is_better, tiny_lm("gpt2"),
                  replace(CONFIG, train=replace(TRAIN, batch_size=2), mini_batches=1), RunDir(tmp_path / "a", {}))


def test_ppo_trains_without_dropout_and_leaves_the_callers_modules_alone(tmp_path, tok, prompts):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, resid_pdrop=0.1,
                                        embd_pdrop=0.1, attn_pdrop=0.1, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    reference = GPT2LMHeadModel(policy.config).eval()
    reference.load_state_dict(policy.state_dict())
    config = replace(CONFIG, train=replace(TRAIN, steps=4, lr=1e-30))
    train_ppo(policy, tok, prompts, _shorter_is_better, reference, config, RunDir(tmp_path / "run", {}))
    first = RunDir(tmp_path / "run", {}).metrics()[0]
    assert first["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-9)  # π = π_old at ratio 1: no dropout noise
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert {m.p for m in policy.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
