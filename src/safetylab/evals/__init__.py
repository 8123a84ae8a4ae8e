"""Evaluations: a harness of tasks, solvers and scorers with intervals and Inspect logs
(:mod:`.harness`), targets for local models and OpenAI-compatible endpoints (:mod:`.targets`), the world's
safety and capability suites (:mod:`.suites`, :mod:`.capabilities`) and red teaming (:mod:`.redteam`).

A policy's behaviour in the assistant world, scored by the gold judge in one batch, is
:mod:`safetylab.align.evaluate`, which the alignment study and these suites share."""

from safetylab.align.evaluate import EvalConfig, evaluate_policy, summarize
from safetylab.evals.harness import EvalRun, Sample, Score, Task, TaskState, generate, includes, read_dataset, run_task
from safetylab.evals.metrics import Estimate, estimate, wilson_interval

__all__ = ["EvalConfig", "EvalRun", "Estimate", "Sample", "Score", "Task", "TaskState", "estimate", "evaluate_policy",
           "generate", "includes", "read_dataset", "run_task", "summarize", "wilson_interval"]
