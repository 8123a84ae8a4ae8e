"""What the commands share: naming a bad value by its option, reading comma-separated numbers, and (for
``safetylab robust …`` and ``safetylab verify …``) running sections of a study into a run directory."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType

from safetylab.core.errors import ConfigError


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


def run_study(suite: ModuleType, out: Path, seed: int, sections: tuple[str, ...], model: Path | None = None,
              quick: bool = False, names: dict[str, str] | None = None, **changes) -> None:
    """Run ``sections`` of ``suite`` (a module with ``suite_config`` and ``run_suite``, e.g.
    :mod:`safetylab.robust.suite`) into the run directory ``out``, with ``changes`` to its config, and
    print where the tables and plots are. ``names`` maps the changed fields to the options that set them
    (``attack_steps="--steps"``); the config and ``model`` are checked before the run directory is made."""
    from safetylab.core.runs import RunDir
    from safetylab.robust.data import load_classifier
    from safetylab.robust.suite import tables_markdown

    with options("seed", **(names or {})):
        config = replace(suite.suite_config(quick, seed), **changes)
    if model is not None:
        load_classifier(model)
    run = RunDir(out, {"sections": list(sections), "model": None if model is None else str(model), **asdict(config)})
    result = suite.run_suite(config, run, sections, model=model)
    print(f"tables: {tables_markdown(result, run)}\nplots:  {run.plots}")


def numbers(text: str, option: str, what: str = "numbers") -> tuple[float, ...]:
    """The comma-separated ``text`` of ``option`` as finite numbers >= 0 (``what`` names them in errors)."""
    from safetylab.core.errors import SafetylabError

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SafetylabError(f"{option}: expected comma-separated numbers such as 0,0.05,0.1, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise SafetylabError(f"{option}: expected one or more finite {what} >= 0, got {text!r}")
    return values
