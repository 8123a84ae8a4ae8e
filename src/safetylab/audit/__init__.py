"""The audit: the main job, a pipeline of stages that ends in a safety-case report."""

from safetylab.audit.pipeline import Context, Section, Stage, run_pipeline
from safetylab.audit.run import run_audit
from safetylab.audit.stages import STAGES, AuditConfig, audit_config

__all__ = ["STAGES", "AuditConfig", "Context", "Section", "Stage", "audit_config", "run_audit", "run_pipeline"]
