"""Run the whole audit into a run directory and write its report."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from safetylab.audit.pipeline import Context, run_pipeline
from safetylab.audit.report import build_report, write_report
from safetylab.audit.stages import STAGES, AuditConfig
from safetylab.core.config import config_to_dict
from safetylab.core.runs import RunDir


def run_audit(config: AuditConfig, out: str | os.PathLike, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Run every stage (skipping those finished in an earlier, interrupted run of the same config)
    and write ``report.json`` and ``report.html``; returns their paths."""
    run = RunDir(out, config_to_dict(config))
    ctx = Context(config=config, run=run)
    sections = run_pipeline(STAGES, ctx, log)
    return write_report(run.path, build_report(config, sections))
