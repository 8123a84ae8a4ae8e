"""The logit lens and the world's conversation batches, on a tiny world model."""

import random

import pytest
import torch

from safetylab.core.errors import SafetylabError
from safetylab.interp import Hooks
from safetylab.interp.data import encode_prompts, load_activations, prompt_activations, save_activations
from safetylab.interp.lens import answer_positions, lens_logprobs, world_lens


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return tiny_lm("gpt2").eval()


def test_answer_positions_point_at_the_token_before_the_answer(world, tok):
    requests = world.requests("facts", "test", 4)
    rng = random.Random(0)
    responses = [world.respond(r, "correct", rng, restate=True) for r in requests]
    batch, positions, targets = answer_positions(tok, requests, responses)
    for i, request in enumerate(requests):
        assert tok.convert_ids_to_tokens(int(batch.input_ids[i, positions[i] + 1])) == request.answer
        assert int(targets[i]) == tok.convert_tokens_to_ids(request.answer)
        assert tok.convert_ids_to_tokens(int(batch.input_ids[i, positions[i]])) == "is"  # "… of zorvia is tulam ."
    with pytest.raises(SafetylabError, match="does not state the answer"):
        answer_positions(tok, requests[:1], ["i do not know ."])


def test_world_lens_matches_the_model_at_the_last_layer(world, tok, lm):
    hooks = Hooks(lm)
    result = world_lens(hooks, tok, world, "facts", 6)
    assert result.names == ["embed+pos", "blocks.0.resid_post"] and result.n == 6
    # the last layer's lens is the model's own next-token probability of the answer
    requests = world.requests("facts", "test", 6)
    rng = random.Random(0)
    responses = [world.respond(r, "correct", rng, restate=True) for r in requests]
    batch, positions, targets = answer_positions(tok, requests, responses)
    probs = torch.softmax(lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
    expected = probs[torch.arange(6), positions, targets].mean().item()
    assert result.prob[-1] == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(lens_logprobs(hooks, torch.zeros(2, 32)).exp().sum(-1), torch.ones(2))


def test_activations_round_trip_through_a_file(world, tok, lm, tmp_path):
    hooks = Hooks(lm)
    prompts = [r.prompt for r in world.requests("harmful", "test", 3)]
    path = save_activations(hooks, tok, prompts, ["blocks.0.resid_post"], tmp_path / "a.safetensors", {"k": 1})
    acts, meta = load_activations(path)
    torch.testing.assert_close(acts["blocks.0.resid_post"],
                               prompt_activations(hooks, tok, prompts, "blocks.0.resid_post")["blocks.0.resid_post"])
    assert meta["prompts"] == prompts and meta["k"] == 1 and meta["signature"]["d_model"] == 32
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(SafetylabError, match="not an activation file"):
        load_activations(tmp_path / "bad.safetensors")
    with pytest.raises(SafetylabError, match="row 0 .* more than the model's 3"):
        encode_prompts(tok, prompts[:1], max_length=3)
