"""Deploying a model under control: a guard of ordered layers, tripwires and a kill switch, a tamper-evident
audit log, human review, and an OpenAI-compatible server that puts them around any model (docs/control.md).

The server's names (``Server``, ``ServerConfig``, ``create_app``) load FastAPI on first use."""

from safetylab.control.auditlog import AuditLog, PostgresAuditLog, SQLiteAuditLog, open_audit_log
from safetylab.control.build import GuardBuildConfig, build_guard, retrain
from safetylab.control.classifier import TextClassifier, fit_text_classifier, load_text_classifier
from safetylab.control.config import load_guard, read_guard, write_guard
from safetylab.control.guard import Guard, Layer, LayerResult, Verdict
from safetylab.control.layers import ClassifierLayer, MonitorLayer, Rule, RulesLayer
from safetylab.control.ood import OODLayer, fit_ood_layer, load_ood_layer
from safetylab.control.state import State
from safetylab.control.tripwires import OutputAnomaly, RepeatedAttempts, ScoreSpike, Tripwires

SERVER = ("Server", "ServerConfig", "create_app", "echo_generator", "model_generator")


def __getattr__(name: str):
    if name in SERVER:
        from safetylab.control import server

        return getattr(server, name)
    raise AttributeError(f"module 'safetylab.control' has no attribute {name!r}")


__all__ = [
    "AuditLog", "ClassifierLayer", "Guard", "GuardBuildConfig", "Layer", "LayerResult", "MonitorLayer", "OODLayer",
    "OutputAnomaly", "PostgresAuditLog", "RepeatedAttempts", "Rule", "RulesLayer", "SQLiteAuditLog", "ScoreSpike",
    "State", "TextClassifier", "Tripwires", "Verdict", "build_guard", "fit_ood_layer", "fit_text_classifier",
    "load_guard", "load_ood_layer", "load_text_classifier", "open_audit_log", "read_guard", "retrain",
    "write_guard", *SERVER,
]
