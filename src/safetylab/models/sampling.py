"""Batched sampling from any HF causal LM, returning tokens and their per-token log-probs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from safetylab.core.errors import SafetylabError
from safetylab.models.logprobs import Batch, Template, gather_logprobs, pack_pairs
from safetylab.world.world import chat


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

    def to_batch(self, tokenizer, template: Template = chat) -> Batch:
        """The sampled token ids after their prompts, for scoring with any model that shares the
        tokenizer: no decoding and re-tokenizing in between."""
        prompts = [tokenizer(template(p))["input_ids"] for p in self.prompts]
        responses = [row[mask.bool()].tolist() for row, mask in zip(self.tokens.cpu(), self.mask.cpu())]
        return pack_pairs(prompts, responses, tokenizer.pad_token_id)


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48, temperature: float = 1.0,
           greedy: bool = False, batch_size: int = 128, template: Template = chat) -> Samples:
    """Sample one response per prompt with ``model.generate`` (full distribution: no top-k/top-p).

    Randomness comes from the torch seed in force (see :func:`safetylab.core.seed_everything`).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy=True for argmax)")
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=1.0 if greedy else temperature,
        top_k=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True, output_logits=True,
    )
    if not prompts:
        empty = torch.zeros(0, 0)
        return Samples([], [], empty.long(), empty, empty, torch.zeros(0, dtype=torch.bool))
    context = getattr(model.config, "max_position_embeddings", None)
    parts = []
    for start in range(0, len(prompts), batch_size):
        chunk = [template(p) for p in prompts[start:start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left").to(device)
        if context is not None and enc["input_ids"].shape[1] + max_new_tokens > context:
            _context_error(enc["attention_mask"].sum(1), start, max_new_tokens, context)
        out = model.generate(**enc, generation_config=config)
        tokens = out.sequences[:, enc["input_ids"].shape[1]:]
        logits = torch.stack(out.logits, dim=1)[:, : tokens.shape[1]]
        if not greedy:
            logits = logits / temperature
        parts.append((tokens, gather_logprobs(logits, tokens)))
    width = max(t.shape[1] for t, _ in parts)
    tokens = torch.cat([_pad(t, width, tokenizer.pad_token_id) for t, _ in parts])
    token_logprobs = torch.cat([_pad(lp, width, 0.0) for _, lp in parts])
    is_eos = tokens == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = (~after_eos).float()
    tokens = tokens.masked_fill(after_eos, tokenizer.pad_token_id)
    texts = [tokenizer.decode(row[(row != tokenizer.pad_token_id) & (row != tokenizer.eos_token_id)],
                              skip_special_tokens=True).strip() for row in tokens]
    return Samples(list(prompts), texts, tokens, token_logprobs * mask, mask, is_eos.any(1))


def _context_error(lengths: torch.Tensor, start: int, max_new_tokens: int, context: int):
    first = int(torch.nonzero(lengths + max_new_tokens > context)[0])
    raise SafetylabError(f"prompt {start + first + 1} has {int(lengths[first])} tokens (in its template): with "
                         f"{max_new_tokens} new tokens it does not fit the model's context of {context}")


def _pad(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)
