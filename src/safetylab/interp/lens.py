"""The logit lens (nostalgebraist 2020): read every layer's residual stream through the final norm and the
unembedding, as if the model stopped there, to see at which layer the next token is decided.

On the world: for fact and arithmetic questions answered correctly ("… the capital of zorvia is tulam ."),
the probability and the rank-1 rate of the answer token, read at the token before it, layer by layer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from safetylab.core.errors import SafetylabError
from safetylab.interp.data import encode_prompts
from safetylab.interp.hooks import Hooks
from safetylab.world.requests import Request


@dataclass(frozen=True)
class LensResult:
    """``prob[l]`` and ``top1[l]``: the answer's mean probability and the share of rows where it is the most
    likely token, read from ``names[l]`` (the embedding, then each block's ``resid_post``), over ``n`` rows;
    ``skipped`` questions had an answer that is not one token of the vocabulary."""

    names: list[str]
    prob: list[float]
    top1: list[float]
    n: int
    skipped: int = 0


def lens_logprobs(hooks: Hooks, resid: torch.Tensor) -> torch.Tensor:
    """log softmax(W_U · norm(resid)): the next-token distribution a residual stream ``(..., d_model)`` encodes."""
    return torch.log_softmax(hooks.unembed(resid).float(), dim=-1)


def logit_lens(hooks: Hooks, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
               targets: torch.Tensor) -> LensResult:
    """The lens at ``positions`` (one per row) for the next tokens ``targets``, at the embedding (``embed``:
    with learned position embeddings, the stream entering block 0) and after every block."""
    names = ["blocks.0.resid_pre", *hooks.names_like("resid_post")]
    _, cache = hooks.run_with_cache(input_ids=input_ids, attention_mask=attention_mask, names=names)
    rows = torch.arange(len(positions), device=positions.device)
    prob, top1 = [], []
    for name in names:
        logprobs = lens_logprobs(hooks, cache[name][rows, positions])
        prob.append(logprobs[rows, targets].exp().mean().item())
        top1.append((logprobs.argmax(-1) == targets).float().mean().item())
    return LensResult(["embed+pos" if n == "blocks.0.resid_pre" else n for n in names], prob, top1, len(rows))


def answer_positions(tokenizer, requests: Sequence[Request], responses: Sequence[str]):
    """``(batch, positions, targets)``: each conversation encoded with its response, the index of the token
    before the response's last mention of the answer, and the answer's token id. An answer that is not a
    single token of the vocabulary is an error naming it."""
    batch = encode_prompts(tokenizer, [r.prompt for r in requests], list(responses))
    positions, targets = [], []
    for i, request in enumerate(requests):
        target = tokenizer.convert_tokens_to_ids(request.answer)
        if target is None or target == tokenizer.unk_token_id:
            raise SafetylabError(f"logit lens: the answer {request.answer!r} to {request.prompt!r} is not one token")
        where = (batch.input_ids[i, : batch.last[i] + 1] == target).nonzero().flatten()
        if len(where) == 0:
            raise SafetylabError(f"logit lens: the response {responses[i]!r} does not state the answer "
                                 f"{request.answer!r}")
        positions.append(int(where[-1]) - 1)
        targets.append(target)
    return batch, torch.tensor(positions), torch.tensor(targets)


def world_lens(hooks: Hooks, tokenizer, world, kind: str, n: int, seed: int = 0) -> LensResult:
    """The logit lens on ``n`` held-out ``kind`` questions ("facts" or "arithmetic") with the world's correct
    answers, at the token before the answer; questions whose answer is not one token (a held-out number the
    vocabulary never saw) are skipped and counted."""
    asked = world.requests(kind, "test", n, seed)
    requests = [r for r in asked if tokenizer.convert_tokens_to_ids(r.answer) not in (None, tokenizer.unk_token_id)]
    if not requests:
        raise SafetylabError(f"logit lens: none of {n} {kind} answers is one token of this model's vocabulary")
    rng = random.Random(seed)
    responses = [world.respond(r, "correct", rng, restate=True) for r in requests]
    batch, positions, targets = answer_positions(tokenizer, requests, responses)
    device = next(hooks.model.parameters()).device
    result = logit_lens(hooks, batch.input_ids.to(device), batch.attention_mask.to(device), positions.to(device),
                        targets.to(device))
    return replace(result, skipped=len(asked) - len(requests))
