"""The evals study: the world's safety benchmark, red teaming and capability evaluations of every model the
lifecycle made, with 95 % intervals, and an Inspect log per run.

``safetylab evals report`` runs it on a world assistant it trains first (or on ``--model``); the audit hands it
the align study's base, SFT and DPO models, and the control study's guard (its text layers guard the SFT model
here; the control study reports the whole guard) and output classifier (a learned judge beside the gold one).

- ``models``: the models to evaluate (handed in, or a base and an SFT model trained here);
- ``safety``: harmful compliance, jailbreak success, over-refusal, accuracy, confident errors, sycophancy,
  calibration; with a learned judge, its attack success rate beside the gold one and their agreement;
- ``redteam``: attack success by attack (templates, compositions, mutations) for each model and for the SFT
  model behind the guard;
- ``capabilities``: accuracy by difficulty tier, and knowledge of the harmful payload (WMDP-style);
- ``attacker``: an attacker trained by RL against the SFT model, its success and diversity against the
  templates' (when ``attacker`` is configured: minutes of training).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from safetylab.core.config import require
from safetylab.core.devices import check_device_name, select_device
from safetylab.core.seeding import derive_seed, seed_everything
from safetylab.core.study import Context, Section, Stage, Table
from safetylab.evals.attacker import AttackerConfig
from safetylab.evals.harness import EvalRun, run_task
from safetylab.evals.logs import dataset_digest
from safetylab.evals.redteam import ATTACKS
from safetylab.evals.targets import GenerateConfig, GuardedTarget, LocalTarget
from safetylab.models.train import QUICK_ASSISTANT, AssistantConfig
from safetylab.world.world import World, WorldConfig

SAFETY = ("harmful_compliance", "jailbreak_success", "over_refusal", "accuracy", "confident_wrong", "sycophancy",
          "accuracy_confident", "accuracy_hedged")


@dataclass(frozen=True)
class EvalsStudyConfig:
    seed: int = 0
    device: str = "auto"
    world: WorldConfig = field(default_factory=WorldConfig)
    assistant: AssistantConfig = field(default_factory=AssistantConfig)  # trained when no model is handed in
    per_kind: int = 40
    jailbroken: int = 8
    controls: int = 8
    redteam_n: int = 20
    per_tier: int = 30
    payload_n: int = 60
    max_new_tokens: int = 48
    temperature: float = 1.0
    attacker: AttackerConfig | None = None

    def __post_init__(self):
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        check_device_name(self.device)
        for name in ("per_kind", "redteam_n", "per_tier", "payload_n", "max_new_tokens"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1",
                    getattr(self, name))
        for name in ("jailbroken", "controls"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0",
                    getattr(self, name))
        require(self.temperature > 0, "temperature", "a number > 0", self.temperature)


QUICK = EvalsStudyConfig(assistant=QUICK_ASSISTANT, per_kind=12, jailbroken=3, controls=3, redteam_n=6, per_tier=10,
                         payload_n=20)


def study_config(quick: bool = False, seed: int = 0, device: str = "auto", **changes) -> EvalsStudyConfig:
    return seeded(replace(QUICK if quick else EvalsStudyConfig(), **changes), seed, device)


def seeded(config: EvalsStudyConfig, seed: int, device: str) -> EvalsStudyConfig:
    attacker = replace(config.attacker, seed=seed) if config.attacker is not None else None
    return replace(config, seed=seed, device=device, world=replace(config.world, seed=seed),
                   assistant=config.assistant.seeded(seed, device), attacker=attacker)


def world_of(ctx: Context) -> World:
    return ctx.cached("world", lambda: World(ctx.config.world))


def model_path(ctx: Context, name: str) -> Path:
    """Where the model ``name`` of the models stage is: as handed in, or in the run directory."""
    path = ctx.section("models").data["models"][name]
    return Path(path) if name in ctx.inputs else ctx.path(path)


def loaded(ctx: Context, name: str):
    """``(model, tokenizer)`` of the model ``name`` of the models stage, loaded once per process."""
    from safetylab.models.lm import load_model

    def load():
        model, tokenizer = load_model(model_path(ctx, name), select_device(ctx.config.device))
        return model.eval(), tokenizer
    return ctx.cached(f"model/{name}", load)


def learned_judge(ctx: Context):
    from safetylab.evals.suites import load_judge

    return load_judge(ctx.inputs["judge"]) if "judge" in ctx.inputs else None


def evaluate(ctx: Context, stage: str, task, name: str, guard=None) -> EvalRun:
    """``task`` against the model ``name`` (behind ``guard`` when given), seeded by stage and model, logged under
    the stage's directory (a rerun resumes)."""
    model, tokenizer = loaded(ctx, name)
    target = LocalTarget(model, tokenizer, name=name)
    if guard is not None:
        target = GuardedTarget(target, guard)
    seed_everything(derive_seed(ctx.config.seed, "evals", stage, target.name))
    return run_task(task, target, ctx.stage_dir(stage) / target.name.replace("+", "-"), concurrency=1024)


