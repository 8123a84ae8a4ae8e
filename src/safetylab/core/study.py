"""Studies: an experiment as named stages, each writing one typed :class:`Section` of a report.

Every subsystem's ``study.py`` lists its stages (``Stage("attack", "…", attack_stage)``) and one typed
config; ``safetylab <subsystem> report`` runs them with :func:`run_study`, and the audit composes the
studies. A stage is a function ``(ctx: Context) -> Section``; it writes its files under
``ctx.stage_dir(name)`` and reads earlier stages' sections from ``ctx.sections``.

A finished stage's section is saved in ``RUN/NAME/section.json``; running the study again in the same
directory skips it, so an interrupted study resumes at the stage it was in. Each stage starts from its
own seed, derived from the study's seed and the stage's name, so a resumed study gives the same
numbers as one that ran straight through.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetylab.core.config import config_to_dict
from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_text
from safetylab.core.runs import RunDir
from safetylab.core.seeding import derive_seed, seed_everything


@dataclass
class Table:
    """A table of a report: ``rows`` of cells under ``columns`` (numbers, strings or None)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]

    def __post_init__(self):
        self.columns, self.rows = list(self.columns), [list(row) for row in self.rows]
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise SafetylabError(f"table {self.title!r}, row {i}: {len(row)} cells for {len(self.columns)} "
                                     f"columns ({', '.join(self.columns)})")


@dataclass
class Section:
    """What a stage contributes to a report. ``plots`` are paths relative to the study's run directory
    (:meth:`moved` re-roots them when a study runs inside another's directory, as in the audit); ``data``
    holds the numbers later stages and readers use, and any file paths in it stay relative to the
    study's own run directory (``RUN/align`` in an audit)."""

    title: str
    summary: str
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    transcripts: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Section:
        return cls(**{**data, "tables": [Table(**t) for t in data.get("tables", [])]})

    @classmethod
    def load(cls, path: Path) -> Section:
        """The section a finished stage saved at ``path``."""
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def moved(self, prefix: str) -> Section:
        """The section with its plots' paths under ``prefix`` (a study run inside another's directory)."""
        return Section(self.title, self.summary, self.tables, [f"{prefix}/{p}" for p in self.plots],
                       self.transcripts, self.data)


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    run: Callable[[Context], Section]


@dataclass
class Context:
    """What a stage sees: the study's config and run directory, what the caller handed in (``inputs``:
    a model's path, say), earlier stages' sections, and objects shared within one process (``cache``)."""

    config: Any
    run: RunDir
    inputs: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Section] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    def stage_dir(self, name: str) -> Path:
        path = self.run.path / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``'s result, made once per process and shared by the stages that ask for ``key``."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def section(self, name: str) -> Section:
        """The section of the earlier stage ``name``: from this run, or saved in the run directory by an
        earlier one; a stage that never ran here is an error that says so."""
        if name not in self.sections:
            saved = self.run.path / name / "section.json"
            if not saved.is_file():
                raise SafetylabError(f"{self.run.path}: this stage needs the {name!r} stage's results; run the study "
                                     f"with that stage (or hand in what it makes)")
            self.sections[name] = Section.load(saved)
        return self.sections[name]

    def path(self, relative: str) -> Path:
        """A path that a section records relative to the run directory, made absolute."""
        return self.run.path / relative


def stage_names(stages: Sequence[Stage], only: Iterable[str] | None) -> list[Stage]:
    """The stages named in ``only`` (all when None), in the study's order; an unknown name is an error."""
    if only is None:
        return list(stages)
    only = list(only)
    known = [s.name for s in stages]
    unknown = [name for name in only if name not in known]
    if unknown or not only:
        raise SafetylabError(f"stages: expected one or more of {', '.join(known)}, got {', '.join(unknown) or 'none'}")
    return [s for s in stages if s.name in only]


def run_stages(stages: Sequence[Stage], ctx: Context, log: Callable[[str], None] = print,
               prefix: str = "") -> dict[str, Section]:
    """Run ``stages`` in order into ``ctx`` (skipping those finished earlier), each from its own seed;
    returns every section by stage name. ``prefix`` names the study in log lines."""
    root = getattr(ctx.config, "seed", 0)
    for stage in stages:
        saved = ctx.run.path / stage.name / "section.json"
        if saved.exists():
            ctx.sections[stage.name] = Section.load(saved)
            log(f"== {prefix}{stage.name}: done earlier, skipped")
            continue
        log(f"== {prefix}{stage.name}: {stage.title}")
        start = time.perf_counter()
        seed_everything(derive_seed(root, "stage", stage.name))
        section = stage.run(ctx)
        ctx.sections[stage.name] = section
        ctx.stage_dir(stage.name)
        ctx.run.write_json(f"{stage.name}/section.json", section.to_dict())
        log(f"== {prefix}{stage.name}: {time.perf_counter() - start:.1f}s — {section.summary}")
    return ctx.sections


def run_study(stages: Sequence[Stage], config: Any, out: str | Path | RunDir, only: Iterable[str] | None = None,
              inputs: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> dict[str, Section]:
    """Run the ``only`` stages of a study (all by default) with ``config`` into the run directory ``out``
    and write ``sections.json`` and ``tables.md`` there; returns the sections."""
    chosen = stage_names(stages, only)
    given = {name: str(value) for name, value in (inputs or {}).items()}  # another --model is another run
    run = out if isinstance(out, RunDir) else RunDir(out, {"inputs": given, **config_to_dict(config)})
    sections = run_stages(chosen, Context(config, run, dict(inputs or {})), log)
    run.write_json("sections.json", {name: s.to_dict() for name, s in sections.items()})
    atomic_write_text(run.path / "tables.md", tables_markdown(sections))
    return sections


def tables_markdown(sections: dict[str, Section]) -> str:
    """Every section's summary, tables (Markdown) and plots (linked), in order."""
    lines = []
    for section in sections.values():
        lines += [f"## {section.title}", "", section.summary, ""]
        for table in section.tables:
            lines += [f"**{table.title}**", "", "| " + " | ".join(table.columns) + " |",
                      "|" + "---|" * len(table.columns)]
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.rows]
            lines.append("")
        lines += [f"![{Path(p).stem}]({p})" for p in section.plots] + [""]
    return "\n".join(lines)


def cell(value: Any) -> str:
    """A table cell as text: floats to three decimals, None as a dash."""
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

