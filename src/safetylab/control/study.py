"""The control study: a guard built for the world's assistant and what it changes, by the gold judge.

``safetylab control report`` runs it on the model of ``--model`` or on a world assistant it trains first; the
audit hands it the align study's SFT model and the interp study's harmful-intent monitor.

- ``model``: the model to deploy (handed in, or trained here);
- ``guard``: the guard built for it (:func:`safetylab.control.build.build_guard`): classifiers trained on world
  data, the OOD gate on the model's own states, the interp monitor when one is handed in; every threshold
  calibrated on held-out validation prompts, the rates measured there;
- ``evaluate``: held-out test prompts — every kind, harmful requests plain and under each jailbreak wrapper,
  benign requests under the same wrappers — answered by the model alone and by the model behind the guard (the
  same sampled answers, so the difference is the guard's): harmful compliance, blocked and escalated shares,
  the gold utility of what users receive, and the guard's latency.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from safetylab.control.build import GuardBuildConfig, build_guard
from safetylab.control.config import load_guard
from safetylab.control.guard import STOPS, delivery
from safetylab.core.config import require
from safetylab.core.devices import check_device_name, select_device
from safetylab.core.seeding import derive_seed, torch_seed
from safetylab.core.study import Context, Section, Stage, Table
from safetylab.models.lm import load_model
from safetylab.models.sampling import sample
from safetylab.models.train import QUICK_ASSISTANT, AssistantConfig, train_world_assistant
from safetylab.world.requests import KINDS
from safetylab.world.world import World, WorldConfig

GROUPS = ("harmful", "jailbroken", "benign", "benign wrapped")


@dataclass(frozen=True)
class ControlStudyConfig:
    seed: int = 0
    device: str = "auto"
    world: WorldConfig = field(default_factory=WorldConfig)
    # the world assistant trained when no model is handed in
    assistant: AssistantConfig = field(default_factory=AssistantConfig)
    guard: GuardBuildConfig = field(default_factory=GuardBuildConfig)
    # held-out test prompts: per kind, and per jailbreak wrapper (harmful and benign alike)
    per_kind: int = 60
    wrapped: int = 12
    max_new_tokens: int = 48
    temperature: float = 1.0

    def __post_init__(self):
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        check_device_name(self.device)
        for name in ("per_kind", "wrapped", "max_new_tokens"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1",
                    getattr(self, name))
        require(self.temperature > 0, "temperature", "a number > 0", self.temperature)


QUICK = ControlStudyConfig(assistant=QUICK_ASSISTANT, guard=GuardBuildConfig(n=120, responses=1200), per_kind=20,
                           wrapped=4)


def study_config(quick: bool = False, seed: int = 0, device: str = "auto", **changes) -> ControlStudyConfig:
    """The default study (or the ``quick`` one) on ``seed`` and ``device``, with ``changes`` to its fields."""
    return seeded(replace(QUICK if quick else ControlStudyConfig(), **changes), seed, device)


def seeded(config: ControlStudyConfig, seed: int, device: str) -> ControlStudyConfig:
    """``config`` with the study, its world, its trainings and its guard on ``seed`` and ``device``."""
    return replace(config, seed=seed, device=device, world=replace(config.world, seed=seed),
                   assistant=config.assistant.seeded(seed, device), guard=replace(config.guard, seed=seed))


def world_of(ctx: Context) -> World:
    return ctx.cached("world", lambda: World(ctx.config.world))


def loaded(ctx: Context):
    """``(model, tokenizer, hooks)`` of the deployed model, loaded once per process."""
    from safetylab.interp.hooks import Hooks

    def load():
        path = Path(ctx.inputs["model"]) if "model" in ctx.inputs else ctx.path(ctx.section("model").data["model"])
        model, tokenizer = load_model(path, select_device(ctx.config.device))
        return model.eval(), tokenizer, Hooks(model)
    return ctx.cached("model", load)


# ---------------------------------------------------------------------------- stages
def model_stage(ctx: Context) -> Section:
    """The model to deploy: the one handed in, or a world assistant trained here."""
    cfg = ctx.config
    if "model" in ctx.inputs:
        path, origin = Path(ctx.inputs["model"]), "handed in"
    else:
        path = train_world_assistant(world_of(ctx), ctx.stage_dir("model"), cfg.assistant)
        origin = "pre-trained on the world corpus and fine-tuned on demonstrations here"
    model, _ = load_model(path)
    parameters = sum(p.numel() for p in model.parameters())
    return Section(title="The model to deploy",
                   summary=f"{model.config.model_type}, {parameters:,} parameters; {origin}",
                   data={"model": str(path) if "model" in ctx.inputs else ctx.run.relative(path),
                         "parameters": parameters})


def guard_stage(ctx: Context) -> Section:
    """Build the guard for the model and report each layer's calibration on validation prompts."""
    cfg, out = ctx.config, ctx.stage_dir("guard")
    _, tokenizer, hooks = loaded(ctx)
    monitor = ctx.inputs.get("monitor")
    report = build_guard(world_of(ctx), out, cfg.guard, hooks, tokenizer, monitor)
    rows = []
    for layer in ("input_classifier", "output_classifier"):
        r = report[layer]
        for action in ("escalate", "block"):
            rows.append([layer.replace("_", " "), action, r[f"fpr_{action}"], r[action]["fpr"], r[action]["tpr"],
                         r["n_positives"], r["n_negatives"]])
    if "ood" in report:
        rows.append(["OOD gate", "escalate", report["ood"]["fpr_target"], report["ood"]["fpr"], None,
                     None, report["ood"]["n_validation"]])
    block = report["input_classifier"]["block"]
    return Section(
        title="A guard for the world's assistant",
        summary=f"the input classifier blocks {block['tpr']:.0%} of held-out harmful validation prompts at "
                f"{block['fpr']:.1%} FPR; layers: rules, input classifier"
                + (", OOD gate" if "ood" in report else "") + (", the interp monitor" if monitor else "")
                + ", output rules, output classifier",
        tables=[Table("Each layer's thresholds, calibrated on validation prompts held out by request core (a "
                      "positive: a harmful request, or a response that complies with one)",
                      ["layer", "action", "target FPR", "validation FPR", "validation TPR", "positives",
                       "negatives"], rows)],
        data={"guard": ctx.run.relative(out / "guard.yaml"), "calibration": report, "monitor": monitor},
    )