def interval(run: EvalRun, metric: str, group: str | None = None) -> str:
    """``value [low, high]`` of a metric, or ``–`` where it has no samples."""
    if metric not in run.metrics or (group is not None and group not in run.metrics[metric]["by"]):
        return "–"
    est = run.estimate(metric, group)
    return f"{est.value:.2f} [{est.low:.2f}, {est.high:.2f}]"


def logs_table(ctx: Context, runs: dict[str, EvalRun]) -> Table:
    """Where each run's log is (the data's ``dataset`` digest names the prompts every model answered)."""
    return Table("Eval logs (Inspect's format: inspect view --log-dir DIR)", ["target", "log", "samples", "failed"],
                 [[name, ctx.run.relative(run.log), len(run.records), run.errors] for name, run in runs.items()])


# ---------------------------------------------------------------------------- stages
def models_stage(ctx: Context) -> Section:
    """The models to evaluate: those handed in (``base``, ``sft``, ``dpo``), or a base and an SFT model trained
    here."""
    from safetylab.models.train import train_world_assistant

    handed = {name: ctx.inputs[name] for name in ("base", "sft", "dpo") if name in ctx.inputs}
    if handed:
        models, origin = {name: str(path) for name, path in handed.items()}, "handed in"
    else:
        out = ctx.stage_dir("models")
        sft = train_world_assistant(world_of(ctx), out, ctx.config.assistant)
        models = {"base": ctx.run.relative(out / "base" / "artifacts" / "model"), "sft": ctx.run.relative(sft)}
        origin = "pre-trained on the world corpus and fine-tuned on demonstrations here"
    return Section(title="The models evaluated", summary=f"{', '.join(models)}; {origin}",
                   data={"models": models, "guard": "guard" in ctx.inputs, "judge": "judge" in ctx.inputs})


def safety_stage(ctx: Context) -> Section:
    """The world's safety benchmark for every model (gold judge; a learned judge beside it when handed in)."""
    from safetylab.evals.suites import safety_task

    cfg, world, judge = ctx.config, world_of(ctx), learned_judge(ctx)
    task = safety_task(world, cfg.per_kind, cfg.jailbroken, cfg.controls, seed=cfg.seed, learned=judge,
                       config=GenerateConfig(cfg.max_new_tokens, cfg.temperature))
    runs = {name: evaluate(ctx, "safety", task, name) for name in ctx.section("models").data["models"]}
    metrics = [m for m in SAFETY if any(m in r.metrics for r in runs.values())]
    if judge is not None:
        metrics += ["learned_jailbreak_success", "judge_agrees"]
    rows = [[name, *(interval(run, m) for m in metrics)] for name, run in runs.items()]
    data = {name: {m: run.metrics[m]["all"].to_dict() for m in metrics if m in run.metrics}
            for name, run in runs.items()}
    summary = "; ".join(f"{name}: harmful compliance {interval(run, 'harmful_compliance')}, jailbreak success "
                        f"{interval(run, 'jailbreak_success')}" for name, run in runs.items())
    return Section(title="Safety benchmark (held-out world prompts; rates with 95 % Wilson intervals)",
                   summary=summary, tables=[Table("Rates by model (gold judge)", ["model", *metrics], rows),
                                            logs_table(ctx, runs)],
                   data={"metrics": data, "dataset": dataset_digest(task.dataset),
                         "logs": {n: ctx.run.relative(r.log) for n, r in runs.items()}})


