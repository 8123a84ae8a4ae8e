"""Shared-prompt and packed layouts: the same log-probs as the padded batch, with each prompt once."""

from __future__ import annotations

import pytest
import torch

from safetylab.core.errors import SafetylabError
from safetylab.models import encode_pairs
from safetylab.models.logprobs import Batch, batch_logprobs
from safetylab.models.packing import first_fit, pack_batch

PROMPTS = ["what is 3 plus 4 ?", "what is the capital of zorvia ?", "what is 3 plus 4 ?", "hello",
           "what is the capital of zorvia ?", "what is 3 plus 4 ?"]
RESPONSES = ["3 plus 4 is 7 .", "i am not sure", "it is 9 .", "hi", "the capital of zorvia is a city i think .",
             "7"]


@pytest.fixture(scope="module")
def batch(tok):
    return encode_pairs(tok, PROMPTS, RESPONSES)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", ["shared-prompt", "packed"])
def test_layouts_give_the_padded_log_probs(tiny_lm, batch, arch, layout):
    model = tiny_lm(arch).eval()
    with torch.no_grad():
        expected, mask = batch_logprobs(model, batch)
        got, got_mask = batch_logprobs(model, batch, layout)
    assert torch.equal(mask, got_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[mask == 0] == 0).all()


def test_gradients_match_the_padded_batch(tiny_lm, batch):
    grads = []
    for layout in ("padded", "packed"):
        model = tiny_lm("gpt2")
        logps, _ = batch_logprobs(model, batch, layout)
        logps.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_each_prompt_is_laid_out_once(batch):
    shared = pack_batch(batch, "shared-prompt")
    packed = pack_batch(batch, "packed")
    starts, lengths = batch.response_mask.argmax(1), batch.attention_mask.sum(1)
    groups = [(0, 2, 5), (1, 4), (3,)]  # the sequences of each distinct prompt
    widest = max(int(starts[g[0]] + sum(lengths[n] - starts[n] for n in g)) for g in groups)
    assert shared.input_ids.shape == (3, widest)  # one row per distinct prompt
    assert packed.input_ids.shape[1] == widest and packed.input_ids.shape[0] <= 3


def test_responses_do_not_see_each_other_or_other_groups(batch):
    packed = pack_batch(batch, "packed")
    mask = packed.attention_mask[:, 0]
    width = packed.input_ids.shape[1]
    flat_last = packed.last.tolist()
    # the last token of each sequence attends to exactly its prompt and its own response
    for n, index in enumerate(flat_last):
        r, t = divmod(index, width)
        length = int(batch.attention_mask[n].sum())
        assert int(mask[r, t].sum()) == length
        seen = packed.input_ids[r][mask[r, t]]
        assert torch.equal(seen, batch.input_ids[n, :length])
        assert packed.position_ids[r, t] == length - 1


def test_first_fit_fills_bins_without_overflow():
    sizes = [5, 3, 4, 2, 6, 1]
    bins = first_fit(sizes, 6)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= 6 for b in bins)
    assert len(bins) == 4  # 6 | 5+1 | 4+2 | 3


def test_a_row_without_a_prompt_is_an_error():
    batch = Batch(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), torch.tensor([[1, 1, 0]]))
    with pytest.raises(SafetylabError, match="prompt of at least one token"):
        pack_batch(batch)


def test_unknown_layout_is_an_error(batch):
    with pytest.raises(SafetylabError, match="layout 'rows'"):
        pack_batch(batch, "rows")
