"""Overoptimization maths: the unbiased best-of-n estimator against brute force over every subset, and Gao et
al.'s two forms recovered from points they generate."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from safetylab.align.overopt import (
    best_of_n_expectation,
    best_of_n_scaling,
    best_of_n_sizes,
    best_of_n_weights,
    fit_bon,
    fit_rl,
)
from safetylab.core.errors import SafetylabError


def brute_force(scores: list[float], values: list[float], n: int) -> float:
    """The mean value of the highest-scoring sample over every n-subset."""
    subsets = list(itertools.combinations(range(len(scores)), n))
    return sum(values[max(s, key=lambda i: scores[i])] for s in subsets) / len(subsets)


def test_the_weights_are_the_distribution_of_the_subset_maximum():
    for samples, n in ((6, 1), (6, 3), (6, 6), (1000, 17)):
        w = best_of_n_weights(samples, n)
        assert w.sum().item() == pytest.approx(1.0)
        assert (w[: n - 1] == 0).all()
    assert torch.allclose(best_of_n_weights(5, 1), torch.full((5,), 0.2, dtype=torch.float64))
    assert best_of_n_weights(5, 5).tolist() == pytest.approx([0, 0, 0, 0, 1])
    # C(i-1, 2) / C(6, 3) for i = 3 … 6
    assert best_of_n_weights(6, 3).tolist() == pytest.approx([0, 0, 1 / 20, 3 / 20, 6 / 20, 10 / 20])


def test_the_estimator_equals_brute_force_over_every_subset():
    rng = np.random.default_rng(0)
    scores, values = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    for n in range(1, 8):
        got = best_of_n_expectation(torch.tensor(scores), torch.tensor(values), n)
        want = [brute_force(list(s), list(v), n) for s, v in zip(scores, values)]
        assert got.tolist() == pytest.approx(want)


def test_ties_are_broken_at_random_so_the_estimate_is_their_mean():
    scores = torch.zeros(1, 4)
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    draws = [best_of_n_expectation(scores, values, 4, torch.Generator().manual_seed(s)).item() for s in range(400)]
    assert sum(draws) / len(draws) == pytest.approx(1.5, abs=0.2)  # a uniformly random one of the four


def test_the_scaling_curve_raises_the_proxy_and_reports_kl():
    rng = np.random.default_rng(1)
    proxy = torch.tensor(rng.normal(size=(20, 64)))
    gold = proxy - 0.5 * proxy ** 2  # good up to a point, then worse: Goodhart in miniature
    rows = best_of_n_scaling(proxy, gold)
    assert [r["n"] for r in rows] == best_of_n_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert all(a["proxy"] < b["proxy"] for a, b in zip(rows, rows[1:]))
    assert rows[0]["kl"] == 0 and rows[-1]["kl"] == pytest.approx(math.log(64) - 63 / 64)
    golds = [r["gold"] for r in rows]
    assert max(golds) > golds[0] and golds[-1] < max(golds)
    assert best_of_n_sizes(100)[-2:] == [64, 100]


def test_fits_recover_the_forms_that_made_the_points():
    d = np.linspace(0, 4, 30)
    bon = fit_bon(d, d * (1.5 - 0.5 * d))
    assert (bon.alpha, bon.beta, bon.r2) == pytest.approx((1.5, 0.5, 1.0))
    assert (bon.peak_d, bon.peak) == pytest.approx((1.5, 1.5 ** 2 / 2))
    rl = fit_rl(d, d * (1.0 - 0.4 * np.log(np.where(d > 0, d, 1))))
    assert (rl.alpha, rl.beta, rl.r2) == pytest.approx((1.0, 0.4, 1.0))
    assert rl.peak_d == pytest.approx(math.exp(1.0 / 0.4 - 1)) and rl.peak == pytest.approx(0.4 * rl.peak_d)
    rising = fit_bon(d, 2 * d + 0.1 * d * d)  # no turn: β < 0, no peak
    assert rising.beta < 0 and rising.peak_d is None
    falling = fit_bon(d, -d * (0.2 + 0.5 * d))  # α < 0: the best is not to optimise at all
    assert falling.peak_d == 0 and falling.peak == 0
    noisy = fit_bon(d, d * (1.5 - 0.5 * d) + np.random.default_rng(0).normal(0, 0.3, d.shape))
    assert 0 < noisy.r2 < 1


def test_bad_input_is_refused():
    with pytest.raises(SafetylabError, match=r"n must be in \[1, 4\]"):
        best_of_n_weights(4, 5)
    with pytest.raises(SafetylabError, match="prompts, samples"):
        best_of_n_expectation(torch.zeros(2, 3), torch.zeros(2, 4), 1)
    with pytest.raises(SafetylabError, match="three or more finite"):
        fit_bon([0, 1], [0, 1])
    with pytest.raises(SafetylabError, match="three or more finite"):
        fit_rl([0, 1, float("nan")], [0, 1, 2])
    with pytest.raises(SafetylabError, match=">= 0"):
        fit_rl([-1, 1, 2], [0, 1, 2])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_shallower_reward_model_keeps_the_first_blocks_and_reloads_at_that_depth(arch, tok, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from safetylab.align.reward import RewardConfig, build_reward_model, load_reward_model, save_reward_model, score

    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    model = (GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=3, n_head=2, n_embd=32, n_positions=128,
                                        **ids)) if arch == "gpt2" else
             LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, **ids)))
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    reward, rtok = build_reward_model(tmp_path / "base", RewardConfig(layers=2), seed=0)
    blocks = reward.backbone.h if arch == "gpt2" else reward.backbone.layers
    assert len(blocks) == 2 and reward.backbone.config.num_hidden_layers == 2
    save_reward_model(reward, rtok, tmp_path / "rm")
    again, _ = load_reward_model(tmp_path / "rm")
    prompts, responses = ["what is 2 plus 2 ?"] * 2, ["4", "i can not help"]
    assert torch.allclose(score(reward.eval(), rtok, prompts, responses), score(again, rtok, prompts, responses))
    with pytest.raises(SafetylabError, match="has 3 blocks, asked to keep 4"):
        build_reward_model(tmp_path / "base", RewardConfig(layers=4), seed=0)
    with pytest.raises(Exception, match="layers"):
        RewardConfig(layers=0)


@pytest.mark.slow
def test_the_overoptimization_stage_fits_a_curve_per_proxy(tmp_path, tok, tiny_lm):
    import json
    from dataclasses import replace

    from safetylab.align.study import OVEROPT_STAGES, study_config
    from safetylab.core.study import run_study

    tiny_lm("gpt2").save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    config = study_config("quick", 0, "cpu")
    config = replace(config, overopt=replace(config.overopt, prompts_per_kind=1, samples=8, max_new_tokens=6,
                                             labelers=("typical", "ideal"), depths=(1,)))
    run_study(OVEROPT_STAGES, config, tmp_path / "run", only=("overoptimization",),
              inputs={"sft": str(tmp_path / "sft")})
    section = json.loads((tmp_path / "run" / "sections.json").read_text())["overoptimization"]
    results = section["data"]["results"]
    assert [(r["labeler"], r["depth"]) for r in results] == [("typical", 1), ("ideal", 1)]
    for r in results:
        assert [row["n"] for row in r["curve"]] == [1, 2, 4, 8]
        assert all(a["proxy"] <= b["proxy"] + 1e-9 for a, b in zip(r["curve"], r["curve"][1:]))
        assert set(r["fit"]) >= {"alpha", "beta", "r2", "peak_d"}
    oracle = section["data"]["oracle"]
    assert all(a["gold"] <= b["gold"] + 1e-9 for a, b in zip(oracle, oracle[1:]))  # best-of-n by gold never loses
    assert (tmp_path / "run" / "overoptimization" / "overoptimization.png").is_file()
    kinds = section["tables"][1]["rows"]  # one row per request kind, one column per labeler's largest proxy
    assert len(kinds) == len(results[0]["by_kind"]) >= 6 and all(len(row) == 3 for row in kinds)
