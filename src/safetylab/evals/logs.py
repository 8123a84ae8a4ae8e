"""Eval logs: a stream of finished samples while a run goes, and Inspect's eval log at the end.

- ``<task>.samples.jsonl``: a header line (task, version, target, the dataset's digest), then one line per
  finished sample, in the shape of Inspect's ``EvalSample``, written and flushed as each sample finishes. A
  crash loses at most the sample being written (a torn last line is dropped on resume); a rerun with the same
  header skips the samples already done and retries those that failed; a different header is refused rather
  than mixed in.
- ``<task>.json``: Inspect's JSON eval log (``version`` 2: ``eval`` spec, ``plan``, ``results``, ``stats``,
  ``samples``), written atomically when the run ends, successful or not (``status``), so
  ``inspect view --log-dir <dir>`` shows our runs and ``inspect_ai.log.read_eval_log`` loads them. Each metric
  is an Inspect score whose metrics are the value and the interval's ends; the intervals' method and the
  breakdown by group are in ``results.metadata``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetylab
from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_text

LOG_FORMAT = "safetylab.eval-samples/1"
STOP_REASONS = {"stop", "max_tokens", "model_length", "tool_calls", "content_filter", "unknown"}  # Inspect's


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def dataset_digest(dataset: Sequence) -> str:
    """SHA-256 of the samples' ids, inputs and targets, in order: a resumed run must see the same dataset."""
    h = hashlib.sha256()
    for sample in dataset:
        h.update(json.dumps([sample.id, sample.input, sample.target], ensure_ascii=False).encode())
    return h.hexdigest()


def sample_record(raw: Mapping[str, Any], scorer: str) -> dict[str, Any]:
    """A finished sample (:func:`safetylab.evals.harness.run_sample`'s dict) in Inspect's ``EvalSample`` shape."""
    output, score = raw["output"], raw["score"]
    messages = [{"role": m["role"], "content": m["content"], "source": "generate" if m["role"] == "assistant"
                 else "input"} for m in raw["messages"]]
    record = {"id": raw["id"], "epoch": 1, "input": raw["input"], "target": raw["target"], "messages": messages,
              "output": {"model": "", "choices": [], "completion": ""}, "scores": None,
              "metadata": raw["metadata"], "store": _json_safe(raw["store"]), "total_time": raw["total_time"],
              "working_time": raw["total_time"], "uuid": uuid.uuid4().hex, "error": None}
    if output is not None:
        reason = output.stop_reason if output.stop_reason in STOP_REASONS else "unknown"
        record["output"] = {"model": output.model, "completion": output.text, "metadata": output.metadata or None,
                            "choices": [{"message": {"role": "assistant", "content": output.text,
                                                     "source": "generate"}, "stop_reason": reason}]}
    if score is not None:
        record["scores"] = {scorer: {"value": dict(score.value), "answer": score.answer,
                                     "explanation": score.explanation, "metadata": _json_safe(score.metadata)}}
    if raw["error"] is not None:
        record["error"] = {**raw["error"], "traceback_ansi": raw["error"]["traceback"]}
    return record


def _json_safe(value: Any) -> Any:
    """``value`` as JSON can hold it (tuples to lists; anything else JSON cannot hold to its repr)."""
    return json.loads(json.dumps(value, ensure_ascii=False, default=repr))


