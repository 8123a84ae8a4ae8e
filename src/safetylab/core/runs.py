"""Run directories: one per experiment, holding its config, metrics, artifacts, plots and report.

Layout::

    RUN/
      config.json        the resolved config (a run directory never changes config)
      metrics.jsonl      one JSON object per logged step
      checkpoints/       step-000100/ ... written to a temporary name, then renamed
      artifacts/         models, data, tables
      plots/             PNG figures
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_bytes, atomic_write_text, dumps_line

_STEP_DIR = re.compile(r"^step-(\d+)$")


def saved_inside(path: str | os.PathLike, marker: str) -> str:
    """Where a user who named a run directory (``path``) instead of a saved model inside it should look:
    "; it holds DIR: pass that directory" for each directory under ``path`` with a file ``marker``
    (checkpoints and unfinished writes left out), or "" when there is none."""
    path = Path(path)
    if not path.is_dir():
        return ""
    found = [str(p.parent) for p in sorted(path.rglob(marker))
             if not any(part == "checkpoints" or part.startswith(".tmp-") for part in p.relative_to(path).parts)]
    if not found:
        return ""
    return f"; it holds {' and '.join(found[:3])}{' and more' if len(found) > 3 else ''}: pass that directory"


class RunDir:
    """A run directory bound to one config; reopening it with the same config resumes it. A directory
    that holds nothing but its config (a run that failed before its first result) takes a new one."""

    def __init__(self, path: str | os.PathLike, config: dict[str, Any]):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config))  # a plain, JSON-round-tripped copy
        self.path.mkdir(parents=True, exist_ok=True)
        saved = self.path / "config.json"
        diff = "no config yet"
        if saved.exists():
            try:
                old = json.loads(saved.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise SafetylabError(f"{saved}: corrupt config ({e.msg}); delete the run directory") from None
            diff = _first_difference(old, self.config)
            if diff is not None and self._holds_results():
                raise SafetylabError(
                    f"{self.path}: this run directory already holds a different config "
                    f"({diff}); use a new --out directory or the same settings"
                )
        if diff is not None:
            atomic_write_text(saved, json.dumps(self.config, indent=2) + "\n")
        for sub in ("checkpoints", "artifacts", "plots"):
            (self.path / sub).mkdir(exist_ok=True)
        self._drop_torn_metrics_line()

    def _holds_results(self) -> bool:
        """Whether any file but a config (this run's, or a nested run's) was written here."""
        return any(p.is_file() and p.name != "config.json" for p in self.path.rglob("*"))

    # ----------------------------------------------------------------- files
    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` (inside the run directory) relative to it, as reports link files."""
        return str(Path(path).relative_to(self.path))

    def write_json(self, name: str, data: Any) -> Path:
        target = self.path / name
        atomic_write_text(target, json.dumps(data, indent=2, allow_nan=False) + "\n")
        return target

    # --------------------------------------------------------------- metrics
    def log(self, step: int, **values: Any) -> dict[str, Any]:
        """Append one metrics record; values must be JSON numbers, strings or small containers."""
        record = {"step": int(step), **values}
        with (self.path / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(dumps_line(record) + "\n")
        return record

    def metrics(self) -> list[dict[str, Any]]:
        """The logged records; a torn last line (an interrupted append) is ignored."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        records = []
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    break
                raise SafetylabError(f"{path}, line {number}: malformed metrics record") from None
        return records

    def _drop_torn_metrics_line(self) -> None:
        """An interrupted append can leave a last line without its newline; drop it, so the next
        record starts on a line of its own."""
        path = self.path / "metrics.jsonl"
        if path.exists() and path.stat().st_size:
            data = path.read_bytes()
            if not data.endswith(b"\n"):
                atomic_write_bytes(path, data[: data.rfind(b"\n") + 1])

    def truncate_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Keep only the records ``keep`` accepts (used when resuming from a checkpoint)."""
        kept = [r for r in self.metrics() if keep(r)]
        atomic_write_text(self.path / "metrics.jsonl", "".join(dumps_line(r) + "\n" for r in kept))

    # ----------------------------------------------------------- checkpoints
    def checkpoint_dir(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step-{step:06d}"

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint; half-written ones never carry a ``step-N`` name."""
        found = []
        for child in (self.path / "checkpoints").iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
        return max(found) if found else None

    def save_checkpoint(self, step: int, write: Callable[[Path], None], keep: int = 2) -> Path:
        """Call ``write(tmp_dir)``, then rename the directory into place, atomically."""
        final = self.checkpoint_dir(step)
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        steps = sorted(
            (int(m.group(1)), c)
            for c in (self.path / "checkpoints").iterdir()
            if (m := _STEP_DIR.match(c.name))
        )
        for _, old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _first_difference(old: Any, new: Any, where: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            name = f"{where}.{key}" if where else key
            if key not in old:
                return f"{name}: not in the saved config"
            if key not in new:
                return f"{name}: missing from the new config"
            diff = _first_difference(old[key], new[key], name)
            if diff is not None:
                return diff
        return None
    if old != new:
        return f"{where or 'config'}: saved {old!r}, now {new!r}"
    return None
