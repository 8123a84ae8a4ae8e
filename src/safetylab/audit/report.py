"""The audit report: ``report.json`` (machine-readable) and ``report.html`` (self-contained)."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from safetylab import __version__
from safetylab.core.io import atomic_write_text
from safetylab.core.study import Section


def build_report(config: Any, sections: dict[str, Section], studies: dict[str, str]) -> dict[str, Any]:
    """The report of ``sections`` (named ``study/stage``), grouped by the ``studies`` (name → title)."""
    return {
        "safetylab": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "studies": [{"name": name, "title": title} for name, title in studies.items()],
        "sections": [{"name": name, "study": name.split("/")[0], **section.to_dict()}
                     for name, section in sections.items()],
    }


def write_report(directory: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write both files atomically; plots are embedded in the HTML as data URIs."""
    env = Environment(loader=PackageLoader("safetylab.audit", "templates"), autoescape=select_autoescape())
    env.filters["fmt"] = _fmt
    images = {p: _data_uri(directory / p) for s in report["sections"] for p in s["plots"]}
    html = env.get_template("report.html.j2").render(report=report, images=images)
    json_path, html_path = directory / "report.json", directory / "report.html"
    atomic_write_text(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(html_path, html)
    return json_path, html_path


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
