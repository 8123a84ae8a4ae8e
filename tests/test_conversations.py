"""One conversation encoder: every stage (SFT, reward models, DPO, PPO/RLOO's batch, sampling) turns a
(prompt, response) into the same token ids, through the tokenizer's own chat template.

Two tokenizers are built offline with ``tokenizers`` (byte-level BPE, as GPT-2's and Llama 3's are)
for a tiny GPT-2 and a tiny Llama, each with a chat template of its own; the world's tokenizer carries
one that writes exactly what ``world.chat`` writes.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safetylab.align.data import Preference, tokenize_preferences
from safetylab.align.reward import RewardModel, encode_rewards, policy_reward, prompt_tokens
from safetylab.core.errors import SafetylabError
from safetylab.models import (
    WORLD_CHAT_TEMPLATE,
    encode_conversation,
    encode_pairs,
    load_model,
    render_conversation,
    sample,
    save_model,
    train_tokenizer,
)
from safetylab.models.logprobs import conversation_ids
from safetylab.models.sampling import Samples
from safetylab.models.tokenizer import adopt_world_template
from safetylab.models.train import chat_examples
from safetylab.world import KINDS, STYLES, chat

# A Zephyr-style template: every turn closed by the eos token <|end|> and a newline (which is not part
# of a response: sampling stops at eos).
GPT2_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Llama 3's shape: bos, headers, each turn closed by <|eot_id|> (the eos of Llama 3 Instruct).
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                  "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

TEXT = ["What is the capital of France? The capital of France is Paris.",
        "Please summarise this email for me. Sure: the meeting moved to Tuesday at noon.",
        "How many legs does a spider have? A spider has eight legs, and an insect has six.",
        "Write a haiku about rain. Soft rain on the roof, the garden drinks, the gutters sing.",
        "Dear team, the report is ready.\n\n", "Thanks.\n\n"] * 5  # "\n\n" at a line's end: one token

CONVERSATIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Please summarise this email for me.", "Sure: the meeting moved to Tuesday."),
    ("How many legs does a spider have?", "Eight."),
    ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks."),
]


def _bpe(specials: list[str], **named) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXT, trainer=trainer)
    return tokenizer


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>"]
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(specials), pad_token="<|pad|>", eos_token="<|end|>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"],
                                   chat_template=GPT2_TEMPLATE)


def llama_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]
    backend = _bpe(specials)
    bos = backend.token_to_id("<|begin_of_text|>")
    # like Llama 3, plain tokenization adds a bos: the encoder must not add a second one to the template's
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|pad|>",
                                   additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"],
                                   chat_template=LLAMA_TEMPLATE)


def tiny_model(name: str, tokenizer):
    torch.manual_seed(0)
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32,
                                          n_positions=256, **ids)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, **ids)).eval()


TOKENIZERS = {"gpt2": gpt2_tokenizer, "llama": llama_tokenizer}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    tokenizer = TOKENIZERS[request.param]()
    return request.param, tokenizer, tiny_model(request.param, tokenizer)


def _split(ids: torch.Tensor, attention: torch.Tensor, response: torch.Tensor) -> tuple[list[int], list[int]]:
    """One row of a Batch as (prompt ids, response ids)."""
    keep = attention.bool()
    ids, response = ids[keep].tolist(), response[keep].tolist()
    start = response.index(1)
    assert all(response[start:])  # one contiguous response to the row's end
    return ids[:start], ids[start:]


def _sampling_prompts(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    """The prompt ids ``sample`` feeds ``model`` (its prefill, left padding removed)."""
    seen = []
    forward = model.forward

    def record(*args, **kwargs):
        if not seen:
            seen.append((kwargs["input_ids"], kwargs["attention_mask"]))
        return forward(*args, **kwargs)

    model.forward = record
    try:
        torch.manual_seed(0)
        sample(model, tokenizer, prompts, max_new_tokens=3)
    finally:
        del model.forward
    ids, mask = seen[0]
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


# ---------------------------------------------------------------------------- every stage, one encoding
def test_every_stage_encodes_a_conversation_alike(setup):
    name, tok, model = setup
    prompts, responses = [p for p, _ in CONVERSATIONS], [r for _, r in CONVERSATIONS]
    expected = [encode_conversation(tok, p, r) for p, r in CONVERSATIONS]

    sft = chat_examples(tok, CONVERSATIONS, max_length=1000)
    assert [(e.ids[:e.loss_mask.index(1)], e.ids[e.loss_mask.index(1):]) for e in sft] == expected
    assert all(e.loss_mask == [0] * len(p) + [1] * len(r) for e, (p, r) in zip(sft, expected))

    dpo = encode_pairs(tok, prompts, responses)
    assert [_split(*row) for row in zip(dpo.input_ids, dpo.attention_mask, dpo.response_mask)] == expected
    assert [(p, rs[0]) for p, rs in (conversation_ids(tok, p, [r]) for p, r in CONVERSATIONS)] == expected
    rows = [Preference(p, r, "No.") for p, r in CONVERSATIONS]
    assert [(p, c) for p, c, _ in tokenize_preferences(tok, rows)] == expected

    reward = encode_rewards(tok, prompts, responses)  # a causal backbone: the conversation as every stage has it
    assert [_split(*row) for row in zip(reward.input_ids, reward.attention_mask, reward.response_mask)] == expected
    assert [prompt_tokens(tok, p) for p in prompts] == [len(p) for p, _ in expected]

    # PPO and RLOO score a sampler's token ids after their prompts (Samples.to_batch): a sampler that
    # wrote these responses gives the same rows
    width = max(len(r) for _, r in expected)
    tokens = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for _, r in expected])
    mask = (torch.arange(width) < torch.tensor([len(r) for _, r in expected])[:, None]).float()
    samples = Samples(prompts, responses, tokens, torch.zeros_like(mask), mask, torch.ones(len(prompts), dtype=bool))
    rl = samples.to_batch(tok)
    for got, want in zip((rl.input_ids, rl.attention_mask, rl.response_mask),
                         (dpo.input_ids, dpo.attention_mask, dpo.response_mask)):
        assert torch.equal(got, want)

    assert _sampling_prompts(model, tok, prompts) == [p for p, _ in expected]


def test_the_encoding_follows_the_tokenizers_own_template(setup):
    name, tok, _ = setup
    prompt, response = CONVERSATIONS[0]
    prompt_ids, response_ids = encode_conversation(tok, prompt, response)
    assert tok.decode(prompt_ids) == render_conversation(tok, prompt)
    assert response_ids[-1] == tok.eos_token_id and response_ids.count(tok.eos_token_id) == 1
    assert tok.decode(response_ids) == f"{response}{tok.eos_token}"  # the template's trailing newline is not in it
    if name == "gpt2":
        assert tok.decode(prompt_ids) == f"<|user|>\n{prompt}<|end|>\n<|assistant|>\n"
    else:
        assert prompt_ids.count(tok.bos_token_id) == 1 and prompt_ids[0] == tok.bos_token_id  # no second bos
        assert tok.decode(prompt_ids) == (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}"
                                          "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "<user>" not in tok.decode(prompt_ids + response_ids)  # not the world's format


def test_a_sampled_response_scores_as_its_text_would(setup):
    """The rows PPO builds from real samples hold the prompt sampling used, then the sampled ids."""
    _, tok, model = setup
    prompts = [p for p, _ in CONVERSATIONS]
    torch.manual_seed(0)
    samples = sample(model, tok, prompts, max_new_tokens=6)
    batch = samples.to_batch(tok)
    for n, row in enumerate(zip(batch.input_ids, batch.attention_mask, batch.response_mask)):
        prompt, response = _split(*row)
        assert prompt == encode_conversation(tok, prompts[n])[0]
        assert response == samples.tokens[n][samples.mask[n].bool()].tolist()


def test_a_tokenizer_that_merges_across_the_boundary_keeps_the_prompt_sampling_sees():
    # byte-level BPE reads Llama's "\n\n" before a word as two pieces, and alone at the end as one
    tok = llama_tokenizer()
    prompt, response = CONVERSATIONS[0]
    whole = tok(render_conversation(tok, prompt, response), add_special_tokens=False)["input_ids"]
    prompt_ids, response_ids = encode_conversation(tok, prompt, response)
    assert whole[:len(prompt_ids)] != prompt_ids  # the case this test is about
    assert prompt_ids == tok(render_conversation(tok, prompt), add_special_tokens=False)["input_ids"]
    assert tok.decode(prompt_ids + response_ids) == render_conversation(tok, prompt, response)


# ---------------------------------------------------------------------------- the world's template
def test_the_world_template_writes_what_chat_writes(world, tok):
    requests = [r for kind in KINDS for r in world.requests(kind, "train", 5)]
    written = [world.respond(r, style, world.rng("t", i)) for i, r in enumerate(requests) for style in STYLES[r.kind]]
    responses = ["", "  spaced  out  ", "an <eos> inside", "a\nb", *written]
    for i, response in enumerate(responses):
        prompt = requests[i % len(requests)].prompt
        assert render_conversation(tok, prompt) == chat(prompt)
        assert render_conversation(tok, prompt, response) == chat(prompt, response)
        # and the ids are the ones every stage used before the template: prompt text, then response and eos
        assert encode_conversation(tok, prompt, response) == (
            tok(chat(prompt))["input_ids"], tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])


def test_old_world_tokenizers_without_a_template_encode_as_before(tmp_path, tok):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32))
    save_model(model, tok, tmp_path / "model")
    (tmp_path / "model" / "chat_template.jinja").unlink()  # as saved before tokenizers carried a template
    _, loaded = load_model(tmp_path / "model")
    assert loaded.chat_template == WORLD_CHAT_TEMPLATE
    bare = train_tokenizer(["a b c"])
    bare.chat_template = None
    assert encode_conversation(bare, "a b", "c") == encode_conversation(adopt_world_template(bare), "a b", "c")
    assert bare.chat_template == WORLD_CHAT_TEMPLATE


# ---------------------------------------------------------------------------- clear errors
def test_a_tokenizer_without_a_template_is_a_clear_error():
    tok = gpt2_tokenizer()
    tok.chat_template = None
    tok.name_or_path = "my-gpt2"
    with pytest.raises(SafetylabError, match=r"'my-gpt2' has no chat template.*set tokenizer.chat_template"):
        encode_conversation(tok, "hi", "there")
    assert adopt_world_template(tok).chat_template is None  # only the world's own tokenizer gets the world's


def test_a_template_that_does_not_end_the_turn_with_eos_is_an_error():
    tok = gpt2_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(SafetylabError, match=r"does not end the assistant turn with the eos token '<\|end\|>'"):
        encode_conversation(tok, "hi", "there")


def test_a_reward_model_reads_sampled_ids_only_with_the_policys_template(tok):
    import copy

    from transformers import GPT2Model

    reward_model = RewardModel(GPT2Model(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32)))
    assert policy_reward(reward_model, tok, tok) is reward_model
    other = copy.deepcopy(tok)  # the same vocabulary, another format
    other.chat_template = WORLD_CHAT_TEMPLATE.replace("'<user> '", "'<user> user: '")
    assert not isinstance(policy_reward(reward_model, other, tok), torch.nn.Module)  # scores text instead
