"""Reward models: pooling, Bradley–Terry training on any HF backbone, files, ensembles, bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from safetylab.align.data import Preference, preferences_from_records, read_preferences
from safetylab.align.losses import bradley_terry_loss
from safetylab.align.reward import (
    RewardConfig,
    RewardModel,
    backbone_from,
    batch_rewards,
    build_reward_model,
    conservative_reward,
    encode_rewards,
    evaluate_reward_model,
    fit_reward_models,
    last_token_pool,
    load_reward_model,
    mean_pool,
    member_seed,
    policy_reward,
    sample_rewards,
    save_reward_model,
    score,
    train_reward_model,
)
from safetylab.core import RunDir, SafetylabError, derive_seed, write_jsonl
from safetylab.models import ModelConfig, build_model, save_model
from safetylab.models.sampling import Samples
from safetylab.models.train import TrainConfig

TRAIN = TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=2, max_length=64, log_every=5,
                    checkpoint_every=10, device="cpu")


@pytest.fixture(scope="module")
def rows(world):
    return preferences_from_records(world.preferences(64, "ideal")).rows


def test_last_token_pool_reads_the_last_real_position_on_either_padding_side():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert torch.equal(last_token_pool(hidden, right), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(last_token_pool(hidden, left), torch.stack([hidden[0, 3], hidden[1, 3]]))


def test_mean_pool_ignores_padding():
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)])
    torch.testing.assert_close(mean_pool(hidden, mask), expected)


def _backbones(tok):
    torch.manual_seed(0)
    yield "gpt2", GPT2Model(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=128))
    yield "llama", LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_training_lowers_the_loss_and_moves_every_part(tmp_path, tok, rows, name, pooling):
    backbone = dict(_backbones(tok))[name]
    torch.manual_seed(1)
    model = RewardModel(backbone, pooling)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = RunDir(tmp_path / "rm", {})
    train_reward_model(model, tok, rows, RewardConfig(train=TRAIN, pooling=pooling), run)
    metrics = run.metrics()
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert {"loss", "accuracy", "margin", "lr"} <= set(metrics[-1])
    assert not torch.equal(before["head.weight"], model.state_dict()["head.weight"])
    changed = [k for k, v in model.state_dict().items() if k.startswith("backbone") and not torch.equal(v, before[k])]
    assert changed


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_packed_pairs_train_as_padded_rows_do(tmp_path, tok, rows, name):
    """Each pair's prompt computed once, chosen and rejected after it, gives the padded batch's rewards,
    losses and gradients up to float rounding: the same training, less work."""
    metrics = {}
    for layout in ("packed", "padded"):
        torch.manual_seed(1)
        run = RunDir(tmp_path / layout, {})
        train_reward_model(RewardModel(dict(_backbones(tok))[name]), tok, rows,
                           RewardConfig(train=replace(TRAIN, steps=10), layout=layout), run)
        metrics[layout] = run.metrics()
    for a, b in zip(metrics["packed"], metrics["padded"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4) and a["margin"] == pytest.approx(b["margin"], abs=1e-4)
    pairs = rows[:6]
    batch = encode_rewards(tok, [r.prompt for r in pairs] * 2, [r.chosen for r in pairs] + [r.rejected for r in pairs])
    torch.manual_seed(2)
    model = RewardModel(dict(_backbones(tok))[name]).eval()
    grads = {}
    for layout in ("packed", "padded"):
        model.zero_grad()
        rewards = batch_rewards(model, batch, layout)
        bradley_terry_loss(*rewards.chunk(2)).backward()
        grads[layout] = (rewards.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["packed"][0], grads["padded"][0], atol=1e-5, rtol=1e-5)
    for packed_grad, padded_grad in zip(grads["packed"][1], grads["padded"][1]):
        torch.testing.assert_close(packed_grad, padded_grad, atol=1e-5, rtol=1e-4)


def test_padding_does_not_change_a_reward(tok, rows):
    torch.manual_seed(0)
    model = RewardModel(dict(_backbones(tok))["gpt2"]).eval()
    alone = score(model, tok, [rows[0].prompt], [rows[0].chosen])
    batched = score(model, tok, [rows[0].prompt, rows[1].prompt], [rows[0].chosen, rows[1].chosen + " and more words"])
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)


class LengthReward(nn.Module):
    """A stand-in reward: the number of tokens."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        return attention_mask.sum(1).float()


