"""A study over seeds: run it once per seed and summarise every table as mean ± standard deviation.

``safetylab <study> report --seeds 0,1,2`` and ``safetylab audit --seeds 0,1,2`` run here. Each seed is a
whole study in ``OUT/seed-N`` (a finished seed is skipped, an interrupted one resumes); the summary goes
to ``OUT/summary.md`` and ``OUT/summary.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from numbers import Real
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_text
from safetylab.core.study import Section, Table, tables_markdown


def summarize_seeds(runs: dict[int, dict[str, Section]]) -> dict[str, Section]:
    """Every section's tables over the seeds of ``runs`` (seed → sections of one run of the study).

    Tables are matched by section name and position, rows by position. A cell equal in every seed (a
    label, a radius, a count) is kept; a number that varies becomes "mean ± sd" (sample standard
    deviation; None values are left out). The leading text columns name a row: where the rows differ between
    seeds and their names are unique in each seed (the layers that decided something), rows are matched by
    name and a row some seeds lack says which seeds have it; otherwise a label that differs means the tables
    do not line up, an error naming the table, row and column. Text that differs in a later column is a per-seed result
    (the layer a search chose, the head that mattered most) and is shown seed by seed, "a / b / c"."""
    if not runs:
        raise SafetylabError("summarize_seeds: no runs to summarise")
    seeds = sorted(runs)
    first = runs[seeds[0]]
    for seed in seeds[1:]:
        if list(runs[seed]) != list(first):
            raise SafetylabError(f"seed {seed} has sections {list(runs[seed])}, seed {seeds[0]} has {list(first)}")
    return {name: _summarize_section([runs[s][name] for s in seeds], seeds) for name in first}


def _summarize_section(sections: list[Section], seeds: list[int]) -> Section:
    head = sections[0]
    tables, numbers = [], []
    for t, table in enumerate(head.tables):
        versions = [s.tables[t] if t < len(s.tables) else None for s in sections]
        if any(v is None or v.columns != table.columns for v in versions):
            raise SafetylabError(f"table {table.title!r}: its columns differ between seeds")
        rows, means, sds = [], [], []
        for r, (key, matched) in enumerate(_matched_rows(table, versions, seeds)):
            cells = [(k, k, None) for k in key or ()]
            cells += [_summarize_cell([None if m is None else m[c] for m in matched], table, r, c)
                      for c in range(len(cells), len(table.columns))]
            rows.append([text for text, _, _ in cells])
            means.append([mean for _, mean, _ in cells])
            sds.append([sd for _, _, sd in cells])
        tables.append(Table(table.title, table.columns, rows))
        numbers.append({"title": table.title, "columns": table.columns, "mean": means, "sd": sds})
    return Section(title=head.title, summary=f"mean ± sd over seeds {', '.join(map(str, seeds))}", tables=tables,
                   data={"seeds": seeds, "tables": numbers, "summaries": [s.summary for s in sections]})


def _matched_rows(table: Table, versions: list[Table], seeds: list[int]) -> list[tuple[list | None, list]]:
    """``(key cells, [the row in each seed, or None])`` for each row: by position where every seed has as many
    rows with the same first cells (``key`` None: every cell summarised), else by the leading text columns (the
    row's name: "group", "layer"), when they name each seed's rows uniquely; the key's first cell then says
    which seeds lack the row, if any."""
    firsts = [[row[0] if row else None for row in v.rows] for v in versions]
    same = all(len(v.rows) == len(table.rows) for v in versions) and all(f == firsts[0] for f in firsts)
    width = _key_width(versions)
    keys = [[tuple(row[:width]) for row in v.rows] for v in versions]
    if same or width == 0 or not all(len(set(k)) == len(k) for k in keys):
        if any(len(v.rows) != len(table.rows) for v in versions):
            raise SafetylabError(f"table {table.title!r}: its number of rows differ between seeds, and its leading "
                                 "text columns do not name the rows uniquely to match them")
        return [(None, [v.rows[r] for v in versions]) for r in range(len(table.rows))]  # a label check may err
    out = []
    for key in dict.fromkeys(k for ks in keys for k in ks):
        matched = [next((row for row in v.rows if tuple(row[:width]) == key), None) for v in versions]
        having = [str(s) for s, m in zip(seeds, matched) if m is not None]
        first = key[0] if len(having) == len(seeds) else f"{key[0]} (seeds {', '.join(having)} only)"
        out.append(([first, *key[1:]], matched))
    return out


def _key_width(versions: list[Table]) -> int:
    """How many leading columns hold text in every row of every seed."""
    rows = [row for v in versions for row in v.rows]
    width = 0
    while rows and all(width < len(row) and isinstance(row[width], str) for row in rows):
        width += 1
    return width


def _summarize_cell(values: list[Any], table: Table, row: int, column: int) -> tuple[Any, Any, Any]:
    """(shown, mean, sd) of one cell over seeds."""
    present = [v for v in values if v is not None]
    if not present or all(v == present[0] for v in present):  # equal wherever given: kept as it is
        kept = present[0] if present else None
        return kept, kept, 0.0 if _is_number(kept) else None
    if not all(_is_number(v) for v in present):
        if column == 0:
            raise SafetylabError(f"table {table.title!r}, row {row}, column {table.columns[column]!r}: the label "
                                 f"differs between seeds ({', '.join(map(repr, values))}), so the rows do not line up")
        return " / ".join("–" if v is None else str(v) for v in values), None, None
    mean = fmean(present)
    sd = stdev(present) if len(present) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}", mean, sd


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def run_seeds(run_one: Callable[[int, Path], dict[str, Section]], seeds: Sequence[int], out: str | Path,
              log: Callable[[str], None] = print) -> dict[str, Section]:
    """``run_one(seed, OUT/seed-N)`` for every seed, then the summary in ``OUT/summary.md`` and
    ``OUT/summary.json``; returns the summary's sections."""
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SafetylabError(f"seeds: expected distinct integers >= 0, got {list(seeds)}")
    out = Path(out)
    runs = {}
    for seed in seeds:
        log(f"=== seed {seed}")
        runs[seed] = run_one(seed, out / f"seed-{seed}")
    summary = summarize_seeds(runs)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps({k: s.to_dict() for k, s in summary.items()}, indent=2,
                                                       allow_nan=False) + "\n")
    atomic_write_text(out / "summary.md", tables_markdown(summary))
    return summary
