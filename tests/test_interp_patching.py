"""Activation patching: the metric and the normalised score on hand-made numbers, patching on GPT-2 and Llama
built from a config against runs patched by hand with ``intervene``, and fact-recall prompts of the world."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from safetylab.core.errors import ConfigError, SafetylabError
from safetylab.interp import Hooks
from safetylab.interp.patching import (
    FactPatchingConfig,
    Patch,
    fact_pairs,
    fact_prompt_ids,
    fact_recall_patching,
    logit_difference,
    logit_difference_metric,
    normalised_score,
    patch_by_position,
    patch_heads,
    patch_runs,
    run_patched,
)
from safetylab.interp.plots import plot_patching


def gpt2(vocab=40):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def llama(vocab=40):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


MODELS = {"gpt2": gpt2, "llama": llama}
CLEAN = torch.randint(1, 40, (3, 6), generator=torch.Generator().manual_seed(1))
CORRUPT = CLEAN.clone()
CORRUPT[:, 2] = (CLEAN[:, 2] + 7) % 39 + 1  # one token replaced in each row, as a subject would be
ANSWERS = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


metric = logit_difference_metric(*ANSWERS)


def test_logit_difference_and_normalised_score_on_hand_made_numbers():
    logits = torch.tensor([[[9.0, 9.0, 9.0], [1.0, 4.0, -2.0]], [[0.0, 0.0, 0.0], [3.0, 0.5, 2.0]]])
    torch.testing.assert_close(logit_difference(logits, torch.tensor([1, 0]), torch.tensor([2, 1])),
                               torch.tensor([6.0, 2.5]))  # last position: 4 − (−2), 3 − 0.5
    torch.testing.assert_close(logit_difference(logits[:, -1], torch.tensor([0, 2]), torch.tensor([0, 0])),
                               torch.tensor([0.0, -1.0]))
    torch.testing.assert_close(normalised_score(torch.tensor([1.5, 3.0, -1.0, 5.0]), 3.0, -1.0),
                               torch.tensor([0.625, 1.0, 0.0, 1.5]))
    with pytest.raises(SafetylabError, match="equals the corrupted one"):
        normalised_score(1.0, 2.0, 2.0)
    with pytest.raises(SafetylabError, match=r"expected \(batch, \[pos,\] vocab\)"):
        logit_difference(logits, torch.tensor([1, 0, 0]), torch.tensor([2, 1, 0]))


def test_patching_everything_at_layer_0_restores_the_clean_run_and_nothing_restores_nothing(model):
    hooks = Hooks(model)
    _, clean_cache = hooks.run_with_cache(CLEAN, names="blocks.0.resid_pre")
    with torch.no_grad():
        clean_ld, corrupt_ld = metric(model(CLEAN).logits).mean(), metric(model(CORRUPT).logits).mean()
    everything = metric(run_patched(hooks, CORRUPT, clean_cache, [Patch("blocks.0.resid_pre")])).mean()
    nothing = metric(run_patched(hooks, CORRUPT, clean_cache, [])).mean()
    assert float(normalised_score(everything, clean_ld, corrupt_ld)) == pytest.approx(1.0, abs=1e-4)
    assert float(normalised_score(nothing, clean_ld, corrupt_ld)) == pytest.approx(0.0, abs=1e-4)


def test_position_map_is_one_where_the_prompts_differ_and_at_the_end(model):
    hooks = Hooks(model)
    result = patch_by_position(hooks, CLEAN, CORRUPT, ["blocks.0.resid_pre", "blocks.1.resid_post"], metric)
    assert result.scores.shape == (2, 6) and result.patched.shape == (2, 6, 3)
    first, last = result.scores
    # the stream entering block 0 differs only at the replaced token; the last stream acts only at the last
    torch.testing.assert_close(first, torch.eye(6)[2], atol=1e-4, rtol=0)
    torch.testing.assert_close(last, torch.eye(6)[5], atol=1e-4, rtol=0)
    assert result.top(1)[0] == {"name": "blocks.0.resid_pre", "position": 2, "score": pytest.approx(1.0, abs=1e-4)}
    noised = patch_by_position(hooks, CLEAN, CORRUPT, ["blocks.0.resid_pre"], metric, mode="noise")
    torch.testing.assert_close(noised.scores[0], 1 - torch.eye(6)[2], atol=1e-4, rtol=0)  # the clean answer is lost
    assert noised.top(1)[0] == {"name": "blocks.0.resid_pre", "position": 2, "score": pytest.approx(0.0, abs=1e-4)}


@pytest.mark.parametrize("mode", ["denoise", "noise"])
def test_patched_cells_equal_runs_patched_by_hand(model, mode):
    hooks = Hooks(model)
    names = ["blocks.0.attn.out", "blocks.1.mlp.out", "blocks.1.resid_pre", "blocks.0.attn.z"]
    batched = patch_by_position(hooks, CLEAN, CORRUPT, names, metric, mode=mode, max_rows=7)  # 2 cells a forward
    whole = patch_by_position(hooks, CLEAN, CORRUPT, names, metric, mode=mode)
    assert whole.names == names  # rows in the order asked for, not the forward order
    torch.testing.assert_close(batched.patched, whole.patched, atol=1e-3, rtol=1e-3)
    source, target = (CLEAN, CORRUPT) if mode == "denoise" else (CORRUPT, CLEAN)
    _, cache = hooks.run_with_cache(source, names=names)
    for row, name in enumerate(names):
        for position in (0, 2, 5):
            def put(act, name=name, position=position):
                act = act.clone()
                act[:, position] = cache[name][:, position]
                return act
            with torch.no_grad(), hooks.intervene({name: put}):
                by_hand = metric(model(target).logits)
            torch.testing.assert_close(whole.patched[row, position], by_hand, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(whole.clean, metric(model(CLEAN).logits).detach(), atol=1e-3, rtol=1e-3)


def test_head_patching_equals_one_head_patched_by_hand(model):
    hooks = Hooks(model)
    result = patch_heads(hooks, CLEAN, CORRUPT, metric, positions=[2, 5], max_rows=5)
    assert result.names == ["blocks.0.attn.z", "blocks.1.attn.z"] and result.patched.shape == (2, 4, 3)
    _, cache = hooks.run_with_cache(CLEAN, names="blocks.1.attn.z")

    def put(act):
        act = act.clone()
        act[:, [2, 5], 3] = cache["blocks.1.attn.z"][:, [2, 5], 3]
        return act
    with torch.no_grad(), hooks.intervene({"blocks.1.attn.z": put}):
        by_hand = metric(model(CORRUPT).logits)
    torch.testing.assert_close(result.patched[1, 3], by_hand, atol=1e-3, rtol=1e-3)
    # all heads at every position of the last layer carry everything attention adds there
    every = metric(run_patched(hooks, CORRUPT, cache, [Patch("blocks.1.attn.z", None, (0, 1, 2, 3))]))
    _, out_cache = hooks.run_with_cache(CLEAN, names="blocks.1.attn.out")
    torch.testing.assert_close(every, metric(run_patched(hooks, CORRUPT, out_cache, [Patch("blocks.1.attn.out")])),
                               atol=1e-3, rtol=1e-3)


def test_bad_input_is_refused(model):
    hooks = Hooks(model)
    with pytest.raises(SafetylabError, match="of one shape"):
        patch_by_position(hooks, CLEAN, CORRUPT[:, :5], ["blocks.0.resid_pre"], metric)
    with pytest.raises(SafetylabError, match="valid names"):
        patch_by_position(hooks, CLEAN, CORRUPT, ["blocks.0.resid"], metric)
    with pytest.raises(ConfigError, match="mode"):
        patch_runs(hooks, CLEAN, CORRUPT, [Patch("blocks.0.resid_pre")], metric, mode="both")
    with pytest.raises(SafetylabError, match="expected an attn.z point"):
        patch_runs(hooks, CLEAN, CORRUPT, [Patch("blocks.0.resid_pre", heads=(1,))], metric)
    _, short = hooks.run_with_cache(CLEAN[:2], names="blocks.0.resid_pre")
    with pytest.raises(SafetylabError, match=r"source activations of shape \(2, 6, 32\)"):
        run_patched(hooks, CORRUPT, short, [Patch("blocks.0.resid_pre")])
    with pytest.raises(ConfigError, match="relation"):
        FactPatchingConfig(relation="president")


def test_fact_prompts_replace_the_country_where_it_is_written(tok, world):
    a, b = world.countries[:2]
    ids = fact_prompt_ids(tok, "capital", a.name)
    assert tok.decode(ids) == f"<user> what is the capital of {a.name} ? <assistant> the capital of {a.name} is"
    model = gpt2(len(tok))
    pairs, counts = fact_pairs(Hooks(model), tok, world, "capital", n_pairs=10, known_only=False)
    assert counts == {"countries": 40, "one_token": 40, "known": 40, "pairs": 10}
    assert pairs.clean.shape == pairs.corrupt.shape == (10, len(ids))
    assert pairs.subject_positions == [6, 12]
    assert pairs.tokens[5:8] == ["of", "<subject>", "?"]
    capitals = {c.name: c.capital for c in world.countries}
    for i, (clean, corrupt) in enumerate(pairs.subjects):
        assert clean != corrupt and tok.convert_ids_to_tokens(int(pairs.answer_clean[i])) == capitals[clean]
        assert tok.convert_ids_to_tokens(int(pairs.answer_corrupt[i])) == capitals[corrupt]
        assert tok.convert_ids_to_tokens(pairs.corrupt[i, 6:13:6].tolist()) == [corrupt, corrupt]


def test_fact_recall_patching_end_to_end(tok, world, tmp_path):
    model = gpt2(len(tok))
    result = fact_recall_patching(Hooks(model), tok, world, FactPatchingConfig(n_pairs=6, known_only=False))
    n = len(result.tokens)
    assert result.resid.names == ["blocks.0.resid_pre", "blocks.1.resid_pre", "blocks.1.resid_post"]
    assert result.resid.scores.shape == (3, n) and result.attn.scores.shape == (2, n)
    assert result.heads.scores.shape == (2, 4)
    torch.testing.assert_close(result.resid.scores[-1], torch.eye(n)[-1], atol=1e-4, rtol=0)
    summary = result.summary()
    top = summary["top_resid"]
    assert summary["pairs"] == 6 and top[0]["score"] >= 1 - 1e-4 and top[0]["score"] >= top[1]["score"]
    assert all(row["token"] == result.tokens[row["position"]] for row in top)
    path = plot_patching({"residual stream": result.resid, "attention": result.attn}, tmp_path / "patching.png")
    assert path.stat().st_size > 1000