def test_evaluation_counts_accuracy_margin_and_gold_agreement(tok):
    rows = [
        Preference("what is 2 plus 2 ?", "the answer is 4 .", "4 .", {"gold_chosen": 1.0, "gold_rejected": 0.5}),
        Preference("what is 2 plus 2 ?", "4 .", "the answer is 5 .", {"gold_chosen": 1.0, "gold_rejected": -1.0}),
        Preference("what is 2 plus 2 ?", "it is 4 .", "it is 5 .", {"gold_chosen": 1.0, "gold_rejected": 1.0}),
    ]
    result = evaluate_reward_model(LengthReward(), tok, rows)
    # lengths (with eos): 5 vs 2, 2 vs 5, 4 vs 4 -> chosen wins once, loses once, ties once
    assert result["accuracy"] == pytest.approx(1 / 3, abs=1e-6)
    assert result["margin"] == pytest.approx(0.0, abs=1e-6)
    assert result["gold_agreement"] == pytest.approx(0.5)  # the gold tie is skipped


def test_save_and_load_give_the_same_rewards(tmp_path, tok, rows):
    torch.manual_seed(0)
    lm = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tok)
    base = save_model(lm, tok, tmp_path / "lm")
    model, tokenizer = build_reward_model(base, RewardConfig(), seed=3)
    path = save_reward_model(model, tokenizer, tmp_path / "rm")
    loaded, _ = load_reward_model(path)
    prompts, responses = [r.prompt for r in rows[:5]], [r.chosen for r in rows[:5]]
    torch.testing.assert_close(score(model.eval(), tok, prompts, responses), score(loaded, tok, prompts, responses))
    with pytest.raises(SafetylabError, match="not a reward model"):
        load_reward_model(base)
    inside = save_reward_model(model, tokenizer, tmp_path / "run" / "members" / "0" / "artifacts" / "reward-model")
    with pytest.raises(SafetylabError, match=f"not a reward model .*; it holds {inside}: pass that directory"):
        load_reward_model(tmp_path / "run")  # a `train rm` run directory, not the model in it
    (path / "reward_head.safetensors").write_bytes(b"broken")
    with pytest.raises(SafetylabError, match="reward_head"):
        load_reward_model(path)


def test_backbone_needs_a_pad_token(tmp_path, tok):
    torch.manual_seed(0)
    base = save_model(build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tok), tok, tmp_path / "lm")
    config = base / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"pad_token": "<pad>"', '"pad_token": null'))
    with pytest.raises(SafetylabError, match="pad token"):
        backbone_from(base)


def test_conservative_reward_is_mean_minus_lambda_std():
    rewards = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    expected_std = torch.tensor([(8 / 3) ** 0.5, 0.0])
    torch.testing.assert_close(conservative_reward(rewards, 0.5), torch.tensor([3.0, 2.0]) - 0.5 * expected_std)


def test_a_prompt_too_long_for_the_context_is_an_error(tmp_path, tok, rows):
    long = Preference(" ".join(["what is 2 plus 2 ?"] * 20), "4 .", "5 .")
    model = RewardModel(dict(_backbones(tok))["gpt2"])
    with pytest.raises(SafetylabError, match="preference 2: the prompt has"):
        train_reward_model(model, tok, [rows[0], long], RewardConfig(train=TRAIN), RunDir(tmp_path / "r", {}))


def test_preference_rows_are_checked_line_by_line(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, [good, {"prompt": "p", "chosen": "a"}])
    with pytest.raises(SafetylabError, match=r"prefs.jsonl, line 2: expected a string field 'rejected'"):
        read_preferences(path)
    write_jsonl(path, [good, {**good, "chosen": "  "}])
    with pytest.raises(SafetylabError, match="line 2: field 'chosen' is empty"):
        read_preferences(path)
    write_jsonl(path, [good, {**good, "rejected": "a"}, {**good, "extra": 1}])
    prefs = read_preferences(path)
    assert len(prefs) == 2 and prefs.skipped == [(2, "chosen and rejected are identical")]
    assert prefs.rows[1].meta == {"extra": 1}
    write_jsonl(path, [{**good, "rejected": "a"}])
    with pytest.raises(SafetylabError, match=r"no usable preference pairs \(1 skipped: chosen and rejected are "
                                             r"identical on line 1\)"):
        read_preferences(path)


def test_preference_records_from_python_are_checked_too():
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(SafetylabError, match="mine, line 2: expected an object with prompt, chosen and rejected"):
        preferences_from_records([good, ["p", "a", "b"]], where="mine")
    with pytest.raises(SafetylabError, match="line 1: field 'prompt' is empty"):
        preferences_from_records([{**good, "prompt": " \n"}])
    with pytest.raises(SafetylabError, match="line 1: expected a string field 'chosen'"):
        preferences_from_records([{**good, "chosen": 3}])
    prefs = preferences_from_records([good, {**good, "rejected": " a "}])  # identical but for whitespace
    assert len(prefs) == 1 and prefs.skipped == [(2, "chosen and rejected are identical")]


