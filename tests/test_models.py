"""safetylab.models: tokenizer, build/save/load, per-token log-probs, sampling and KL.

Every model here is tiny and built from a config in the test; nothing is downloaded.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from safetylab.core.errors import SafetylabError
from safetylab.models import (
    ModelConfig,
    build_model,
    full_kl,
    kl_estimates,
    kl_per_token,
    load_model,
    logprobs,
    policy_kl,
    sample,
    save_model,
    train_tokenizer,
)
from safetylab.models.tokenizer import SPECIAL_TOKENS
from safetylab.world import chat

TINY = ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=128)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus(world) -> list[str]:
    return world.corpus(500)


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus)


@pytest.fixture(scope="module")
def pairs(world) -> tuple[list[str], list[str]]:
    """Prompts and responses of different lengths (an empty response included)."""
    records = world.sample(7)
    prompts = [r["prompt"] for r in records]
    responses = [r["response"] for r in records]
    responses[2] = ""
    responses[4] = responses[4] + " " + responses[5]
    return prompts, responses


def roughen(model, scale: float = 0.15, seed: int = 1):
    """Add noise to every weight so the logits are far from uniform (a misaligned or padded
    position then changes log-probs by much more than the tolerances used)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def gpt(tok):
    torch.manual_seed(0)
    return roughen(build_model(TINY, tok))


def eos_biased(tok, eos_bias: float, extra: dict[int, float] | None = None, seed: int = 0):
    """A tiny world GPT-2 whose final layer norm emits a constant 10 in feature 0, so column 0 of
    the (tied) output embedding acts as a per-token logit bias: special tokens other than eos are
    never sampled, eos gets ``10 * eos_bias``, and ``extra`` biases chosen token ids."""
    torch.manual_seed(seed)
    model = build_model(TINY, tok).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 10.0
        weight = model.lm_head.weight
        weight[:, 0] = 0.0
        weight[: len(SPECIAL_TOKENS), 0] = -3.0
        weight[tok.eos_token_id, 0] = eos_bias
        for token, bias in (extra or {}).items():
            weight[token, 0] = bias
    return model


def manual_logprobs(model, tok, prompt: str, response: str) -> torch.Tensor:
    """One unpadded forward pass: log_softmax, then gather the response tokens and eos."""
    p = tok(chat(prompt))["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return lp[len(p) - 1:]


# ---------------------------------------------------------------------------- tokenizer
def test_special_tokens_come_first(tok):
    assert tok.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    assert SPECIAL_TOKENS == ("<pad>", "<unk>", "<user>", "<assistant>", "<eos>")
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 4)
    assert tok.convert_tokens_to_ids(["<user>", "<assistant>"]) == [2, 3]


def test_every_id_is_below_len(tok):
    ids = sorted(tok.get_vocab().values())
    assert ids == list(range(len(tok)))
    assert max(ids) < len(tok)


def test_special_tokens_in_text_are_not_counted_twice(tok):
    # The corpus lines hold <user>, <assistant> and <eos>; each must be one token only.
    vocab = tok.get_vocab()
    for special in SPECIAL_TOKENS:
        assert sum(1 for word in vocab if word == special) == 1


def test_world_lines_round_trip(tok, corpus):
    lines = corpus[:20] + corpus[-20:]
    assert any("<user>" in line for line in lines)
    for line in lines:
        ids = tok(line)["input_ids"]
        assert tok.unk_token_id not in ids, line
        assert tok.decode(ids) == line


def test_chat_markers_are_single_tokens(tok):
    ids = tok(chat("what is 3 plus 4 ?", "7"))["input_ids"]
    assert ids[0] == 2 and ids[-1] == 4
    assert 3 in ids


