"""Sequences that share a prompt, laid out so the prompt is computed once, and packed instead of padded.

A right-padded :class:`~safetylab.models.logprobs.Batch` repeats each prompt once per response (DPO's
chosen and rejected, RLOO's k samples) and pads every row to the longest. The layouts here give a
causal LM the same work without the repeats:

- ``"padded"``: the batch as it is, one row per sequence (any model);
- ``"shared-prompt"``: one row per distinct prompt, the prompt once and then each of its responses;
  each response attends to the prompt and to itself only, and its positions continue from the
  prompt's end as if it stood alone;
- ``"packed"``: those groups placed first-fit into rows as wide as the widest group, a
  block-diagonal mask keeping groups apart (packing without cross-contamination, Krell et al. 2021,
  "Efficient sequence packing without cross-contamination").

Given the layout's 4D attention mask and position ids, a causal LM computes for each response token
what it computes on the padded batch, up to float rounding. The model must take a 4D boolean
``attention_mask`` (``[rows, 1, width, width]``, True where a query may attend to a key) and
``position_ids``: Hugging Face decoders with the eager or SDPA attention do; use ``"padded"`` for a
model that does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safetylab.core.errors import SafetylabError

LAYOUTS = ("padded", "shared-prompt", "packed")


@dataclass
class PackedBatch:
    """A batch in a shared-prompt layout. ``source`` is the flat index (into ``rows × width``) of the
    position whose output predicts each response token; ``row`` and ``column`` say where that token's
    log-prob sits in :func:`~safetylab.models.logprobs.batch_logprobs`' ``[B, T−1]`` layout, and
    ``target`` is the token; ``last`` is the flat index of each sequence's last token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    source: torch.Tensor
    row: torch.Tensor
    column: torch.Tensor
    target: torch.Tensor
    last: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "use_cache": False}


def first_fit(sizes: list[int], width: int) -> list[list[int]]:
    """Bins of total size ≤ ``width``, largest items first (first-fit decreasing); each bin lists the
    indices of its items."""
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        b = next((b for b, used in enumerate(fill) if used + sizes[i] <= width), len(bins))
        if b == len(bins):
            bins.append([])
            fill.append(0)
        bins[b].append(i)
        fill[b] += sizes[i]
    return bins


def pack_batch(batch, layout: str = "packed") -> PackedBatch:
    """``batch`` (right-padded ``prompt + response`` rows, ``response_mask`` marking one contiguous
    response that runs to the row's end, as :func:`~safetylab.models.logprobs.encode_pairs` and
    :meth:`~safetylab.models.sampling.Samples.to_batch` make them) in a ``"shared-prompt"`` or
    ``"packed"`` layout. Sequences are grouped by their prompt's token ids."""
    if layout not in LAYOUTS[1:]:
        raise SafetylabError(f"pack_batch: layout {layout!r}, expected 'shared-prompt' or 'packed'")
    ids = batch.input_ids.tolist()
    lengths = batch.attention_mask.sum(1).tolist()
    starts = batch.response_mask.argmax(1).tolist()
    if min(starts) < 1 or batch.response_mask.sum(1).tolist() != [n - s for n, s in zip(lengths, starts)]:
        raise SafetylabError("pack_batch: each row needs a prompt of at least one token, then one response that "
                             "runs to the row's last real token")
    groups: dict[tuple[int, ...], list[int]] = {}
    for n, (row, start) in enumerate(zip(ids, starts)):
        groups.setdefault(tuple(row[:start]), []).append(n)
    prompts = list(groups)
    sizes = [len(p) + sum(lengths[n] - starts[n] for n in groups[p]) for p in prompts]
    width = max(sizes)
    rows = first_fit(sizes, width) if layout == "packed" else [[g] for g in range(len(prompts))]

    columns: dict[str, list[list[int]]] = {"ids": [], "position": [], "group": [], "member": []}
    source, out_row, out_column, last = [], [], [], [0] * len(ids)
    for r, members in enumerate(rows):
        # one row, built as lists and made a tensor once: token ids (padding: any id, never attended to),
        # positions, group (-1: padding) and member (-1: a prompt token or padding, else the sequence)
        row_ids, position, row_group, member = [], [], [], []
        for g in members:
            prompt = prompts[g]
            P = len(prompt)
            predictor = r * width + len(row_ids) + P - 1  # the prompt's last token predicts each first response token
            row_ids += prompt
            position += range(P)
            row_group += [g] * P
            member += [-1] * P
            for n in groups[prompt]:
                response, offset = ids[n][starts[n]:lengths[n]], r * width + len(row_ids)
                R = len(response)
                row_ids += response
                position += range(P, P + R)
                row_group += [g] * R
                member += [n] * R
                source += [predictor, *range(offset, offset + R - 1)]
                out_row += [n] * R
                out_column += range(starts[n] - 1, lengths[n] - 1)
                last[n] = offset + R - 1
        pad = width - len(row_ids)
        for name, values, fill in (("ids", row_ids, 0), ("position", position, 0), ("group", row_group, -1),
                                   ("member", member, -1)):
            columns[name].append(values + [fill] * pad)
    input_ids, position_ids, group, member = (torch.tensor(columns[k], dtype=torch.long)
                                              for k in ("ids", "position", "group", "member"))
    query, key = (group[:, :, None], member[:, :, None]), (group[:, None, :], member[:, None, :])
    mask = (torch.ones(width, width, dtype=torch.bool).tril() & (key[0] == query[0]) & (key[0] >= 0)
            & ((key[1] == -1) | (key[1] == query[1])))
    mask |= torch.eye(width, dtype=torch.bool) & (query[0] < 0)  # a padding query sees itself: no empty softmax
    row, column = torch.tensor(out_row, dtype=torch.long), torch.tensor(out_column, dtype=torch.long)
    device = batch.input_ids.device
    return PackedBatch(input_ids.to(device), mask[:, None].to(device), position_ids.to(device),
                       torch.tensor(source, dtype=torch.long, device=device), row.to(device), column.to(device),
                       batch.input_ids[row.to(device), column.to(device) + 1],
                       torch.tensor(last, dtype=torch.long, device=device))
