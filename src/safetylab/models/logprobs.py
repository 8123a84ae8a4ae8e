"""Per-token log-probabilities of responses, and KL between two policies, for any HF causal LM.

Every algorithm that needs log-probs calls these; nobody writes them twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from safetylab.core.errors import SafetylabError
from safetylab.models.conversation import encode_responses
from safetylab.models.packing import pack_batch


@dataclass
class Batch:
    """Right-padded ``prompt + response + eos`` token ids; ``response_mask`` marks response and eos."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int | None = None) -> Batch:
    """Conversations encoded by :func:`~safetylab.models.conversation.encode_conversation` (the
    tokenizer's chat template), so the prompt/response boundary is exact.

    ``max_length`` truncates the response side; a prompt longer than it is an error.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    pairs = [conversation_ids(tokenizer, prompt, [response], max_length)
             for prompt, response in zip(prompts, responses)]
    return pack_pairs([p for p, _ in pairs], [r for _, (r,) in pairs], tokenizer.pad_token_id)


def conversation_ids(tokenizer, prompt: str, responses: Sequence[str],
                     max_length: int | None = None) -> tuple[list[int], list[list[int]]]:
    """The token ids of ``prompt`` and of each of its ``responses`` (through their eos), as
    :func:`~safetylab.models.conversation.encode_conversation` encodes them
    (:func:`~safetylab.models.conversation.encode_responses`), each response cut so that
    prompt and response fit ``max_length``; a prompt longer than it is an error."""
    p, encoded = encode_responses(tokenizer, prompt, responses)
    if max_length is not None and len(p) >= max_length:
        raise ValueError(f"prompt of {len(p)} tokens does not fit max_length={max_length}: {prompt!r}")
    room = None if max_length is None else max_length - len(p)
    return p, [r[:room] for r in encoded]


def pack_pairs(prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad: int) -> Batch:
    """Right-padded ``prompt + response`` rows from token ids, the response side marked."""
    rows = [p + r for p, r in zip(prompt_ids, response_ids)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    response_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return Batch(input_ids, attention, response_mask)


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] without materialising the full log-softmax:
    ``logits[label] − logsumexp(logits)``."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def batch_logprobs(model, batch: Batch, layout: str = "padded") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each sequence's tokens after the first: ``(logprobs, mask)`` of shape
    ``[B, T−1]``; ``mask`` selects response tokens, and masked-out entries are 0.

    ``layout`` (:mod:`safetylab.models.packing`): ``"padded"`` runs the batch as it is;
    ``"shared-prompt"`` and ``"packed"`` compute each distinct prompt once for all its responses (and
    pack them), with the same result up to float rounding, and the prompt positions' log-probs left
    at 0 (only response tokens are computed)."""
    mask = batch.response_mask[:, 1:].float()
    if layout == "padded":
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return gather_logprobs(logits[:, :-1], batch.input_ids[:, 1:]) * mask, mask
    packed = pack_batch(batch, layout)
    logits = model(**packed.model_inputs()).logits
    logps = gather_logprobs(logits.flatten(0, 1)[packed.source], packed.target)
    out = logps.new_zeros(mask.shape).index_put((packed.row, packed.column), logps)
    return out, mask


def logprobs(model, tokenizer, prompts: Sequence[str], responses: Sequence[str],
             batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of ``responses`` (eos included) given ``prompts`` under ``model``.

    Returns ``(logprobs, mask)``, both ``[N, T]`` with responses left-aligned; sum over ``T`` for
    sequence log-probs. Works with any HF causal LM and its tokenizer.
    """
    device = next(model.parameters()).device
    if not prompts:
        return torch.zeros(0, 0, device=device), torch.zeros(0, 0, device=device)
    rows: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        batch = encode_pairs(tokenizer, prompts[start:end], responses[start:end]).to(device)
        lp, mask = batch_logprobs(model, batch)
        for row_lp, row_mask in zip(lp, mask.bool()):
            rows.append(row_lp[row_mask])
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width, device=device)
    mask = torch.zeros(len(rows), width, device=device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return out, mask


def check_same_vocabulary(policy, other, what: str = "reference") -> None:
    """A policy and its reference (or a reward model scoring its token ids) must share one tokenizer;
    different vocabulary sizes prove they do not (equal sizes cannot prove that they do)."""
    sizes = [m.get_input_embeddings().num_embeddings for m in (policy, other)]
    if sizes[0] != sizes[1]:
        raise SafetylabError(f"the policy's vocabulary has {sizes[0]} tokens and the {what}'s {sizes[1]}: "
                             "they must share one tokenizer (score other models' outputs through text instead)")


def kl_per_token(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token estimates of KL(p ‖ q) at tokens sampled from p (Schulman 2020, "Approximating KL
    divergence"), with ``r = log p − log q``; masked-out entries are 0, whatever the inputs hold there
    (padding may carry −inf or NaN):

    - k1 = r                         unbiased, high variance, can be negative
    - k2 = ½ r²                      biased, low variance
    - k3 = (e^{−r} − 1) + r          unbiased, non-negative, low variance
    """
    keep = mask.bool()
    r = torch.where(keep, logp - logq, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return {"k1": r, "k2": 0.5 * r.pow(2), "k3": torch.expm1(-r) + r}


def kl_estimates(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sequence estimates of KL(p ‖ q) from tokens sampled from p (Schulman 2020,
    "Approximating KL divergence"): the sums over tokens of :func:`kl_per_token`, with ``r = log p − log q``:

    - k1 = Σ r                       unbiased, high variance, can be negative
    - k2 = Σ ½ r²                    biased, low variance
    - k3 = Σ (e^{−r} − 1) + r        unbiased, non-negative, low variance
    """
    return {name: k.sum(-1) for name, k in kl_per_token(logp, logq, mask).items()}


def full_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL(p ‖ q) = Σ_t Σ_v p(v|s_t) (log p(v|s_t) − log q(v|s_t)) over the masked
    positions: exact at each visited state, so its mean over samples of p is an unbiased,
    lower-variance estimate of the sequence KL than k1. Tokens p cannot emit (logit −∞) add 0, and so
    do masked-out positions, whatever the logits hold there."""
    logp = torch.log_softmax(logits_p.float(), -1)
    logq = torch.log_softmax(logits_q.float(), -1)
    zero = torch.zeros((), device=logp.device)
    per_token = torch.where(logp > -math.inf, logp.exp() * (logp - logq), zero).sum(-1)
    return torch.where(mask.bool(), per_token, zero).sum(-1)


@torch.no_grad()
def policy_kl(policy, reference, tokenizer, prompts: Sequence[str], responses: Sequence[str],
              batch_size: int = 64) -> torch.Tensor:
    """Per-sequence KL(policy ‖ reference) along ``responses`` sampled from ``policy``
    (see :func:`full_kl`). Both models must share ``tokenizer``."""
    device = next(policy.parameters()).device
    out = [torch.zeros(0, device=device)]
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        batch = encode_pairs(tokenizer, prompts[start:end], responses[start:end]).to(device)
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
        logits_p = policy(**kwargs).logits[:, :-1]
        logits_q = reference(**kwargs).logits[:, :-1]
        out.append(full_kl(logits_p, logits_q, batch.response_mask[:, 1:].float()))
    return torch.cat(out)
