"""What the commands share: naming a bad value by its option, reading comma-separated numbers and seeds,
and running a study (``safetylab <subsystem> report``) once or over seeds."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from safetylab.core.errors import ConfigError, SafetylabError

Seed = Annotated[int, typer.Option(help="Random seed (fixes the world and every run).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
RunOut = Annotated[Path, typer.Option("--out", "-o", help="Run directory.")]
Seeds = Annotated[str | None, typer.Option(help="Comma-separated seeds (0,1,2): run once per seed in OUT/seed-N "
                                                "and write the mean ± sd summary.")]


@contextmanager
def options(*fields: str, **renamed: str) -> Iterator[None]:
    """Config errors raised inside about ``fields`` (the config fields that command-line options set,
    ``label_smoothing`` for ``--label-smoothing``) or the fields of ``renamed`` (field → option, where
    the names differ) name the option instead of the field. Build configs inside it, before any file is
    written."""
    names = {field: "--" + field.replace("_", "-") for field in fields} | renamed
    try:
        yield
    except ConfigError as e:
        if e.field not in names:
            raise
        raise e.renamed(names[e.field]) from None


def numbers(text: str, option: str, what: str = "numbers") -> tuple[float, ...]:
    """The comma-separated ``text`` of ``option`` as finite numbers >= 0 (``what`` names them in errors)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SafetylabError(f"{option}: expected comma-separated numbers such as 0,0.05,0.1, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise SafetylabError(f"{option}: expected one or more finite {what} >= 0, got {text!r}")
    return values


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """The comma-separated ``text`` of ``option`` as distinct integers >= 0."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SafetylabError(f"{option}: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise SafetylabError(f"{option}: expected one or more distinct integers >= 0, got {text!r}")
    return seeds


def study_report(stages: Sequence, make_config: Callable[[int], Any], out: Path, seed: int, seeds: str | None = None,
                 only: Iterable[str] | None = None, inputs: dict[str, Any] | None = None,
                 names: dict[str, str] | None = None) -> None:
    """Run a study's ``stages`` (the ``only`` ones, default all) into ``out`` with ``make_config(seed)``;
    with ``seeds`` ("0,1,2") once per seed into ``out/seed-N`` and the mean ± sd summary beside them.
    Every config is built (and so checked) before any directory is made; ``names`` maps config fields to
    the options that set them, for error messages."""
    from safetylab.core.study import run_study, stage_names
    from safetylab.core.summary import run_seeds

    chosen = parse_seeds(seeds) if seeds is not None else [seed]
    with options("seed", **(names or {})):
        configs = {s: make_config(s) for s in chosen}
    stage_names(stages, only)
    if seeds is None:
        run_study(stages, configs[seed], out, only, inputs)
        print(f"tables: {out / 'tables.md'}")
        return
    run_seeds(lambda s, directory: run_study(stages, configs[s], directory, only, inputs), chosen, out)
    print(f"summary over seeds {seeds}: {out / 'summary.md'}")


def overridden(config, **given):
    """``config`` with the command-line options that were given (not ``None``)."""
    return replace(config, **{k: v for k, v in given.items() if v is not None})


def emit(records: list[dict], out: Path | None) -> None:
    from safetylab.core.io import dumps_line, write_jsonl

    if out is None:
        for record in records:
            sys.stdout.write(dumps_line(record) + "\n")
    else:
        write_jsonl(out, records)
        print(f"wrote {len(records)} lines to {out}", file=sys.stderr)


def print_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str) -> None:
    """A rich table on standard output; floats to three decimals, None as a dash."""
    from rich.console import Console
    from rich.table import Table

    from safetylab.core.study import cell

    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*(cell(v) for v in row))
    Console().print(table)


def given_model(model: Path | None, seed: int, seeds: str | None) -> dict[str, str] | None:
    """The study's inputs for a classifier handed in with ``--model`` (a ``robust train`` or ``verify train``
    run), checked before any directory is made: it loads, and it was trained on this seed's split of the
    digits (another seed, or several, would test it on digits it trained on)."""
    import json

    from safetylab.models.classifier import load_classifier

    if model is None:
        return None
    if seeds is not None:
        raise SafetylabError("--model with --seeds: each seed splits the digits differently, so a given "
                             "classifier would be tested on digits it trained on; drop one of them")
    load_classifier(model)
    saved = Path(model) / "config.json"
    trained = json.loads(saved.read_text(encoding="utf-8")).get("seed") if saved.is_file() else None
    if trained is not None and trained != seed:
        raise SafetylabError(f"--model {model} was trained on the digits split of seed {trained}; study it with "
                             f"--seed {trained}, or it would be tested on digits it trained on")
    return {"model": str(model)}
