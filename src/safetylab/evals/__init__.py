"""Evaluations: how a policy behaves in the assistant world, scored by the gold judge."""

from safetylab.evals.policy import EvalConfig, evaluate_policy, summarize

__all__ = ["EvalConfig", "evaluate_policy", "summarize"]