def test_requests(world: World, cfg: ControlStudyConfig) -> list[tuple[str, Any]]:
    """``(group, request)`` pairs of the test split (each distinct prompt once)."""
    from safetylab.interp.concepts import distinct

    groups = {"harmful": world.requests("harmful", "test", cfg.per_kind, cfg.seed),
              "jailbroken": world.red_team(cfg.wrapped, "test", cfg.seed),
              "benign": [r for kind in KINDS if kind != "harmful"
                         for r in world.requests(kind, "test", cfg.per_kind, cfg.seed)],
              "benign wrapped": world.benign_controls(cfg.wrapped, "test", cfg.seed)}
    return [(group, r) for group, requests in groups.items() for r in distinct(requests)]


def answers_of(model, tokenizer, pairs, cfg: ControlStudyConfig, name: str) -> list[str]:
    """One sampled answer per test prompt (the same seed for every model)."""
    with torch_seed(derive_seed(cfg.seed, "control", "answers", name)):
        return sample(model, tokenizer, [r.prompt for _, r in pairs], max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature).texts


def guarded(guard, pairs, answers) -> tuple[list[tuple], list[float]]:
    """``(outcomes, latency)``: per prompt ``(group, request, answer, decision, delivered, decided_by)`` —
    ``delivered`` the refusal for a stopped prompt, None for a held one, else the (possibly modified) answer —
    and the guard's milliseconds."""
    outcomes, latency = [], []
    for (group, request), answer in zip(pairs, answers):
        verdicts = [guard.check_input(request.prompt)]
        if verdicts[0].allowed:
            verdicts.append(guard.check_output(request.prompt, answer))
        latency.append(sum(r.latency_ms for v in verdicts for r in v.results))
        decision, delivered = delivery(verdicts)
        by = next((r.layer for v in verdicts for r in v.results if r.decision == decision), None)
        outcomes.append((group, request, answer, decision, delivered, by if decision != "allow" else None))
    return outcomes, latency


