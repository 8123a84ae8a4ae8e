"""safetylab.align.advantages: GAE, KL-penalised rewards, KL estimators, RLOO and KL controllers, each
against a plain-Python or exact reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safetylab.align.advantages import (
    AdaptiveKLController,
    FixedKLController,
    ScoreNormalizer,
    gae,
    kl_penalized_rewards,
    last_token_index,
    missing_eos_penalty,
    rloo_advantages,
    sequence_kl_stats,
)
from safetylab.models.logprobs import kl_estimates, kl_per_token


def ragged_batch(lengths: list[int], starts: list[int], width: int, seed: int):
    """Random rewards and values, nan outside each row's block ``[start, start + length)``."""
    rng = np.random.default_rng(seed)
    rewards = np.full((len(lengths), width), np.nan)
    values = np.full((len(lengths), width), np.nan)
    mask = np.zeros((len(lengths), width))
    for i, (n, s) in enumerate(zip(lengths, starts)):
        rewards[i, s:s + n] = rng.normal(size=n)
        values[i, s:s + n] = rng.normal(size=n)
        mask[i, s:s + n] = 1
    return rewards, values, mask


def gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float):
    """A_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l} with δ_t = r_t + γ V_{t+1} − V_t and V_T = 0, written as the sum."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    adv = [sum((gamma * lam) ** (u - t) * deltas[u] for u in range(t, n)) for t in range(n)]
    return adv, [a + v for a, v in zip(adv, values)]


# ---------------------------------------------------------------------------- GAE
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(0, 3)), min_size=1, max_size=5),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
@settings(deadline=None, max_examples=60)
def test_gae_matches_plain_loop_per_sequence(rows, gamma, lam, seed):
    lengths, starts = [r[0] for r in rows], [r[1] for r in rows]
    width = max(n + s for n, s in rows) + 2
    rewards, values, mask = ragged_batch(lengths, starts, width, seed)
    adv, ret = gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), gamma=gamma, lam=lam)
    for i, (n, s) in enumerate(rows):
        exp_adv, exp_ret = gae_reference(list(rewards[i, s:s + n]), list(values[i, s:s + n]), gamma, lam)
        np.testing.assert_allclose(adv[i, s:s + n].numpy(), exp_adv, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(ret[i, s:s + n].numpy(), exp_ret, rtol=1e-9, atol=1e-9)
    assert (adv[torch.tensor(mask) == 0] == 0).all() and (ret[torch.tensor(mask) == 0] == 0).all()


def test_gae_gamma_lambda_one_gives_reward_to_go_returns():
    rewards, values, mask = ragged_batch([5, 2, 7], [0, 0, 0], 8, seed=1)
    _, ret = gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), gamma=1.0, lam=1.0)
    for i, n in enumerate([5, 2, 7]):
        to_go = [sum(rewards[i, t:n]) for t in range(n)]
        np.testing.assert_allclose(ret[i, :n].numpy(), to_go, rtol=1e-9, atol=1e-9)


def test_gae_lambda_zero_is_one_step_td_error():
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    v = torch.tensor([[0.5, -1.0, 4.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, _ = gae(r, v, m, gamma=0.9, lam=0.0)
    expected = [1 + 0.9 * -1.0 - 0.5, 2 + 0.9 * 4.0 + 1.0, 3 + 0.0 - 4.0, 0.0]  # V beyond the last token is 0
    torch.testing.assert_close(adv, torch.tensor([expected]))


def test_gae_rejects_gaps_and_bad_shapes():
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="contiguous"):
        gae(x, x, torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        gae(x, torch.zeros(1, 3), torch.ones(1, 4))
    with pytest.raises(ValueError, match="gamma"):
        gae(x, x, torch.ones(1, 4), gamma=1.5)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 0]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


# ---------------------------------------------------------------------------- KL estimators
def sample_logratios(p: torch.Tensor, q: torch.Tensor, n: int, seed: int):
    idx = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    logp, logq = p.log()[idx], q.log()[idx]
    return kl_per_token(logp.unsqueeze(0), logq.unsqueeze(0), torch.ones(1, n, dtype=p.dtype))


def exact_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.log() - q.log())).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_and_k3_average_to_the_exact_kl(seed):
    g = torch.Generator().manual_seed(100 + seed)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 1.5, 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 1.5, 0)
    kl = exact_kl(p, q)
    est = sample_logratios(p, q, 200_000, seed)
    for name in ("k1", "k3"):
        x = est[name].flatten()
        se = x.std().item() / math.sqrt(x.numel())
        assert abs(x.mean().item() - kl) < 5 * se + 1e-9, name


def test_k2_averages_to_the_kl_for_nearby_distributions_and_is_biased_for_far_ones():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, 0)
    near = torch.softmax(logits + 0.1 * torch.randn(6, generator=g, dtype=torch.float64), 0)
    x = sample_logratios(p, near, 200_000, 1)["k2"].flatten()
    kl = exact_kl(p, near)
    se = x.std().item() / math.sqrt(x.numel())
    assert abs(x.mean().item() - kl) < 0.05 * kl + 5 * se  # bias is third order in log p − log q
    far = torch.tensor([0.7, 0.1, 0.1, 0.05, 0.04, 0.01], dtype=torch.float64)
    far_q = torch.tensor([0.01, 0.04, 0.05, 0.1, 0.1, 0.7], dtype=torch.float64)
    y = sample_logratios(far, far_q, 200_000, 2)["k2"].flatten()
    assert abs(y.mean().item() - exact_kl(far, far_q)) > 10 * y.std().item() / math.sqrt(y.numel())


@given(st.lists(st.floats(-50, 50), min_size=1, max_size=20), st.lists(st.floats(-50, 50), min_size=1, max_size=20))
@settings(deadline=None, max_examples=60)
def test_k3_is_non_negative(a, b):
    n = min(len(a), len(b))
    logp, logq = torch.tensor([a[:n]], dtype=torch.float64), torch.tensor([b[:n]], dtype=torch.float64)
    est = kl_per_token(logp, logq, torch.ones(1, n, dtype=torch.float64))
    assert (est["k3"] >= 0).all() and (est["k2"] >= 0).all()


def test_kl_estimates_are_the_sums_of_kl_per_token():
    g = torch.Generator().manual_seed(3)
    logp, logq = -torch.rand(4, 7, generator=g) * 3, -torch.rand(4, 7, generator=g) * 3
    mask = (torch.rand(4, 7, generator=g) < 0.6).float()
    per_token, per_seq = kl_per_token(logp, logq, mask), kl_estimates(logp, logq, mask)
    r = (logp - logq) * mask
    torch.testing.assert_close(per_token["k1"], r)
    torch.testing.assert_close(per_token["k2"], 0.5 * r**2)
    torch.testing.assert_close(per_token["k3"], (torch.exp(-r) - 1 + r) * mask)
    for name in ("k1", "k2", "k3"):
        torch.testing.assert_close(per_seq[name], per_token[name].sum(-1))


# ---------------------------------------------------------------------------- KL-penalised rewards
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalized_rewards_put_the_score_on_the_last_real_token_only(estimator):
    g = torch.Generator().manual_seed(4)
    logp, ref = -torch.rand(3, 6, generator=g) * 3, -torch.rand(3, 6, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    logp = torch.where(mask.bool(), logp, torch.tensor(float("nan")))  # padding garbage must not leak
    score = torch.tensor([2.0, -1.0, 0.5])
    rewards = kl_penalized_rewards(score, logp, ref, mask, kl_coef=0.1, estimator=estimator)
    r = torch.where(mask.bool(), logp - ref, torch.zeros(()))
    kl = r if estimator == "k1" else torch.exp(-r) - 1 + r
    expected = -0.1 * kl * mask
    for i, last in enumerate([2, 5, 0]):
        expected[i, last] += score[i]
    torch.testing.assert_close(rewards, expected)
    only_score = kl_penalized_rewards(score, logp, ref, mask, kl_coef=0.0, estimator=estimator)
    assert only_score.nonzero().tolist() == [[0, 2], [1, 5], [2, 0]]
    torch.testing.assert_close(only_score.sum(-1), score)


def test_kl_penalized_rewards_rejects_bad_input():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="estimator"):
        kl_penalized_rewards(torch.zeros(2), x, x, m, 0.1, estimator="k2")
    with pytest.raises(ValueError, match="score"):
        kl_penalized_rewards(torch.zeros(3), x, x, m, 0.1)
    with pytest.raises(ValueError, match="no real token"):
        kl_penalized_rewards(torch.zeros(2), x, x, torch.tensor([[1.0, 1, 0], [0, 0, 0]]), 0.1)


def test_missing_eos_penalty():
    score = torch.tensor([1.0, 2.0, -3.0])
    out = missing_eos_penalty(score, torch.tensor([True, False, False]), penalty=1.5)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, -4.5]))
    assert torch.equal(score, torch.tensor([1.0, 2.0, -3.0]))  # input untouched
    with pytest.raises(ValueError, match="penalty"):
        missing_eos_penalty(score, torch.ones(3, dtype=torch.bool), penalty=-1.0)


# ---------------------------------------------------------------------------- RLOO
@given(st.integers(1, 5), st.integers(2, 6), st.integers(0, 2**31 - 1))
@settings(deadline=None, max_examples=40)
def test_rloo_advantages_leave_one_out_prompt_major(n_prompts, k, seed):
    scores = np.random.default_rng(seed).normal(size=n_prompts * k)
    adv = rloo_advantages(torch.tensor(scores), k).numpy()
    for p in range(n_prompts):
        group = scores[p * k:(p + 1) * k]
        for j in range(k):
            others = [group[i] for i in range(k) if i != j]
            assert adv[p * k + j] == pytest.approx(group[j] - sum(others) / (k - 1), abs=1e-9)
        assert adv[p * k:(p + 1) * k].sum() == pytest.approx(0.0, abs=1e-9)


def test_rloo_layout_is_prompt_major():
    # Prompt-major: samples of one prompt are adjacent. Equal scores within a prompt → zero advantage.
    scores = torch.tensor([1.0, 5.0, 9.0]).repeat_interleave(4)
    assert torch.equal(rloo_advantages(scores, 4), torch.zeros(12))
    assert not torch.equal(rloo_advantages(torch.tensor([1.0, 5.0, 9.0]).repeat(4), 4), torch.zeros(12))


def test_rloo_rejects_bad_k():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="flat"):
        rloo_advantages(torch.zeros(5), 2)


# ---------------------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller_moves_towards_the_target_with_clipped_error():
    up = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    assert up.update(6.6, n_steps=256) == pytest.approx(0.2 * (1 + 0.1 * 256 / 10000))  # above target: raise
    down = AdaptiveKLController(0.2, 6.0, 10000)
    assert down.update(5.4, 256) == pytest.approx(0.2 * (1 - 0.1 * 256 / 10000))  # below: lower
    same = AdaptiveKLController(0.2, 6.0, 10000)
    assert same.update(6.0, 256) == pytest.approx(0.2)
    # The proportional error is clipped to ±0.2: any KL far above (below) the target moves β by the same factor.
    far_up, near_up = AdaptiveKLController(0.2, 6.0, 100), AdaptiveKLController(0.2, 6.0, 100)
    assert far_up.update(600.0, 10) == pytest.approx(near_up.update(7.2, 10)) == pytest.approx(0.2 * 1.02)
    far_down = AdaptiveKLController(0.2, 6.0, 100)
    assert far_down.update(0.0, 10) == pytest.approx(0.2 * 0.98)
    assert up.value != down.value  # each holds its own state


def test_adaptive_kl_controller_converges_on_a_toy_kl_response():
    """KL that falls as β rises (KL = 1/β): repeated updates drive KL to the target."""
    ctl = AdaptiveKLController(init_kl_coef=0.05, target=4.0, horizon=100)
    for _ in range(2000):
        ctl.update(1 / ctl.value, n_steps=10)
    assert 1 / ctl.value == pytest.approx(4.0, rel=1e-2)


def test_fixed_kl_controller_and_validation():
    ctl = FixedKLController(0.1)
    assert ctl.update(100.0, 10) == 0.1 and ctl.value == 0.1
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)


def test_kl_controllers_round_trip_their_state():
    adaptive = AdaptiveKLController(0.2, target=1.0, horizon=10)
    adaptive.update(5.0, n_steps=4)
    restored = AdaptiveKLController(0.2, target=1.0, horizon=10)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value != 0.2
    fixed = FixedKLController(0.3)
    fixed.load_state_dict({"value": 0.7})
    assert fixed.update(9.0, 100) == 0.7


def test_score_normalizer_maps_the_first_batch_to_mean_zero_std_one():
    scores = torch.tensor([2.0, 4.0, 9.0, -1.0])
    normalizer = ScoreNormalizer()
    with pytest.raises(ValueError, match="fit"):
        normalizer(scores)
    normalizer.fit(scores.mean().item(), scores.pow(2).mean().item())
    out = normalizer(scores)
    assert out.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert out.std(correction=0).item() == pytest.approx(1.0, abs=1e-6)
    assert normalizer(torch.tensor([4.0])).item() == pytest.approx((4.0 - 3.5) / scores.std(correction=0).item())
    constant = ScoreNormalizer()
    constant.fit(5.0, 25.0)  # no spread: only the shift applies
    assert constant(torch.tensor([6.0])).item() == 1.0
    copy = ScoreNormalizer()
    copy.load_state_dict(normalizer.state_dict())
    assert torch.equal(copy(scores), out)


def test_sequence_kl_stats_report_the_penalty_estimator_as_objective_kl():
    torch.manual_seed(0)
    logp, logq = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [0.0] * 2 + [1.0] * 3])
    for estimator in ("k1", "k3"):
        stats = sequence_kl_stats(logp, logq, mask, estimator)
        expected = kl_estimates(logp, logq, mask)
        assert stats["objective/kl"] == pytest.approx(expected[estimator].mean().item())
        assert stats["objective/kl_k2"] == pytest.approx(expected["k2"].mean().item())