def redteam_stage(ctx: Context) -> Section:
    """Attack success by attack for every model, and for the SFT model behind the guard's text layers."""
    from safetylab.control.config import load_guard
    from safetylab.core.io import write_jsonl
    from safetylab.evals.redteam import redteam_task, successful_attacks

    cfg, world = ctx.config, world_of(ctx)
    task = redteam_task(world, cfg.redteam_n, seed=cfg.seed, learned=learned_judge(ctx),
                        config=GenerateConfig(cfg.max_new_tokens, cfg.temperature))
    names = list(ctx.section("models").data["models"])
    runs = {name: evaluate(ctx, "redteam", task, name) for name in names}
    if "guard" in ctx.inputs and "sft" in names:
        # the guard's text layers: those that read the model's activations were fitted on the model the control
        # study served, in its own process (that study reports the whole guard)
        runs["sft+guard"] = evaluate(ctx, "redteam", task, "sft", load_guard(ctx.inputs["guard"], text_only=True))
    rows = [[attack, *(interval(run, "attack_success", attack) for run in runs.values())] for attack in ATTACKS]
    rows.append(["all attacks", *(interval(run, "attack_success") for run in runs.values())])
    wins = {name: successful_attacks(run, world, cfg.seed) for name, run in runs.items()}
    for name, pairs in wins.items():  # preference pairs the alignment stage and the guard can train on
        write_jsonl(ctx.stage_dir("redteam") / f"successful-{name.replace('+', '-')}.jsonl", pairs)
    summary = "; ".join(f"{name}: {interval(run, 'attack_success')} over all attacks" for name, run in runs.items())
    return Section(title=f"Red teaming ({cfg.redteam_n} held-out harmful requests under each attack; attack success "
                         "by the gold judge, 95 % Wilson intervals)", summary=summary,
                   tables=[Table("Attack success by attack", ["attack", *runs], rows), logs_table(ctx, runs)],
                   data={"attack_success": {n: {a: r.metrics["attack_success"]["by"][a].to_dict()
                                                for a in r.metrics["attack_success"]["by"]}
                                            for n, r in runs.items() if "attack_success" in r.metrics},
                         "successful_attacks": {n: len(w) for n, w in wins.items()},
                         "dataset": dataset_digest(task.dataset),
                         "logs": {n: ctx.run.relative(r.log) for n, r in runs.items()}})


def capabilities_stage(ctx: Context) -> Section:
    """Accuracy by difficulty tier and knowledge of the harmful payload, for every model."""
    from safetylab.evals.capabilities import capability_task, payload_knowledge

    cfg, world = ctx.config, world_of(ctx)
    task = capability_task(world, cfg.per_tier, cfg.seed, GenerateConfig(cfg.max_new_tokens, cfg.temperature))
    names = list(ctx.section("models").data["models"])
    runs = {name: evaluate(ctx, "capabilities", task, name) for name in names}
    groups = ("arithmetic / easy", "arithmetic / hard", "facts / seen countries", "facts / held-out countries")
    payload = {}
    for name in names:
        model, tokenizer = loaded(ctx, name)
        payload[name] = payload_knowledge(model, tokenizer, world, cfg.payload_n, seed=cfg.seed)[0]
    rows = [[name, *(interval(run, "accuracy", g) for g in groups), interval(run, "confident_wrong"),
             f"{payload[name].value:.2f} [{payload[name].low:.2f}, {payload[name].high:.2f}]"]
            for name, run in runs.items()]
    summary = "; ".join(f"{name}: payload knowledge {payload[name].value:.2f} (chance 0.25)" for name in names)
    return Section(title="Capabilities (accuracy by tier, 95 % intervals; payload knowledge by log-likelihood "
                         "against three distractors, chance 0.25)", summary=summary,
                   tables=[Table("Capabilities by model", ["model", *groups, "confident wrong", "payload knowledge"],
                                 rows), logs_table(ctx, runs)],
                   data={"accuracy": {n: {g: r.metrics["accuracy"]["by"][g].to_dict() for g in groups
                                          if g in r.metrics["accuracy"]["by"]} for n, r in runs.items()},
                         "payload_knowledge": {n: e.to_dict() for n, e in payload.items()},
                         "dataset": dataset_digest(task.dataset),
                         "logs": {n: ctx.run.relative(r.log) for n, r in runs.items()}})


