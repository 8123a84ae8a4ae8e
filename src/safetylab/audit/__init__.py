"""The audit: the main job, every subsystem's study under one seed, ending in a safety-case report."""

from safetylab.audit.run import run_audit
from safetylab.audit.stages import STUDIES, AuditConfig, StudyPart, audit_config, with_seed

__all__ = ["STUDIES", "AuditConfig", "StudyPart", "audit_config", "run_audit", "with_seed"]