def test_an_ensemble_of_seeds_differs_in_its_heads(tmp_path, tok):
    torch.manual_seed(0)
    base = save_model(build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tok), tok, tmp_path / "lm")
    heads = [build_reward_model(base, replace(RewardConfig(), members=2), seed=s)[0].head.weight for s in (0, 1)]
    assert not torch.equal(heads[0], heads[1])


def test_ensemble_members_get_seeds_by_purpose_and_member_0_keeps_the_root():
    assert member_seed(7, 0) == 7  # a single reward model is the one a plain run of the seed trains
    assert member_seed(7, 1) == derive_seed(7, "reward-member", 1)
    members = {(root, i): member_seed(root, i) for root in range(4) for i in range(3)}
    assert len(set(members.values())) == len(members)  # seed 0's member 1 is not seed 1's member 0


def test_fit_reward_models_trains_member_i_on_its_seed_and_leaves_the_global_generator(tmp_path, tok, rows):
    torch.manual_seed(0)
    base = save_model(build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tok), tok, tmp_path / "lm")
    config = RewardConfig(train=replace(TRAIN, steps=2, log_every=1, checkpoint_every=2, seed=3), members=2)
    models, _ = fit_reward_models(base, rows, config, RunDir(tmp_path / "rm", {}))
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    for i in range(len(models)):
        seed = member_seed(3, i)
        saved = json.loads((tmp_path / "rm" / "members" / str(i) / "config.json").read_text())
        assert saved["reward"]["train"]["seed"] == seed
        fresh, _ = build_reward_model(base, config, seed)  # the member's head before training, from its seed
        assert torch.equal(torch.random.get_rng_state(), state)  # built without touching the global generator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = RewardModel(fresh.backbone)
        assert torch.equal(fresh.head.weight, expected.head.weight)
    assert not torch.equal(models[0].head.weight, models[1].head.weight)


def test_train_rm_command_trains_an_ensemble_from_a_user_file(tmp_path, tok, world):
    import json

    from typer.testing import CliRunner

    from safetylab import cli

    torch.manual_seed(0)
    base = save_model(build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tok), tok, tmp_path / "lm")
    records = world.preferences(40, "typical")
    records.insert(3, {**records[3], "rejected": records[3]["chosen"]})
    write_jsonl(tmp_path / "prefs.jsonl", records)
    args = ["train", "rm", "--base", str(base), "--preferences", str(tmp_path / "prefs.jsonl"), "--members", "2",
            "--steps", "3", "--out", str(tmp_path / "rm"), "--device", "cpu"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert report["skipped"] == 1 and report["held_out_pairs"] == 4  # 40 usable pairs, the last tenth held out
    assert {"member 0", "member 1", "ensemble mean"} <= set(report)
    assert 0.0 <= report["ensemble mean"]["gold_agreement"] <= 1.0
    for i in (0, 1):
        loaded, _ = load_reward_model(tmp_path / "rm" / "members" / str(i) / "artifacts" / "reward-model")
        assert isinstance(loaded, RewardModel)


@pytest.mark.parametrize("layout", ["padded", "shared-prompt", "packed"])
def test_sampled_token_ids_score_as_their_text(tok, world, layout):
    # a reward model with the policy's tokenizer reads samples' ids as score() reads their text
    torch.manual_seed(0)
    reward_model = RewardModel(GPT2Model(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32))).eval()
    prompts = [r.prompt for r in world.requests("arithmetic", "train", 3) for _ in range(3)]
    texts = ["7 .", "it is 12 .", "i am not sure"] * 3
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, ids))
    tokens = torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in ids])
    mask = (torch.arange(width) < torch.tensor([len(r) for r in ids])[:, None]).float()
    samples = Samples(prompts, texts, tokens, torch.zeros_like(mask), mask, torch.ones(len(texts), dtype=torch.bool))
    batch = samples.to_batch(tok)
    expected = score(reward_model, tok, prompts, texts)
    torch.testing.assert_close(sample_rewards(reward_model, samples, batch, layout), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sample_rewards(lambda p, r: score(reward_model, tok, p, r), samples, batch), expected)


def test_a_policy_trainer_gets_the_reward_model_only_with_the_same_tokenizer(tok):
    from safetylab.models import train_tokenizer

    reward_model = RewardModel(GPT2Model(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32)))
    assert policy_reward(reward_model, tok, tok) is reward_model
    other = train_tokenizer(["a different corpus with other words <eos>"] * 4)
    assert not isinstance(policy_reward(reward_model, tok, other), nn.Module)  # scores text instead