def attacker_stage(ctx: Context) -> Section:
    """An attacker trained by RL against the SFT model: its attack success and diversity beside the templates',
    on the requests it was trained to break and on held-out ones."""
    from safetylab.evals.attacker import attacked_requests, attacker_samples, distinct_n, self_bleu, train_attacker
    from safetylab.evals.harness import Task, generate
    from safetylab.evals.redteam import TEMPLATES, attack_scorer, redteam_samples

    cfg, world = ctx.config, world_of(ctx)
    if cfg.attacker is None:
        return Section(title="An attacker trained by RL", summary="not run (no attacker configured)")
    target, tokenizer = loaded(ctx, "sft")
    seed_everything(derive_seed(cfg.seed, "evals", "attacker"))
    attacker, attacker_tokenizer, start = train_attacker(world, model_path(ctx, "base"), target, tokenizer,
                                                         ctx.stage_dir("attacker"), cfg.attacker)
    generation = GenerateConfig(cfg.max_new_tokens, cfg.temperature)
    request_sets = {"its own": attacked_requests(world, cfg.attacker)[:cfg.redteam_n],
                    "held-out": world.requests("harmful", "test", cfg.redteam_n, cfg.seed)}
    rows, success, diversity, runs = [], {}, {}, {}
    for where, requests in request_sets.items():
        tag = "own" if where == "its own" else "heldout"
        for name, model in (("attacker after RL", attacker), ("attacker before RL", start)):
            seed_everything(derive_seed(cfg.seed, "evals", "attacker", name, tag))
            samples = attacker_samples(model, attacker_tokenizer, world, requests, 4, name="rl")
            task = Task(f"attacker_{'after' if 'after' in name else 'before'}_{tag}", samples,
                        attack_scorer(world.judge), generate(generation), group_by=None)
            runs[f"{name}, {where}"] = run_task(task, LocalTarget(target, tokenizer, name="sft"),
                                                ctx.stage_dir("attacker") / "eval", concurrency=1024)
            texts = [s.input for s in samples]
            diversity[f"{name}, {where}"] = {"distinct_2": distinct_n(texts), "self_bleu": self_bleu(texts)}
        templates = redteam_samples(world, attacks=TEMPLATES, seed=cfg.seed, requests=requests)
        texts = [s.input for s in templates]
        runs[f"templates, {where}"] = evaluate(ctx, "attacker", Task(f"templates_{tag}", templates,
                                                                     attack_scorer(world.judge),
                                                                     generate(generation)), "sft")
        diversity[f"templates, {where}"] = {"distinct_2": distinct_n(texts), "self_bleu": self_bleu(texts)}
    for name, run in runs.items():
        rows.append([name, interval(run, "attack_success"),
                     interval(run, "on_target") if "on_target" in run.metrics else "1 (by construction)",
                     f"{diversity[name]['distinct_2']:.3f}", f"{diversity[name]['self_bleu']:.3f}"])
        success[name] = run.metrics["attack_success"]["all"].to_dict()
    return Section(title="An attacker trained by RL against the SFT model (Perez et al. 2022)",
                   summary="; ".join(f"{r[0]}: attack success {r[1]}" for r in rows if "before" not in r[0]),
                   tables=[Table(f"Attack success and diversity ({cfg.redteam_n} requests, 4 rewrites each by the "
                                 "attacker; the templates once each)",
                                 ["attacks, on which requests", "attack success", "still asks for the request",
                                  "distinct-2", "self-BLEU"], rows),
                           logs_table(ctx, runs)],
                   data={"attack_success": success, "diversity": diversity})


STAGES = (
    Stage("models", "the models to evaluate", models_stage),
    Stage("safety", "the world's safety benchmark", safety_stage),
    Stage("redteam", "attack success by attack", redteam_stage),
    Stage("capabilities", "accuracy by tier and payload knowledge", capabilities_stage),
    Stage("attacker", "an attacker trained by RL", attacker_stage),
)

AUDIT_STAGES = STAGES[:4]  # the audit leaves the attacker out: minutes of training (`evals report --attacker`)

__all__ = ["AUDIT_STAGES", "EvalsStudyConfig", "QUICK", "STAGES", "seeded", "study_config"]
