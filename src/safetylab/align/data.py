"""Preference data: JSONL ``{"prompt","chosen","rejected"}`` (TRL's format), read strictly.

Every row is checked; a bad row (not an object, a missing or non-string field, an empty or
whitespace-only prompt or response) is an error naming its file and line, except pairs whose chosen
and rejected responses are identical (ignoring surrounding whitespace), which carry no preference:
they are skipped, counted and reported (:attr:`Preferences.skipped`), never dropped silently.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from safetylab.core.errors import SafetylabError
from safetylab.core.io import read_jsonl
from safetylab.models.logprobs import Batch, conversation_ids, pack_pairs


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Preferences:
    rows: list[Preference]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    def __len__(self) -> int:
        return len(self.rows)


def preferences_from_records(records, where: str = "preferences") -> Preferences:
    """Validate preference records (dicts) as :func:`read_preferences` does."""
    out = Preferences([])
    for number, record in enumerate(records, start=1):
        at = f"{where}, line {number}"
        if not isinstance(record, dict):
            raise SafetylabError(f"{at}: expected an object with prompt, chosen and rejected, got "
                                 f"{type(record).__name__}")
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(record.get(key), str):
                raise SafetylabError(f"{at}: expected a string field {key!r}")
            if not record[key].strip():
                raise SafetylabError(f"{at}: field {key!r} is empty")
        if record["chosen"].strip() == record["rejected"].strip():
            out.skipped.append((number, "chosen and rejected are identical"))
            continue
        meta = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
        out.rows.append(Preference(record["prompt"], record["chosen"], record["rejected"], meta))
    if not out.rows:
        reasons: dict[str, list[int]] = {}
        for number, reason in out.skipped:
            reasons.setdefault(reason, []).append(number)
        why = "; ".join(f"{reason} on line{'s' if len(lines) > 1 else ''} {_numbers(lines)}"
                        for reason, lines in reasons.items())
        raise SafetylabError(f"{where}: no usable preference pairs ({len(out.skipped)} skipped: {why})"
                             if out.skipped else f"{where}: no preference pairs (the data is empty)")
    return out


def _numbers(lines: list[int], shown: int = 10) -> str:
    return ", ".join(map(str, lines[:shown])) + (f" and {len(lines) - shown} more" if len(lines) > shown else "")


def read_preferences(path: str | os.PathLike) -> Preferences:
    """Read a preference JSONL file (extra keys are kept as metadata)."""
    return preferences_from_records(read_jsonl(path), where=str(path))


PairIds = tuple[list[int], list[int], list[int]]  # a preference's prompt, chosen and rejected token ids


def tokenize_preferences(tokenizer, rows: Sequence[Preference], max_length: int | None = None) -> list[PairIds]:
    """Each row's prompt, chosen and rejected token ids (responses with eos, cut to ``max_length``), as
    :func:`~safetylab.models.logprobs.encode_pairs` encodes a conversation: tokenized once, before training."""
    out = []
    for row in rows:
        prompt, (chosen, rejected) = conversation_ids(tokenizer, row.prompt, [row.chosen, row.rejected], max_length)
        out.append((prompt, chosen, rejected))
    return out


def preference_batch(pairs: Sequence[PairIds], pad: int) -> Batch:
    """Chosen rows then rejected rows of one batch, so a single forward pass scores both."""
    return pack_pairs([p for p, _, _ in pairs] * 2, [c for _, c, _ in pairs] + [r for _, _, r in pairs], pad)


def encode_preferences(tokenizer, rows: Sequence[Preference], max_length: int | None = None) -> Batch:
    """Chosen rows then rejected rows of one batch, so a single forward pass scores both."""
    return preference_batch(tokenize_preferences(tokenizer, rows, max_length), tokenizer.pad_token_id)
