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
    deviation; None values are left out). The first column names a row: if it differs between seeds the
    tables do not line up, which is an error naming the table, row and column. Text that differs in a later
    column is a per-seed result (the layer a search chose, the head that mattered most) and is shown seed by
    seed, "a / b / c"."""
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
        if any(v is None or v.columns != table.columns or len(v.rows) != len(table.rows) for v in versions):
            raise SafetylabError(f"table {table.title!r}: its columns or number of rows differ between seeds")
        rows, means, sds = [], [], []
        for r in range(len(table.rows)):
            cells = [_summarize_cell([v.rows[r][c] for v in versions], table, r, c) for c in range(len(table.columns))]
            rows.append([text for text, _, _ in cells])
            means.append([mean for _, mean, _ in cells])
            sds.append([sd for _, _, sd in cells])
        tables.append(Table(table.title, table.columns, rows))
        numbers.append({"title": table.title, "columns": table.columns, "mean": means, "sd": sds})
    return Section(title=head.title, summary=f"mean ± sd over seeds {', '.join(map(str, seeds))}", tables=tables,
                   data={"seeds": seeds, "tables": numbers, "summaries": [s.summary for s in sections]})


def _summarize_cell(values: list[Any], table: Table, row: int, column: int) -> tuple[Any, Any, Any]:
    """(shown, mean, sd) of one cell over seeds."""
    if all(v == values[0] for v in values):
        return values[0], values[0], 0.0 if _is_number(values[0]) else None
    present = [v for v in values if v is not None]
    if not all(_is_number(v) for v in present):
        if column == 0:
            raise SafetylabError(f"table {table.title!r}, row {row}, column {table.columns[column]!r}: the label "
                                 f"differs between seeds ({', '.join(map(repr, values))}), so the rows do not line up")
        return " / ".join("–" if v is None else str(v) for v in values), None, None
    if not present:
        return None, None, None
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
