"""Activations for sparse autoencoders: token batches made from the world's text, a shuffling store that reads
one hook point's activations from them, and an SAE trained and measured on a model in one call.

The store follows SAELens's activation store: activations of many token batches sit in a buffer that is
shuffled, so one training batch mixes tokens of many texts and positions; when half the buffer has been
served it is topped up with fresh activations and shuffled again. Padding positions are never stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from safetylab.core.errors import SafetylabError
from safetylab.core.seeding import derive_seed
from safetylab.interp.data import Encoded, conversation_ids, pad_right
from safetylab.interp.hooks import Hooks, model_signature
from safetylab.interp.sae import SAEConfig, SparseAutoencoder, ce_loss_recovered, sae_metrics, train_sae


# ============================================================================ token batches
def world_token_rows(tokenizer, lines: Sequence[str] = (), conversations: Sequence[Mapping[str, str]] = (),
                     max_length: int | None = None) -> list[list[int]]:
    """Token id rows: each corpus line tokenized as the base model was pre-trained on it (the line holds the
    world's text, conversations included), and each ``{"prompt", "response"}`` (the world's demonstrations)
    through the chat template, as the SFT model saw it. Rows longer than ``max_length`` are cut there."""
    rows = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in lines]
    rows += [conversation_ids(tokenizer, c["prompt"], c.get("response")) for c in conversations]
    rows = [row[:max_length] if max_length else row for row in rows]
    empty = [i for i, row in enumerate(rows) if not row]
    if empty:
        raise SafetylabError(f"world_token_rows: row {empty[0]} has no tokens; expected non-empty texts")
    return rows


def token_batches(rows: Sequence[Sequence[int]], batch_size: int, pad_id: int, seed: int = 0) -> list[Encoded]:
    """``rows`` in a seeded random order, right-padded into batches of ``batch_size`` rows (the last one
    smaller); rows of similar length are not grouped, so padding is left to the store to skip."""
    if not rows:
        raise SafetylabError("token_batches: no rows; expected one or more rows of token ids")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(derive_seed(seed, "token_batches")))
    ordered = [rows[i] for i in order.tolist()]
    return [pad_right(ordered[i:i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]


def world_batches(world, tokenizer, corpus: int = 8000, demonstrations: int = 4000, eval_share: float = 0.1,
                  rows_per_batch: int = 64, max_length: int | None = None, seed: int = 0
                  ) -> tuple[list[Encoded], list[Encoded]]:
    """``(train, eval)`` token batches of the world's text: ``world.corpus(corpus)`` and
    ``world.demonstrations(demonstrations)`` (:func:`world_token_rows`), rows split at random, an
    ``eval_share`` of them held out."""
    if not 0 < eval_share < 1:
        raise SafetylabError(f"world_batches: eval_share {eval_share}; expected a share in (0, 1)")
    rows = world_token_rows(tokenizer, world.corpus(corpus), world.demonstrations(demonstrations), max_length)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(derive_seed(seed, "world_batches")))
    n_eval = max(1, int(len(rows) * eval_share))
    held, kept = order[:n_eval].tolist(), order[n_eval:].tolist()
    pad = tokenizer.pad_token_id
    return (token_batches([rows[i] for i in kept], rows_per_batch, pad, seed),
            token_batches([rows[i] for i in held], rows_per_batch, pad, derive_seed(seed, "eval")))


# ============================================================================ the store
def real_token_activations(hooks: Hooks, name: str, batch: Encoded) -> torch.Tensor:
    """The activations at ``name`` of ``batch``'s real tokens, ``(tokens, width)`` in float32 (padding left out),
    on the model's device; the forward pass stops after ``name``."""
    device = next(hooks.model.parameters()).device
    batch = batch.to(device)
    _, cache = hooks.run_with_cache(input_ids=batch.input_ids, attention_mask=batch.attention_mask, names=name,
                                    stop_early=True)
    act = cache[name]
    act = act.flatten(-2) if act.ndim == 4 else act  # attn.z: heads side by side
    return act[batch.attention_mask.bool()].float()


