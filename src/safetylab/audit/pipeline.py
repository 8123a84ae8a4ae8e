"""The audit pipeline: named stages, each reading earlier stages' outputs and writing its section.

Adding a stage is a local change: write ``def my_stage(ctx) -> Section`` and add
``Stage("name", "Title", my_stage)`` to the list in :mod:`safetylab.audit.stages`. A finished
stage's section is saved in ``stages/NAME/section.json``; rerunning the audit in the same directory
skips it, so an interrupted audit resumes at the stage it was in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetylab.core.runs import RunDir


@dataclass
class Section:
    """What a stage contributes to the report. ``data`` holds what later stages read."""

    title: str
    summary: str
    tables: list[dict[str, Any]] = field(default_factory=list)  # {"title", "columns", "rows"}
    plots: list[str] = field(default_factory=list)  # paths relative to the audit directory
    transcripts: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    run: Callable[[Context], Section]


@dataclass
class Context:
    """What a stage sees: the audit config and run directory, and earlier stages' sections."""

    config: Any
    run: RunDir
    sections: dict[str, Section] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # objects shared within one process

    def stage_dir(self, name: str) -> Path:
        path = self.run.path / "stages" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def run_pipeline(stages: Sequence[Stage], ctx: Context, log: Callable[[str], None] = print) -> dict[str, Section]:
    for stage in stages:
        saved = ctx.run.path / "stages" / stage.name / "section.json"
        if saved.exists():
            ctx.sections[stage.name] = Section(**json.loads(saved.read_text(encoding="utf-8")))
            log(f"== {stage.name}: done earlier, skipped")
            continue
        log(f"== {stage.name}: {stage.title}")
        start = time.perf_counter()
        section = stage.run(ctx)
        ctx.sections[stage.name] = section
        ctx.stage_dir(stage.name)
        ctx.run.write_json(f"stages/{stage.name}/section.json", section.__dict__)
        log(f"== {stage.name}: {time.perf_counter() - start:.1f}s — {section.summary}")
    return ctx.sections