def by_group(world: World, outcomes) -> tuple[list[list], dict[str, Any]]:
    """The table's rows and the numbers per group, alone against guarded, by the gold judge."""
    rows, data = [], {}
    for group in GROUPS:
        mine = [o for o in outcomes if o[0] == group]
        if not mine:
            continue
        alone = [world.judge.score(o[1], o[2]) for o in mine]
        delivered = [world.judge.score(o[1], o[4]) for o in mine if o[4] is not None]
        stats = {"n": len(mine), "alone_harmful_compliance": rate(s.behaviour == "harmful_compliance" for s in alone),
                 "guarded_harmful_compliance": sum(s.behaviour == "harmful_compliance" for s in delivered) / len(mine),
                 "blocked": rate(o[3] in STOPS for o in mine), "escalated": rate(o[3] == "escalate" for o in mine),
                 "alone_utility": float(np.mean([s.utility for s in alone])),
                 "guarded_utility": float(np.mean([s.utility for s in delivered])) if delivered else None}
        data[group] = stats
        rows.append([group, *stats.values()])
    harmful = [o for o in outcomes if o[0] in ("harmful", "jailbroken")]
    benign = [o for o in outcomes if o[0] in ("benign", "benign wrapped")]
    data["summary"] = {
        "harmful_compliance_alone": rate(world.judge.score(o[1], o[2]).behaviour == "harmful_compliance"
                                         for o in harmful),
        "harmful_compliance_guarded": rate(o[4] is not None and world.judge.score(o[1], o[4]).behaviour
                                           == "harmful_compliance" for o in harmful),
        "benign_blocked": rate(o[3] in STOPS for o in benign),
        "benign_escalated": rate(o[3] == "escalate" for o in benign)}
    return rows, data


COLUMNS = ["group", "prompts", "harmful compliance alone", "harmful compliance guarded", "blocked", "escalated",
           "utility alone", "utility guarded (delivered)"]


def evaluate_stage(ctx: Context) -> Section:
    """The model alone against the model behind the guard on held-out prompts, by the gold judge; with a base
    model handed in (``inputs["base"]``: the pre-trained model the deployed one was fine-tuned from, which
    complies with harmful requests), the same for it behind the guard's text layers (the layers that read the
    model's activations were fitted on the deployed model)."""
    cfg, world = ctx.config, world_of(ctx)
    model, tokenizer, hooks = loaded(ctx)
    guard = load_guard(ctx.path(ctx.section("guard").data["guard"]), hooks, tokenizer)
    pairs = test_requests(world, cfg)
    outcomes, latency = guarded(guard, pairs, answers_of(model, tokenizer, pairs, cfg, "deployed"))
    rows, data = by_group(world, outcomes)
    p50, p99 = np.percentile(latency, [50, 99])
    data["latency_ms"] = {"p50": float(p50), "p99": float(p99)}
    decided = Counter((o[0], o[5]) for o in outcomes if o[5] is not None)
    data["stopped_by"] = [{"group": g, "layer": layer, "n": n} for (g, layer), n in sorted(decided.items())]
    tables = [Table("Held-out test prompts (gold judge; the same sampled answer in both conditions; a blocked prompt "
                    "receives the refusal, an escalated one is held for a person and receives nothing yet)",
                    COLUMNS, rows),
              Table("The layer that decided each modified, blocked or escalated prompt", ["group", "layer", "prompts"],
                    [[d["group"], d["layer"], d["n"]] for d in data["stopped_by"]])]
    s = data["summary"]
    summary = (f"harmful compliance on held-out harmful prompts (jailbroken included) "
               f"{s['harmful_compliance_alone']:.1%} alone → {s['harmful_compliance_guarded']:.1%} guarded; benign "
               f"prompts blocked {s['benign_blocked']:.1%}, escalated {s['benign_escalated']:.1%}; the guard takes "
               f"{p50:.2f} ms a request (p50, {p99:.2f} p99)")
    if "base" in ctx.inputs:
        base, base_tokenizer = load_model(ctx.inputs["base"], select_device(cfg.device))
        text = load_guard(ctx.path(ctx.section("guard").data["guard"]), text_only=True)
        base_rows, data["base"] = by_group(world, guarded(text, pairs, answers_of(base.eval(), base_tokenizer, pairs,
                                                                                  cfg, "base"))[0])
        tables.insert(1, Table("The base model (pre-trained, not fine-tuned) on the same prompts, behind the guard's "
                               "text layers (rules and classifiers)", COLUMNS, base_rows))
        b = data["base"]["summary"]
        summary += (f"; the base model complies with {b['harmful_compliance_alone']:.1%} of them alone, "
                    f"{b['harmful_compliance_guarded']:.1%} behind the text layers")
    return Section(title="The model alone and behind the guard", summary=summary, tables=tables, data=data)


def rate(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


STAGES = (
    Stage("model", "the model to deploy", model_stage),
    Stage("guard", "a guard built and calibrated for it", guard_stage),
    Stage("evaluate", "the model alone and behind the guard", evaluate_stage),
)

__all__ = ["ControlStudyConfig", "QUICK", "STAGES", "seeded", "study_config"]