def collect_activations(hooks: Hooks, name: str, batches: Sequence[Encoded]) -> torch.Tensor:
    """:func:`real_token_activations` of every batch, concatenated on the CPU: ``(tokens, width)``."""
    return torch.cat([real_token_activations(hooks, name, b).cpu() for b in batches])


class ActivationStore:
    """An endless iterator of ``(batch_size, width)`` activations at hook point ``name`` of ``hooks.model``,
    read from ``token_batches`` (cycled, in a new seeded order each pass) through a shuffling buffer of
    about ``buffer_batches × batch_size`` activations that is refilled when half empty. The buffer lives on
    the model's device."""

    def __init__(self, hooks: Hooks, name: str, token_batches: Sequence[Encoded], batch_size: int = 4096,
                 buffer_batches: int = 16, seed: int = 0):
        hooks.check_name(name)
        if not token_batches:
            raise SafetylabError("ActivationStore: no token batches; expected one or more Encoded batches")
        if batch_size < 1 or buffer_batches < 2:
            raise SafetylabError(f"ActivationStore: batch_size {batch_size} and buffer_batches {buffer_batches}; "
                                 "expected batch_size >= 1 and buffer_batches >= 2")
        self.hooks, self.name, self.token_batches = hooks, name, token_batches
        self.batch_size, self.buffer_size = batch_size, batch_size * buffer_batches
        self.generator = torch.Generator().manual_seed(derive_seed(seed, "activation_store"))
        self._order: list[int] = []
        self._buffer = torch.empty(0, device=next(hooks.model.parameters()).device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._buffer.shape[0] < max(self.buffer_size // 2, self.batch_size):
            self._refill()
        out, self._buffer = self._buffer[:self.batch_size], self._buffer[self.batch_size:]
        return out

    def _next_token_batch(self) -> Encoded:
        if not self._order:
            self._order = torch.randperm(len(self.token_batches), generator=self.generator).tolist()
        return self.token_batches[self._order.pop()]

    def _refill(self) -> None:
        """Read token batches until the buffer is full, then shuffle it all (old and new together)."""
        parts, held = [self._buffer], self._buffer.shape[0]
        while held < self.buffer_size:
            acts = real_token_activations(self.hooks, self.name, self._next_token_batch())
            parts.append(acts)
            held += acts.shape[0]
        buffer = torch.cat([p.reshape(-1, parts[-1].shape[-1]) for p in parts])
        self._buffer = buffer[torch.randperm(buffer.shape[0], generator=self.generator).to(buffer.device)]


# ============================================================================ one call: train and measure
def train_on_model(hooks: Hooks, name: str, train_batches: Sequence[Encoded], config: SAEConfig,
                   eval_batches: Sequence[Encoded] = (), buffer_batches: int = 16,
                   log: Callable[[dict[str, float]], None] | None = None
                   ) -> tuple[SparseAutoencoder, list[dict], dict[str, Any]]:
    """Train an SAE of ``config`` on the activations at ``name`` of ``train_batches`` (through an
    :class:`ActivationStore`), then measure it on ``eval_batches``: :func:`sae_metrics` and
    :func:`ce_loss_recovered`. Returns ``(sae, history, results)``; ``results`` also holds the meta to
    save the SAE with (``model_signature``, ``hook``)."""
    store = ActivationStore(hooks, name, train_batches, config.batch_size, buffer_batches, seed=config.seed)
    first = next(store)
    if first.shape[-1] != config.d_in:
        raise SafetylabError(f"train_on_model: {name} has width {first.shape[-1]} but config.d_in is {config.d_in}")
    sae, history = train_sae(_prepend(first, store), config, log=log)
    results: dict[str, Any] = {"model_signature": model_signature(hooks.model), "hook": name}
    if eval_batches:
        sae = sae.to(next(hooks.model.parameters()).device)
        acts = collect_activations(hooks, name, eval_batches)
        results["metrics"] = sae_metrics(sae, acts).as_dict()
        results["ce"] = ce_loss_recovered(hooks, sae, name, eval_batches)
    return sae, history, results


def _prepend(first: torch.Tensor, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest
