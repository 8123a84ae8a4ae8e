"""Best-of-n: the KL bound and estimate, and the selection itself."""

from __future__ import annotations

import math

import pytest
import torch

from safetylab.align.best_of_n import best_of_n, best_of_n_kl, best_of_n_kl_bound
from safetylab.models import ModelConfig, build_model


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_kl_bound_formula(n):
    assert best_of_n_kl_bound(n) == pytest.approx(math.log(n) - (n - 1) / n)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_kl_estimate_reaches_the_bound_for_distinct_rewards(n):
    rewards = torch.randn(3, 20_000, generator=torch.Generator().manual_seed(n))
    assert best_of_n_kl(rewards, n) == pytest.approx([best_of_n_kl_bound(n)] * 3, abs=2e-3)


def test_kl_estimate_on_ties_matches_a_hand_computation_and_stays_below_the_bound():
    # base rewards: level 0 with mass 1/2, level 1 with mass 1/2; best-of-2 keeps level 1 with 3/4
    rewards = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert best_of_n_kl(rewards, 2).item() == pytest.approx(expected, rel=1e-6)
    assert expected < best_of_n_kl_bound(2)
    assert best_of_n_kl(torch.ones(2, 10), 8).tolist() == [0.0, 0.0]  # one level: best-of-n is the base


def test_best_of_n_keeps_the_highest_reward_candidate(tok, world):
    torch.manual_seed(0)
    policy = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tok).eval()
    prompts = [r.prompt for r in world.requests("facts", "test", 3)]

    def length(prompts, responses):  # a reward that favours long responses
        return torch.tensor([float(len(r.split())) for r in responses])

    result = best_of_n(policy, tok, prompts, length, n=4, kl_samples=6, max_new_tokens=10)
    assert result.rewards.shape == (3, 4) and len(result.candidates) == 3
    for candidates, kept in zip(result.candidates, result.responses):
        assert len(kept.split()) == max(len(c.split()) for c in candidates)
    torch.testing.assert_close(result.proxy, result.rewards.max(1).values)
    assert result.kl is not None and (result.kl <= best_of_n_kl_bound(4) + 1e-6).all() and (result.kl >= 0).all()
    with pytest.raises(ValueError):
        best_of_n(policy, tok, prompts, length, n=0)


def test_best_of_n_command_sweeps_n(tmp_path, tok, world):
    import json

    from typer.testing import CliRunner

    from safetylab import cli
    from safetylab.align.reward import RewardConfig, build_reward_model, save_reward_model
    from safetylab.models import save_model

    torch.manual_seed(0)
    policy = save_model(build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tok), tok,
                        tmp_path / "policy")
    reward, tokenizer = build_reward_model(policy, RewardConfig(), seed=0)
    save_reward_model(reward, tokenizer, tmp_path / "rm")
    args = ["sample", "best-of-n", "--policy", str(policy), "--reward", str(tmp_path / "rm"), "--n", "1", "--n", "3",
            "--per-kind", "1", "--jailbroken", "1", "--kl-samples", "4", "--out", str(tmp_path / "bon"),
            "--device", "cpu"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bon" / "best-of-n.json").read_text())
    assert [r["n"] for r in rows] == [1, 3]
    assert rows[0]["kl_bound"] == 0.0 and rows[0]["kl_estimate"] == 0.0
    assert rows[1]["kl_bound"] == pytest.approx(math.log(3) - 2 / 3, abs=1e-6)
    assert 0.0 <= rows[1]["kl_estimate"] <= rows[1]["kl_bound"] + 1e-6
    assert (tmp_path / "bon" / "plots" / "best-of-n.png").exists()
