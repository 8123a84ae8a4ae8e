"""Run the whole audit into a run directory and write its report."""

from __future__ import annotations

import os
from collections.abc import Callable

from safetylab.audit.report import build_report, write_report
from safetylab.audit.stages import STUDIES, AuditConfig
from safetylab.core.config import config_to_dict
from safetylab.core.runs import RunDir
from safetylab.core.study import Context, Section, run_stages


def run_audit(config: AuditConfig, out: str | os.PathLike, log: Callable[[str], None] = print,
              ) -> dict[str, Section]:
    """Run every study in ``out/NAME`` (skipping stages finished in an earlier, interrupted run of the same
    config) and write ``report.json`` and ``report.html``; returns the sections by ``study/stage`` with
    plot paths relative to ``out``."""
    run = RunDir(out, config_to_dict(config))
    sections: dict[str, Section] = {}
    for study in STUDIES:
        study_config = study.config_of(config)
        inputs = {name: str(run.path / path) for name, path in study.inputs_of(sections).items()}
        ctx = Context(study_config, RunDir(run.path / study.name, config_to_dict(study_config)), inputs)
        for name, section in run_stages(study.stages, ctx, log, prefix=f"{study.name}/").items():
            sections[f"{study.name}/{name}"] = section.moved(study.name)
    write_report(run.path, build_report(config, sections, {s.name: s.title for s in STUDIES}))
    return sections

