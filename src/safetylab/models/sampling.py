"""Batched sampling from any HF causal LM, returning tokens and their per-token log-probs."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from safetylab.core.errors import SafetylabError
from safetylab.models.conversation import encode_conversation
from safetylab.models.logprobs import Batch, gather_logprobs, pack_pairs


@dataclass
class Samples:
    """Responses to ``prompts``: ``tokens`` ``[N, T]`` (pad after eos), ``logprobs`` under the
    sampling distribution (temperature applied, 0 where masked), ``mask`` (response tokens, eos
    included), ``texts`` (decoded, eos dropped) and ``finished`` (whether an eos was produced)."""

    prompts: list[str]
    texts: list[str]
    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor
    finished: torch.Tensor

    def to_batch(self, tokenizer) -> Batch:
        """The sampled token ids after their prompts (encoded as sampling encoded them,
        :func:`~safetylab.models.conversation.encode_conversation`), for scoring with any model that
        shares the tokenizer: no decoding and re-tokenizing in between."""
        encoded = {p: encode_conversation(tokenizer, p)[0] for p in dict.fromkeys(self.prompts)}
        prompts = [encoded[p] for p in self.prompts]
        responses = [row[mask.bool()].tolist() for row, mask in zip(self.tokens.cpu(), self.mask.cpu())]
        return pack_pairs(prompts, responses, tokenizer.pad_token_id)


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48, temperature: float = 1.0,
           greedy: bool = False, batch_size: int = 128) -> Samples:
    """Sample one response per prompt from the full distribution (no top-k or top-p) at
    ``temperature``, or its argmax with ``greedy``. Each prompt is encoded through the tokenizer's chat
    template with its generation prompt (:func:`~safetylab.models.conversation.encode_conversation`).

    A plain key/value-cached loop, lean where ``model.generate`` is not: each distinct prompt of a
    batch is prefilled once and its cache shared by all its samples (RLOO's k samples of one prompt),
    and each step keeps the sampled tokens' log-probs, not the whole vocabulary's logits. Randomness
    comes from the torch seed in force (see :func:`safetylab.core.seed_everything`)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy=True for argmax)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        empty = torch.zeros(0, 0)
        return Samples([], [], empty.long(), empty, empty, torch.zeros(0, dtype=torch.bool))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    parts = [_sample_batch(model, tokenizer, prompts[start:start + batch_size], start, max_new_tokens,
                           1.0 if greedy else temperature, greedy)
             for start in range(0, len(prompts), batch_size)]
    width = max(t.shape[1] for t, _ in parts)
    tokens = torch.cat([_pad(t, width, pad) for t, _ in parts])
    token_logprobs = torch.cat([_pad(lp, width, 0.0) for _, lp in parts])
    is_eos = tokens == eos
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = (~after_eos).float()
    tokens = tokens.masked_fill(after_eos, pad)
    texts = [tokenizer.decode(row[(row != pad) & (row != eos)], skip_special_tokens=True).strip() for row in tokens]
    return Samples(list(prompts), texts, tokens, token_logprobs * mask, mask, is_eos.any(1))


def _sample_batch(model, tokenizer, prompts: Sequence[str], start: int, max_new_tokens: int, temperature: float,
                  greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[N, T]`` and their log-probs for one batch of prompts (T ≤ ``max_new_tokens``; rows
    that finished early hold pad tokens)."""
    device = next(model.parameters()).device
    distinct = list(dict.fromkeys(prompts))
    where = {p: i for i, p in enumerate(distinct)}
    index = torch.tensor([where[p] for p in prompts], device=device)
    input_ids, mask = _left_padded([encode_conversation(tokenizer, p)[0] for p in distinct], tokenizer.pad_token_id,
                                   device)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and input_ids.shape[1] + max_new_tokens > context:
        _context_error(mask.sum(1), start, max_new_tokens, context)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    out, cache = _forward(model, None, input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          logits_to_keep=1)
    if len(distinct) < len(prompts):
        cache.reorder_cache(index)  # each prompt's keys and values, once for each of its samples
    logits, mask, position = out.logits[index, -1], mask[index], positions[index, -1:]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        logits = logits.float() / temperature
        token = logits.argmax(-1) if greedy else torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
        token = token.masked_fill(finished, tokenizer.pad_token_id)  # as generate draws: same seed, same samples
        tokens.append(token)
        logprobs.append(gather_logprobs(logits, token))
        finished |= token == tokenizer.eos_token_id
        if finished.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1)
        position = position + 1
        out, cache = _forward(model, cache, input_ids=token[:, None], attention_mask=mask, position_ids=position)
        logits = out.logits[:, -1]
    return torch.stack(tokens, 1), torch.stack(logprobs, 1)


def _forward(model, cache, **inputs):
    """``(output, its key/value cache)`` of a forward that extends ``cache``: recent transformers 5 releases
    name the cache ``cache`` (in and out), earlier ones ``past_key_values``; a name the model does not take
    would be swallowed and the cache silently dropped, so ask its signature."""
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    out = model(**inputs, **({} if cache is None else {name: cache}), use_cache=True)
    return out, out.cache if hasattr(out, "cache") else out.past_key_values


def _left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left to one width, and their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _context_error(lengths: torch.Tensor, start: int, max_new_tokens: int, context: int):
    first = int(torch.nonzero(lengths + max_new_tokens > context)[0])
    raise SafetylabError(f"prompt {start + first + 1} has {int(lengths[first])} tokens (in its template): with "
                         f"{max_new_tokens} new tokens it does not fit the model's context of {context}")


def _pad(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)
