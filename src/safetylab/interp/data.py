"""Conversations as model inputs for interpretability: prompts (and optional responses) encoded through the
one conversation encoder, right-padded into batches, and activations read at one position per row.

Right padding keeps every real token at its own position, so a causal model's activation at a row's
last real token does not depend on the padding, and position ids need no care.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_bytes
from safetylab.interp.hooks import Hooks, model_signature
from safetylab.models.conversation import encode_conversation


@dataclass
class Encoded:
    """A right-padded batch: ``input_ids`` and ``attention_mask`` (batch, pos) and ``last`` (batch,), the
    index of each row's last real token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor

    def to(self, device: torch.device | str) -> Encoded:
        return Encoded(self.input_ids.to(device), self.attention_mask.to(device), self.last.to(device))


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> Encoded:
    """Token id rows right-padded with ``pad_id`` into one :class:`Encoded` batch."""
    if not rows or any(len(r) == 0 for r in rows):
        raise SafetylabError("pad_right: expected one or more non-empty rows of token ids")
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return Encoded(ids, mask, mask.sum(1) - 1)


def conversation_ids(tokenizer, prompt: str, response: str | None = None) -> list[int]:
    """One conversation's ids: the prompt through the generation prompt, then the response if given."""
    prompt_ids, response_ids = encode_conversation(tokenizer, prompt, response)
    return prompt_ids + response_ids


def encode_prompts(tokenizer, prompts: Sequence[str], responses: Sequence[str] | None = None,
                   max_length: int | None = None) -> Encoded:
    """``prompts`` (with ``responses`` when given) as one right-padded batch. A row longer than
    ``max_length`` is an error naming it, never silently cut."""
    if responses is not None and len(responses) != len(prompts):
        raise SafetylabError(f"encode_prompts: {len(prompts)} prompts but {len(responses)} responses; expected one "
                             "response per prompt")
    rows = [conversation_ids(tokenizer, p, None if responses is None else responses[i])
            for i, p in enumerate(prompts)]
    for i, row in enumerate(rows):
        if max_length is not None and len(row) > max_length:
            raise SafetylabError(f"encode_prompts: row {i} ({prompts[i][:60]!r}…) is {len(row)} tokens, more than the "
                                 f"model's {max_length}")
    return pad_right(rows, tokenizer.pad_token_id)


def prompt_activations(hooks: Hooks, tokenizer, prompts: Sequence[str], names: Iterable[str] | str,
                       responses: Sequence[str] | None = None, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The activations at ``names`` at each conversation's last token (for a prompt alone: the token
    before the assistant's first, where the model decides what to answer), as ``{name: (n, ...)}`` on the
    CPU. The forward pass stops after the last point asked for."""
    names = hooks.select(names)
    device = next(hooks.model.parameters()).device
    max_length = getattr(hooks.model.config, "max_position_embeddings", None)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        answers = None if responses is None else responses[start:start + batch_size]
        enc = encode_prompts(tokenizer, chunk, answers, max_length).to(device)
        _, cache = hooks.run_with_cache(input_ids=enc.input_ids, attention_mask=enc.attention_mask, names=names,
                                        stop_early=True)
        rows = torch.arange(len(chunk), device=device)
        for name in names:
            out[name].append(cache[name][rows, enc.last].float().cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def save_activations(hooks: Hooks, tokenizer, prompts: Sequence[str], names: Iterable[str] | str,
                     path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """:func:`prompt_activations` written atomically to the safetensors file ``path``: one tensor per hook
    point, and in the metadata the prompts, the model's signature and ``extra`` (JSON)."""
    acts = prompt_activations(hooks, tokenizer, prompts, names)
    meta = {"prompts": list(prompts), "signature": model_signature(hooks.model), **(extra or {})}
    path = Path(path)
    atomic_write_bytes(path, save(acts, metadata={"safetylab": json.dumps(meta)}))
    return path


def load_activations(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(activations by hook name, metadata)`` of a file :func:`save_activations` wrote."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})["safetylab"])
            return {name: f.get_tensor(name) for name in f.keys()}, meta  # noqa: SIM118 - safe_open has no __iter__
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise SafetylabError(f"{path}: not an activation file written by safetylab interp cache ({e})") from None
