"""The evaluation harness: a :class:`Task` is a dataset, a solver and a scorer kept apart (as Inspect keeps
them), run against any :class:`~safetylab.evals.targets.Target`.

- a **sample** is an input with an optional target answer, an id and metadata (its kind, its jailbreak);
- a **solver** takes a :class:`TaskState` and the target and returns the state, plain or ``async``: the
  default one, :func:`generate`, asks the target once; an attack rewrites the input first; a multi-turn
  solver talks several times;
- a **scorer** takes the finished state and returns a :class:`Score` whose ``value`` maps metric names to
  numbers (``{"harmful": 1, "refused": 0}``); 0/1 metrics are rates (Wilson intervals), others means
  (bootstrap intervals), overall and by the metadata field ``group_by``.

:func:`run_task` streams each finished sample to ``<log_dir>/<task>.samples.jsonl`` as it completes (a crash
keeps what was done; running again resumes, skipping the samples already done and retrying those that failed)
and at the end writes the whole run as an Inspect eval log, ``<log_dir>/<task>.json``, which ``inspect view``
opens and ``inspect_ai.log.read_eval_log`` reads (:mod:`safetylab.evals.logs`). A sample whose solver, target
or scorer fails is recorded with its error and left out of the metrics; the run goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetylab.core.errors import SafetylabError
from safetylab.core.io import read_jsonl
from safetylab.evals.logs import SampleStream, dataset_digest, write_eval_log
from safetylab.evals.metrics import Estimate, summarise
from safetylab.evals.targets import GenerateConfig, Output, Target


@dataclass(frozen=True)
class Sample:
    """One evaluation item: ``input`` (the user's message), ``target`` (the answer a scorer compares with, if
    any), ``id`` (unique in its dataset) and ``metadata`` (JSON values: the request's kind, its jailbreak…)."""

    id: str | int
    input: str
    target: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class TaskState:
    """A sample as the solvers work on it: the conversation so far (``messages``), the target's last
    ``output``, and ``store``, where solvers leave notes for the scorer (the attack applied, say)."""

    sample: Sample
    messages: list[dict[str, str]]
    output: Output | None = None
    store: dict[str, Any] = field(default_factory=dict)

    @property
    def completion(self) -> str:
        return self.output.text if self.output is not None else ""


@dataclass(frozen=True)
class Score:
    """A scorer's judgement: ``value`` (metric name → number; None leaves a metric out for this sample),
    ``answer`` (what was extracted from the completion), ``explanation`` and ``metadata``."""

    value: Mapping[str, float | int | bool | None]
    answer: str | None = None
    explanation: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


Solver = Callable[[TaskState, Target], TaskState | Awaitable[TaskState]]
Scorer = Callable[[TaskState], Score | Awaitable[Score]]


def generate(config: GenerateConfig = GenerateConfig()) -> Solver:
    """The solver that asks the target once and appends its answer to the conversation."""

    async def solve(state: TaskState, target: Target) -> TaskState:
        state.output = await target.generate(state.messages, config)
        state.messages.append({"role": "assistant", "content": state.output.text})
        return state

    solve.__name__ = "generate"
    solve.params = {"max_tokens": config.max_tokens, "temperature": config.temperature}
    return solve


def includes(state: TaskState) -> Score:
    """The scorer of a dataset with target answers: ``correct`` when the target appears in the completion
    (case-insensitive; a sample without a target is not scored)."""
    target = state.sample.target.strip().lower()
    return Score({"correct": int(target in state.completion.lower()) if target else None},
                 answer=state.completion)


@dataclass(frozen=True)
class Task:
    """``dataset`` answered through ``solver`` (one solver or a chain, run in order) and judged by ``scorer``.
    ``group_by``: the metadata field the metrics are broken down by (None for none). ``version`` goes into
    the log: a resumed run must have the same name, version, dataset and target."""

    name: str
    dataset: Sequence[Sample]
    scorer: Scorer
    solver: Solver | Sequence[Solver] = field(default_factory=generate)
    group_by: str | None = "kind"
    version: int = 1
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or not self.name.replace("-", "_").isidentifier():
            raise SafetylabError(f"task name: expected letters, digits, - and _, got {self.name!r}")
        seen = set()
        for i, sample in enumerate(self.dataset):
            where = f"task {self.name}: dataset[{i}]"
            if not isinstance(sample, Sample):
                raise SafetylabError(f"{where}: expected a Sample, got {type(sample).__name__}")
            if not isinstance(sample.input, str) or not sample.input.strip():
                raise SafetylabError(f"{where}: input: expected a non-empty string, got {sample.input!r}")
            if sample.id in seen:
                raise SafetylabError(f"{where}: id {sample.id!r} appears twice; sample ids must be unique")
            seen.add(sample.id)
        if not self.dataset:
            raise SafetylabError(f"task {self.name}: the dataset is empty")

    @property
    def solvers(self) -> tuple[Solver, ...]:
        return tuple(self.solver) if isinstance(self.solver, Sequence) else (self.solver,)


@dataclass(frozen=True)
class EvalRun:
    """A finished run: every sample's record (as logged), the metrics with their intervals, overall
    (``metrics[name]["all"]``) and by group (``metrics[name]["by"][group]``), the count of samples that
    failed, and where the logs are."""

    task: str
    target: str
    records: list[dict[str, Any]]
    metrics: dict[str, dict[str, Any]]
    errors: int
    log: Path
    samples_log: Path

    def estimate(self, name: str, group: str | None = None) -> Estimate:
        if name not in self.metrics:
            raise SafetylabError(f"{self.task}: no metric {name!r} (have {', '.join(self.metrics) or 'none'})")
        return self.metrics[name]["all"] if group is None else self.metrics[name]["by"][group]


def read_dataset(path: str | os.PathLike) -> list[Sample]:
    """Samples from a JSONL file, one object a line: ``input`` (required), ``target``, ``id`` (the line number
    when missing), ``metadata``. A line without ``input`` is an error naming the file and line."""
    samples = []
    for line, row in enumerate(read_jsonl(path, required=("input",)), start=1):
        where = f"{path}, line {line}"
        if not row["input"].strip():
            raise SafetylabError(f"{where}: input: expected a non-empty string")
        if not isinstance(row.get("metadata", {}), dict):
            raise SafetylabError(f"{where}: metadata: expected an object, got {row['metadata']!r}")
        samples.append(Sample(row.get("id", line), row["input"], str(row.get("target", "")), row.get("metadata", {})))
    return samples


async def _call(function, *args):
    out = function(*args)
    return await out if inspect.isawaitable(out) else out


async def run_sample(task: Task, sample: Sample, target: Target) -> dict[str, Any]:
    """One sample through the solvers and the scorer: its log record (with ``error`` instead of ``scores`` if
    any step raised)."""
    start = time.monotonic()
    state = TaskState(sample, [{"role": "user", "content": sample.input}])
    score, error = None, None
    try:
        for solver in task.solvers:
            solved = await _call(solver, state, target)
            if not isinstance(solved, TaskState):
                raise SafetylabError(f"solver {_name(solver)} returned {type(solved).__name__}, expected a TaskState")
            state = solved
        scored = await _call(task.scorer, state)
        if not isinstance(scored, Score):
            raise SafetylabError(f"scorer {_name(task.scorer)} returned {type(scored).__name__}, expected a Score")
        bad = [k for k, v in dict(scored.value).items() if not isinstance(k, str) or not (
            v is None or (isinstance(v, (int, float)) and math.isfinite(v)))]
        if bad:
            raise SafetylabError(f"scorer {_name(task.scorer)}: value[{bad[0]!r}] is {scored.value[bad[0]]!r}; "
                                 "expected a finite number, a bool or None")
        score = scored
    except Exception as e:  # noqa: BLE001 - recorded as the sample's error; the run goes on
        error = {"message": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    return {"id": sample.id, "input": sample.input, "target": sample.target, "messages": state.messages,
            "output": state.output, "score": score, "store": state.store, "metadata": dict(sample.metadata),
            "error": error, "total_time": round(time.monotonic() - start, 6)}


async def run_task_async(task: Task, target: Target, log_dir: str | os.PathLike, concurrency: int = 64,
                         resume: bool = True, confidence: float = 0.95, seed: int = 0) -> EvalRun:
    """Run ``task`` against ``target`` with at most ``concurrency`` samples in flight; see the module."""
    if not isinstance(concurrency, int) or concurrency < 1:
        raise SafetylabError(f"concurrency: expected an integer >= 1, got {concurrency!r}")
    log_dir = Path(log_dir)
    header = {"task": task.name, "task_version": task.version, "target": target.name,
              "dataset": dataset_digest(task.dataset), "solvers": [_name(s) for s in task.solvers],
              "scorer": _name(task.scorer)}
    stream = SampleStream(log_dir / f"{task.name}.samples.jsonl", header, resume)
    pending = iter([s for s in task.dataset if s.id not in stream.done])

    async def worker():
        for sample in pending:
            stream.write(await run_sample(task, sample, target))

    status, error = "error", None
    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(task.dataset)))))
        status = "success"
    except (asyncio.CancelledError, KeyboardInterrupt):
        status = "cancelled"
        raise
    except Exception as e:
        error = {"message": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        raise
    finally:
        stream.close()
        await target.close()
        records = stream.read()
        order = {s.id: i for i, s in enumerate(task.dataset)}
        records.sort(key=lambda r: order.get(r["id"], len(order)))
        scored = [r for r in records if r["error"] is None]
        groups = [str(r["metadata"].get(task.group_by, "")) for r in scored] if task.group_by else None
        values = [r["scores"][header["scorer"]]["value"] for r in scored]
        metrics = summarise(values, groups, confidence, seed) if scored else {}
        log = write_eval_log(log_dir / f"{task.name}.json", task, header, records, metrics, status, stream.started,
                             error)
    return EvalRun(task.name, target.name, records, metrics, len(records) - len(scored), log, stream.path)


def run_task(task: Task, target: Target, log_dir: str | os.PathLike, **options) -> EvalRun:
    """:func:`run_task_async` from synchronous code."""
    return asyncio.run(run_task_async(task, target, log_dir, **options))


def _name(function) -> str:
    return getattr(function, "__name__", type(function).__name__)


def metrics_table(run: EvalRun, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Rows ``{"group", "metric", "value", "low", "high", "n"}``: each metric overall, then by group."""
    rows = []
    for name in names or run.metrics:
        for group, est in (("all", run.metrics[name]["all"]), *run.metrics[name]["by"].items()):
            rows.append({"group": group, "metric": name, "value": est.value, "low": est.low, "high": est.high,
                         "n": est.n})
    return rows


__all__ = ["EvalRun", "Sample", "Score", "Scorer", "Solver", "Task", "TaskState", "generate", "includes",
           "metrics_table", "read_dataset", "run_sample", "run_task", "run_task_async"]
