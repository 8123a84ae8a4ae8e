"""The audit's studies, in order: each subsystem's study (its stages and config) under one root seed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from safetylab.agents import study as agents
from safetylab.align import study as align
from safetylab.control import study as control
from safetylab.core.config import require
from safetylab.core.devices import check_device_name
from safetylab.core.study import Section, Stage
from safetylab.evals import study as evals
from safetylab.interp import study as interp
from safetylab.robust import study as robust
from safetylab.verify import study as verify


@dataclass(frozen=True)
class StudyPart:
    """A study as the audit runs it: in ``RUN/NAME`` with the config ``config_of(audit config)`` and the inputs
    ``inputs_of(sections so far, by "study/stage")``, paths relative to the audit's run directory."""

    name: str
    title: str
    stages: Sequence[Stage]
    config_of: Callable[[Any], Any]
    inputs_of: Callable[[dict[str, Section]], dict[str, str]] = lambda sections: {}


@dataclass(frozen=True)
class AuditConfig:
    seed: int = 0
    device: str = "auto"
    align: align.AlignStudyConfig = field(default_factory=align.AlignStudyConfig)
    robust: robust.RobustStudyConfig = field(default_factory=robust.RobustStudyConfig)
    # the interpretability study with one SAE kind (TopK) trained for fewer steps and one fact relation patched
    # (the full study, `safetylab interp report`, trains all three kinds and patches four relations)
    interp: interp.InterpStudyConfig = field(default_factory=lambda: interp.InterpStudyConfig(
        sae_kinds=("topk",), sae=interp.SAEConfig(batch_size=1024, steps=500), patch_relations=("capital",)))
    agents: agents.AgentsStudyConfig = field(default_factory=agents.AgentsStudyConfig)
    # the verification study with exact verification held to 1 s a digit and ε to 0.1 (about a minute; the
    # full study, `safetylab verify report`, takes 10)
    verify: verify.VerifyStudyConfig = field(default_factory=lambda: verify.VerifyStudyConfig(
        eps=(0.0, 0.02, 0.05, 0.1), exact_time_limit=1.0))
    control: control.ControlStudyConfig = field(default_factory=control.ControlStudyConfig)
    evals: evals.EvalsStudyConfig = field(default_factory=evals.EvalsStudyConfig)

    def __post_init__(self):
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        check_device_name(self.device)
        seeds = {f.name: getattr(self, f.name).seed for f in fields(self) if f.name not in ("seed", "device")}
        require(set(seeds.values()) == {self.seed}, "seed", f"the seed of every study ({seeds}): one root seed "
                "per audit; with_seed(config, seed) sets it everywhere", self.seed)


QUICK = AuditConfig(align=align.QUICK, interp=interp.QUICK, robust=robust.QUICK, agents=agents.QUICK,
                    verify=verify.QUICK, control=control.QUICK, evals=evals.QUICK)


def evals_inputs(sections: dict[str, Section]) -> dict[str, str]:
    """The models the align study made, and the guard and output classifier the control study built."""
    inputs = {"base": f"align/{sections['align/base'].data['model']}",
              "sft": f"align/{sections['align/sft'].data['model']}"}
    dpo = sections["align/policies"].data.get("models", {}).get("dpo") if "align/policies" in sections else None
    if dpo is not None:
        inputs["dpo"] = f"align/{dpo}"
    if "control/guard" in sections:
        guard = f"control/{sections['control/guard'].data['guard']}"
        inputs["guard"] = guard
        inputs["judge"] = f"{guard.rsplit('/', 1)[0]}/output-classifier"
    return inputs


STUDIES = (
    StudyPart("align", "Alignment: SFT, reward model, best-of-n, DPO and PPO against the gold judge", align.STAGES,
              lambda c: c.align),
    StudyPart("interp", "Interpretability of the SFT model: logit lens, probes, sparse autoencoders, steering, "
              "patching and monitors", interp.STAGES, lambda c: c.interp,
              lambda sections: {"model": f"align/{sections['align/sft'].data['model']}"}),
    StudyPart("robust", "Robustness of a classifier (digits)", robust.STAGES, lambda c: c.robust),
    StudyPart("agents", "Safety gridworlds", agents.STAGES, lambda c: c.agents),
    StudyPart("verify", "Verification of a classifier (digits)", verify.STAGES, lambda c: c.verify),
    StudyPart("control", "Control: the SFT model behind a guard (classifiers, OOD gate, the interp monitor)",
              control.STAGES, lambda c: c.control,
              lambda sections: {"model": f"align/{sections['align/sft'].data['model']}",
                                "base": f"align/{sections['align/base'].data['model']}",
                                **({"monitor": f"interp/{sections['interp/monitor'].data['monitor']}"}
                                   if "interp/monitor" in sections else {})}),
    StudyPart("evals", "Evaluations: the safety benchmark, red teaming and capabilities of the base, SFT and DPO "
              "models, with 95 % intervals", evals.AUDIT_STAGES, lambda c: c.evals, evals_inputs),
)


def audit_config(quick: bool = False, seed: int = 0, device: str = "auto") -> AuditConfig:
    """The default audit, or with ``quick`` the same stages at a smaller size, every study on ``seed``."""
    return with_seed(QUICK if quick else AuditConfig(), seed, device)


def with_seed(config: AuditConfig, seed: int, device: str | None = None) -> AuditConfig:
    """``config`` with every study on the root ``seed`` (and the language-model studies on ``device``, when
    given: the digits studies and the gridworlds run on the CPU)."""
    device = config.device if device is None else device
    return AuditConfig(seed=seed, device=device, align=align.seeded(config.align, seed, device),
                       interp=interp.seeded(config.interp, seed, device), robust=replace(config.robust, seed=seed),
                       agents=replace(config.agents, seed=seed), verify=replace(config.verify, seed=seed),
                       control=control.seeded(config.control, seed, device),
                       evals=evals.seeded(config.evals, seed, device))