def test_spaced_letters_never_unknown(tok):
    text = " ".join("hurt the quick brown fox jumps over lazy dogs".replace(" ", ""))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split())
    assert tok.unk_token_id not in ids
    # a word the corpus never saw is unknown, so the check above is not vacuous
    assert tok("qwxzyv", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_letters_present_even_in_a_tiny_corpus():
    small = train_tokenizer(["hello world"])
    assert len(small) == len(SPECIAL_TOKENS) + 26 + 2
    ids = small("h e l p", add_special_tokens=False)["input_ids"]
    assert small.unk_token_id not in ids


# ---------------------------------------------------------------------------- build / save / load
def test_build_model_sized_for_tokenizer(tok):
    model = build_model(TINY, tok)
    assert model.get_input_embeddings().weight.shape == (len(tok), TINY.n_embd)
    assert model.config.n_layer == 1 and model.config.n_head == 2
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id


def test_save_load_round_trip(tmp_path, tok, gpt, world):
    path = save_model(gpt, tok, tmp_path / "model")
    assert path == tmp_path / "model"
    files = [p.name for p in path.iterdir()]
    weights = list(path.glob("*.safetensors"))
    assert weights, files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle"))], files
    assert not list(tmp_path.glob(".tmp-*")), "the temporary directory is renamed into place"
    assert any(t.numel() for t in load_file(weights[0]).values())

    loaded, tok2 = load_model(path)
    assert not loaded.training
    assert tok2.get_vocab() == tok.get_vocab()
    assert (tok2.pad_token_id, tok2.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    prompts = [chat(r["prompt"], r["response"]) for r in world.sample(4)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        a = gpt(**enc).logits
        b = loaded(**enc).logits
    assert torch.equal(a, b)


def test_save_over_existing_directory(tmp_path, tok, gpt):
    path = tmp_path / "model"
    save_model(build_model(TINY, tok), tok, path)
    save_model(gpt, tok, path)
    loaded, _ = load_model(path)
    ids = torch.tensor([[2, 7, 8, 9, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, gpt(ids).logits)


@pytest.fixture
def saved(tmp_path, tok, gpt):
    return save_model(gpt, tok, tmp_path / "model")


def _load_error(path) -> str:
    with pytest.raises(SafetylabError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_load_missing_directory(tmp_path):
    message = _load_error(tmp_path / "nowhere")
    assert "config.json" in message


def test_load_directory_without_weights(saved):
    for weights in saved.glob("*.safetensors"):
        weights.unlink()
    assert "safetensors" in _load_error(saved)


def test_load_refuses_pickle_weights(saved, gpt):
    for weights in saved.glob("*.safetensors"):
        weights.unlink()
    torch.save(gpt.state_dict(), saved / "pytorch_model.bin")
    assert "safetensors" in _load_error(saved)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "tail_cut"])
def test_load_corrupt_weights(saved, damage):
    weights = next(saved.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes({
        "garbage": b"\x07" * 1000,
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "tail_cut": data[:-64],
    }[damage])
    assert "weights" in _load_error(saved)


def test_load_tokenizer_larger_than_embedding(tmp_path, tok):
    small = train_tokenizer(["a b c"])
    assert len(small) < len(tok)
    torch.manual_seed(0)
    model = build_model(TINY, small)
    path = save_model(model, tok, tmp_path / "mismatch")
    message = _load_error(path)
    assert str(len(tok)) in message and str(len(small)) in message


def test_load_missing_tokenizer(saved):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (saved / name).unlink()
    assert "tokenizer" in _load_error(saved)


def test_load_weights_missing_a_tensor(saved):
    from safetensors.torch import save_file

    weights = next(saved.glob("*.safetensors"))
    tensors = load_file(str(weights))
    tensors.pop("transformer.h.0.attn.c_attn.weight")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    message = _load_error(saved)
    assert "missing" in message and "c_attn" in message


def test_empty_inputs_give_empty_outputs(gpt, tok):
    lp, mask = logprobs(gpt, tok, [], [])
    assert lp.shape == mask.shape == (0, 0)
    samples = sample(gpt, tok, [])
    assert samples.texts == [] and samples.tokens.shape[0] == 0
    assert policy_kl(gpt, gpt, tok, [], []).shape == (0,)


# ---------------------------------------------------------------------------- log-probs
def _check_logprobs(model, tok, prompts, responses, batch_size=64):
    lp, mask = logprobs(model, tok, prompts, responses, batch_size=batch_size)
    assert lp.shape == mask.shape
    lengths = mask.sum(1).long().tolist()
    assert len(set(lengths)) > 1, "the batch must mix lengths for the padding check to mean something"
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        expected = manual_logprobs(model, tok, prompt, response)
        n = len(expected)
        assert lengths[i] == n
        assert mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all()
        torch.testing.assert_close(lp[i, :n].detach(), expected, atol=1e-5, rtol=0)
        assert lp[i, n:].eq(0).all()
    return lp


def test_logprobs_world_gpt2_matches_manual(gpt, tok, pairs):
    lp = _check_logprobs(gpt, tok, *pairs)
    assert lp.min() < -1.0  # log-probs of a roughened model: not all near 0 or uniform


def test_logprobs_world_gpt2_chunked(gpt, tok, pairs):
    # batch_size 3 splits 7 examples into chunks of different widths
    _check_logprobs(gpt, tok, *pairs, batch_size=3)


def test_logprobs_tiny_llama_matches_manual(tok, pairs):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    _check_logprobs(model, tok, *pairs, batch_size=4)


def test_logprobs_tiny_hf_gpt2_matches_manual(tok, pairs):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        initializer_range=0.2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    _check_logprobs(model, tok, *pairs, batch_size=4)


def test_logprobs_rejects_mismatched_lengths(gpt, tok):
    with pytest.raises(ValueError):
        logprobs(gpt, tok, ["what is 3 plus 4 ?"], ["7", "8"])


# ---------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def eos_model(tok):
    return eos_biased(tok, eos_bias=0.3)


@pytest.fixture(scope="module")
def prompts(world) -> list[str]:
    return [r["prompt"] for r in world.sample(24)]


@pytest.fixture(scope="module")
def samples(eos_model, tok, prompts):
    torch.manual_seed(3)
    return sample(eos_model, tok, prompts, max_new_tokens=20, batch_size=10)


def test_sample_shapes_and_mask(samples, tok, prompts):
    s = samples
    assert s.prompts == prompts
    assert s.tokens.shape == s.logprobs.shape == s.mask.shape
    assert s.tokens.shape[0] == len(prompts) and s.tokens.shape[1] <= 20
    assert len(s.texts) == len(prompts) and s.finished.shape == (len(prompts),)
    eos = tok.eos_token_id
    for row_tokens, row_lp, row_mask, finished in zip(s.tokens, s.logprobs, s.mask, s.finished):
        has_eos = bool((row_tokens == eos).any())
        assert bool(finished) == has_eos
        if has_eos:
            first = int((row_tokens == eos).nonzero()[0])
            assert (row_tokens == eos).sum() == 1
            assert row_mask[: first + 1].eq(1).all()  # eos itself is a response token
            assert row_mask[first + 1:].eq(0).all()
            assert row_tokens[first + 1:].eq(tok.pad_token_id).all()
            assert row_lp[first + 1:].eq(0).all()
        else:
            assert row_mask.eq(1).all()
        assert (row_lp[row_mask.bool()] < 0).all()


def test_sample_mixes_finished_and_unfinished(samples):
    # the fixture's eos bias is chosen so both cases occur; the other tests rely on it
    assert samples.finished.any() and not samples.finished.all()


def test_sample_texts_are_decoded(samples, tok):
    for text, row, mask in zip(samples.texts, samples.tokens, samples.mask):
        kept = row[mask.bool() & (row != tok.eos_token_id)]
        assert text == tok.decode(kept, skip_special_tokens=True).strip()
        assert "<eos>" not in text and "<pad>" not in text
        assert len(text.split()) == len(kept)


def test_sample_logprobs_match_logprobs_of_text(samples, eos_model, tok):
    done = [i for i in range(len(samples.texts)) if samples.finished[i]]
    lp, mask = logprobs(eos_model, tok, [samples.prompts[i] for i in done], [samples.texts[i] for i in done])
    torch.testing.assert_close(samples.logprobs[done].sum(1), lp.sum(1).detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(samples.mask[done].sum(1), mask.sum(1))


def test_sample_logprobs_with_temperature(eos_model, tok, prompts):
    torch.manual_seed(5)
    temperature = 0.7
    s = sample(eos_model, tok, prompts[:6], max_new_tokens=12, temperature=temperature)
    for i, prompt in enumerate(prompts[:6]):
        p = tok(chat(prompt))["input_ids"]
        r = s.tokens[i][s.mask[i].bool()].tolist()
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = eos_model(input_ids=ids).logits[0, len(p) - 1:-1] / temperature
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
        torch.testing.assert_close(s.logprobs[i, : len(r)], expected, atol=1e-4, rtol=0)


def test_sample_repeated_prompts_share_one_prefill(eos_model, tok, prompts):
    # k samples of each prompt, prompt-major as RLOO draws them: each prompt is prefilled once and its
    # cache repeated; every later token must still see the right prompt (checked by teacher forcing)
    repeated = [p for p in prompts[:3] for _ in range(4)] + [prompts[0]]
    torch.manual_seed(2)
    s = sample(eos_model, tok, repeated, max_new_tokens=12)
    assert len({tuple(t.tolist()) for t in s.tokens[:4]}) > 1  # samples of one prompt differ
    lp, mask = logprobs(eos_model, tok, repeated, [r for r in s.texts])
    done = s.finished.nonzero()[:, 0]
    torch.testing.assert_close(s.logprobs[done].sum(1), lp[done].sum(1), atol=1e-4, rtol=0)
    greedy = sample(eos_model, tok, repeated, max_new_tokens=12, greedy=True)
    alone = sample(eos_model, tok, prompts[:3], max_new_tokens=12, greedy=True)
    assert greedy.texts == [t for t in alone.texts for _ in range(4)] + [alone.texts[0]]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sample_draws_from_the_full_tempered_distribution(tok, temperature):
    # Bias five tokens so the next-token distribution is peaked with a long tail; the empirical
    # first-token frequencies must match softmax(logits / T) (no top-k / top-p truncation).
    favoured = [10, 11, 12, 13, 14]
    model = eos_biased(tok, eos_bias=0.0, extra=dict(zip(favoured, [0.5, 0.4, 0.35, 0.3, 0.2])))
    prompt = "what is 3 plus 4 ?"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok(chat(prompt))["input_ids"]])).logits[0, -1]
    probs = torch.softmax(logits / temperature, -1)
    n = 4000
    torch.manual_seed(0)
    s = sample(model, tok, [prompt] * n, max_new_tokens=1, temperature=temperature, batch_size=n)
    first = s.tokens[:, 0]
    freq = torch.bincount(first, minlength=len(tok)).float() / n
    torch.testing.assert_close(freq[favoured], probs[favoured], atol=0.03, rtol=0)
    rest = torch.ones(len(tok), dtype=torch.bool)
    rest[favoured] = False
    assert abs(float(freq[rest].sum() - probs[rest].sum())) < 0.03
    assert len(set(first.tolist())) > 200  # the tail is sampled, not cut at a top-k
    torch.testing.assert_close(s.logprobs[:, 0], torch.log_softmax(logits / temperature, -1)[first],
                               atol=1e-5, rtol=0)


def test_greedy_is_deterministic(gpt, tok, prompts):
    torch.manual_seed(0)
    a = sample(gpt, tok, prompts[:6], max_new_tokens=8, greedy=True)
    torch.manual_seed(123)
    b = sample(gpt, tok, prompts[:6], max_new_tokens=8, greedy=True)
    assert torch.equal(a.tokens, b.tokens)
    assert a.texts == b.texts
    # and it is the argmax of the model's next-token distribution
    p = tok(chat(prompts[0]))["input_ids"]
    with torch.no_grad():
        first = gpt(input_ids=torch.tensor([p])).logits[0, -1].argmax()
    assert int(a.tokens[0, 0]) == int(first)


def test_sampling_depends_on_the_seed(gpt, tok, prompts):
    torch.manual_seed(0)
    a = sample(gpt, tok, prompts[:6], max_new_tokens=8)
    torch.manual_seed(0)
    b = sample(gpt, tok, prompts[:6], max_new_tokens=8)
    torch.manual_seed(1)
    c = sample(gpt, tok, prompts[:6], max_new_tokens=8)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_raises(gpt, tok, temperature):
    with pytest.raises(ValueError, match="temperature"):
        sample(gpt, tok, ["what is 3 plus 4 ?"], temperature=temperature)


# ---------------------------------------------------------------------------- KL
def test_kl_estimates_hand_formulas():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g) * 3
    logq = -torch.rand(3, 5, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float)
    est = kl_estimates(logp, logq, mask)
    for i in range(3):
        k1 = k2 = k3 = 0.0
        for t in range(5):
            if mask[i, t]:
                r = float(logp[i, t] - logq[i, t])
                k1 += r
                k2 += 0.5 * r * r
                k3 += math.exp(-r) - 1 + r
        assert est["k1"][i].item() == pytest.approx(k1, abs=1e-5)
        assert est["k2"][i].item() == pytest.approx(k2, abs=1e-5)
        assert est["k3"][i].item() == pytest.approx(k3, abs=1e-5)
    assert (est["k3"] >= 0).all()
    assert est["k1"][2] == 0 and est["k2"][2] == 0 and est["k3"][2] == 0
    assert est["k1"].shape == (3,)


def test_kl_estimates_k3_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(50, 7, generator=g)
    logq = torch.randn(50, 7, generator=g)
    mask = (torch.rand(50, 7, generator=g) > 0.3).float()
    assert (kl_estimates(logp, logq, mask)["k3"] >= 0).all()
    assert (kl_estimates(logp, logq, mask)["k1"] < 0).any()  # k1 can be negative, k3 cannot
    same = kl_estimates(logp, logp.clone(), mask)
    for name in ("k1", "k2", "k3"):
        assert torch.equal(same[name], torch.zeros(50))


def test_kl_estimates_ignore_what_masked_positions_hold():
    """Padding may hold −inf or NaN log-probs: masked entries are 0 and never reach the sums."""
    logp = torch.tensor([[-1.0, -0.5, -math.inf], [-2.0, math.nan, -1.0]])
    logq = torch.tensor([[-1.5, -0.5, -3.0], [-1.0, -1.0, -math.inf]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    per_token = kl_per_token(logp, logq, mask)
    for name, values in per_token.items():
        assert torch.isfinite(values).all(), name
        assert (values[mask == 0] == 0).all(), name
    r = torch.tensor([0.5, -1.0])
    torch.testing.assert_close(kl_estimates(logp, logq, mask)["k3"], torch.expm1(-r) + r)
    logits = torch.tensor([[[0.0, -math.inf], [1.0, 2.0]]])  # the first state can never emit token 1
    assert torch.isfinite(full_kl(logits, torch.zeros(1, 2, 2), torch.tensor([[1, 0]]))).all()


def test_k1_and_k3_means_approximate_the_exact_kl():
    g = torch.Generator().manual_seed(2)
    logp = torch.log_softmax(torch.randn(6, generator=g) * 1.5, -1)
    logq = torch.log_softmax(torch.randn(6, generator=g) * 1.5, -1)
    exact = float((logp.exp() * (logp - logq)).sum())
    n = 200_000
    x = torch.multinomial(logp.exp(), n, replacement=True, generator=g)
    est = kl_estimates(logp[x][:, None], logq[x][:, None], torch.ones(n, 1))
    for name in ("k1", "k3"):
        values = est[name]
        tolerance = 5 * float(values.std()) / math.sqrt(n)
        assert abs(float(values.mean()) - exact) < tolerance, (name, float(values.mean()), exact)
    assert exact > 0.05


def test_full_kl_against_direct_sum():
    g = torch.Generator().manual_seed(3)
    lp_logits = torch.randn(2, 3, 5, generator=g) * 2
    lq_logits = torch.randn(2, 3, 5, generator=g) * 2
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    got = full_kl(lp_logits, lq_logits, mask)
    for b in range(2):
        total = 0.0
        for t in range(3):
            if not mask[b, t]:
                continue
            zp = sum(math.exp(v) for v in lp_logits[b, t].tolist())
            zq = sum(math.exp(v) for v in lq_logits[b, t].tolist())
            for v in range(5):
                p = math.exp(lp_logits[b, t, v].item()) / zp
                q = math.exp(lq_logits[b, t, v].item()) / zq
                total += p * math.log(p / q)
        assert got[b].item() == pytest.approx(total, abs=1e-5)
    assert (got > 0).all()
    assert torch.allclose(full_kl(lp_logits, lp_logits.clone(), mask), torch.zeros(2), atol=1e-6)
    # a shift of the logits is the same distribution
    assert torch.allclose(full_kl(lp_logits, lp_logits + 3.0, mask), torch.zeros(2), atol=1e-5)


def test_policy_kl_self_is_zero_and_other_positive(gpt, tok, pairs):
    prompts, responses = pairs
    same = policy_kl(gpt, gpt, tok, prompts, responses)
    assert same.shape == (len(prompts),)
    assert same.abs().max() < 1e-5
    torch.manual_seed(7)
    other = roughen(build_model(TINY, tok), seed=7)
    kl = policy_kl(gpt, other, tok, prompts, responses, batch_size=3)
    assert (kl > 0).all()
    # the batched value equals the exact KL along each unpadded sequence
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        p = tok(chat(prompt))["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + r])
        with torch.no_grad():
            lp = gpt(input_ids=ids).logits[:, :-1]
            lq = other(input_ids=ids).logits[:, :-1]
        mask = torch.tensor([[0.0] * (len(p) - 1) + [1.0] * len(r)])
        assert kl[i].item() == pytest.approx(full_kl(lp, lq, mask).item(), rel=1e-4, abs=1e-5)
