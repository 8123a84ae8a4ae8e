"""Evaluations: safety benchmarks, red teaming and capability evaluations (to come). A policy's behaviour in
the assistant world, scored by the gold judge, is :mod:`safetylab.align.evaluate`, which the alignment
study and these evaluations share."""

from safetylab.align.evaluate import EvalConfig, evaluate_policy, summarize

__all__ = ["EvalConfig", "evaluate_policy", "summarize"]