class SampleStream:
    """The per-sample log of a run (see the module). ``done``: the ids already logged (empty unless resuming);
    ``started``: when the run first started."""

    def __init__(self, path: Path, header: dict[str, Any], resume: bool = True):
        self.path, self.header = Path(path), {"format": LOG_FORMAT, **header}
        self.done: set = set()  # ids logged without an error: a resumed run skips them and retries the rest
        self._records: dict = {}  # id -> the sample's latest record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.started = now()
        if resume and self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            atomic_write_text(self.path, json.dumps({**self.header, "started": self.started}, ensure_ascii=False)
                              + "\n")
        self._file = self.path.open("a", encoding="utf-8")

    def _load(self) -> None:
        with self.path.open("rb") as f:
            lines = f.read().split(b"\n")
        good = 0  # bytes up to the last complete line
        try:
            first = json.loads(lines[0])
        except ValueError:
            raise SafetylabError(f"{self.path}: not a sample log (its first line is not JSON); move it away or "
                                 "run without resuming") from None
        mismatch = [k for k in self.header if first.get(k) != self.header[k]]
        if mismatch:
            raise SafetylabError(f"{self.path}: logged by another run ({', '.join(mismatch)} differ: "
                                 f"{first.get(mismatch[0])!r} there, {self.header[mismatch[0]]!r} here); use another "
                                 "log directory or run without resuming")
        self.started, good = first.get("started", self.started), len(lines[0]) + 1
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except ValueError:
                break  # a torn last line (the run was killed while writing it) or the end
            self._keep(record)
            good += len(line) + 1
        with self.path.open("r+b") as f:  # drop the torn tail so the next line starts clean
            f.truncate(good)

    def write(self, raw: Mapping[str, Any]) -> None:
        record = sample_record(raw, self.header["scorer"])
        self._file.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        self._file.flush()
        self._keep(record)

    def _keep(self, record: dict[str, Any]) -> None:
        self._records[record["id"]] = record
        if record["error"] is None:
            self.done.add(record["id"])

    def read(self) -> list[dict[str, Any]]:
        """Each sample's latest record (a retried sample's error is replaced by its retry)."""
        return list(self._records.values())

    def close(self) -> None:
        self._file.close()


def inspect_metrics(metrics: Mapping[str, Mapping[str, Any]], scorer: str, scored: int,
                    unscored: int) -> list[dict[str, Any]]:
    """Inspect ``EvalScore`` entries: one per metric, its value and its interval's ends as Inspect metrics."""
    out = []
    for name, summary in metrics.items():
        est = summary["all"]
        out.append({"name": name, "scorer": scorer, "scored_samples": scored, "unscored_samples": unscored,
                    "params": {}, "metrics": {
                        key: {"name": key, "value": value, "params": {}} for key, value in
                        (("mean", est.value), ("ci_low", est.low), ("ci_high", est.high))}})
    return out


def write_eval_log(path: Path, task, header: Mapping[str, Any], records: list[dict[str, Any]],
                   metrics: Mapping[str, Mapping[str, Any]], status: str, started: str,
                   error: Mapping[str, str] | None = None) -> Path:
    """Write the run as an Inspect JSON eval log (atomically) and return its path; ``error`` (``message``,
    ``traceback``) is what stopped a run that did not finish."""
    errors = sum(r["error"] is not None for r in records)
    spec = {"eval_id": uuid.uuid4().hex, "run_id": uuid.uuid4().hex, "created": started, "task": task.name,
            "task_id": header["dataset"][:16], "task_version": task.version,
            "task_attribs": {}, "task_args": {}, "solver": header["solvers"][-1],
            "dataset": {"name": task.name, "samples": len(task.dataset),
                        "sample_ids": [s.id for s in task.dataset]},
            "model": header["target"], "config": {}, "packages": {"safetylab": safetylab.__version__},
            "metadata": _json_safe(dict(task.metadata))}
    plan = {"name": "plan", "steps": [{"solver": name, "params": {}} for name in header["solvers"]], "config": {}}
    results = {"total_samples": len(task.dataset), "completed_samples": len(records) - errors,
               "scores": inspect_metrics(metrics, header["scorer"], len(records) - errors, errors),
               "metadata": {"group_by": task.group_by, "errors": errors,
                            "metrics": {name: {"all": m["all"].to_dict(),
                                               "by": {g: e.to_dict() for g, e in m["by"].items()}}
                                        for name, m in metrics.items()}}}
    log = {"version": 2, "status": status, "eval": spec, "plan": plan, "results": results,
           "stats": {"started_at": started, "completed_at": now(), "model_usage": {}}, "samples": records}
    if error is not None:
        log["error"] = {**error, "traceback_ansi": error["traceback"]}
    atomic_write_text(path, json.dumps(log, ensure_ascii=False, allow_nan=False) + "\n")
    return path


__all__ = ["SampleStream", "dataset_digest", "sample_record", "write_eval_log"]
