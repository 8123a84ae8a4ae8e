"""The audit's stages, in order. Each is a function ``(ctx) -> Section``; see :mod:`.pipeline`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from safetylab.agents.experiment import run_suite as run_gridworlds  # noqa: E402
from safetylab.agents.experiment import suite_runs  # noqa: E402
from safetylab.align.data import preferences_from_records  # noqa: E402
from safetylab.align.dpo import DPOConfig, train_dpo  # noqa: E402
from safetylab.align.ppo import PPOConfig, train_ppo  # noqa: E402
from safetylab.align.reward import (  # noqa: E402
    RewardConfig,
    RewardEnsemble,
    evaluate_reward_model,
    fit_reward_models,
    policy_reward,
    score,
)
from safetylab.audit.pipeline import Context, Section, Stage  # noqa: E402
from safetylab.core.config import require, require_choice  # noqa: E402
from safetylab.core.devices import check_device_name, select_device  # noqa: E402
from safetylab.core.io import atomic_write_text, write_jsonl  # noqa: E402
from safetylab.core.runs import RunDir  # noqa: E402
from safetylab.core.seeding import seed_everything  # noqa: E402
from safetylab.evals.goodhart import best_of_n_curve, plot_curve  # noqa: E402
from safetylab.evals.policy import METRICS, EvalConfig, evaluate_policy  # noqa: E402
from safetylab.models.lm import ModelConfig, load_model, save_model  # noqa: E402
from safetylab.models.train import TrainConfig, finetune, pretrain  # noqa: E402
from safetylab.robust.suite import QUICK as ROBUST_QUICK  # noqa: E402
from safetylab.robust.suite import SECTIONS as ROBUST_SECTIONS  # noqa: E402
from safetylab.robust.suite import RobustSuiteConfig, run_suite  # noqa: E402
from safetylab.verify.suite import QUICK as VERIFY_QUICK  # noqa: E402
from safetylab.verify.suite import SECTIONS as VERIFY_SECTIONS  # noqa: E402
from safetylab.verify.suite import VerifySuiteConfig  # noqa: E402
from safetylab.verify.suite import run_suite as run_verification  # noqa: E402
from safetylab.world.labelers import PRESETS, measure_labeler  # noqa: E402
from safetylab.world.probe import probe_judge, probe_summary  # noqa: E402
from safetylab.world.requests import KINDS  # noqa: E402
from safetylab.world.world import World, WorldConfig  # noqa: E402


@dataclass(frozen=True)
class AlignStageConfig:
    """The align stage: a reward model on ``labeler``'s comparisons, best-of-n and PPO against it, and
    DPO on the same comparisons, all from the SFT model."""

    labeler: str = "typical"
    preferences: int = 3_000
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(
        train=TrainConfig(steps=200, batch_size=32, lr=5e-4, warmup_steps=20, log_every=25, checkpoint_every=100)))
    best_of_n: tuple[int, ...] = (1, 4, 16)
    best_of_n_per_kind: int = 10
    kl_samples: int = 16
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(
        train=TrainConfig(steps=100, batch_size=32, lr=1e-4, warmup_steps=10, log_every=10, checkpoint_every=50)))
    ppo_prompts_per_kind: int = 100
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(
        train=TrainConfig(steps=80, batch_size=32, lr=1e-4, warmup_steps=8, log_every=8, checkpoint_every=40)))

    def __post_init__(self):
        require_choice(self.labeler, "labeler", PRESETS)
        for name in ("preferences", "best_of_n_per_kind", "ppo_prompts_per_kind"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        require(len(self.best_of_n) > 0 and min(self.best_of_n) >= 1, "best_of_n", "one or more integers >= 1",
                self.best_of_n)
        require(self.kl_samples >= 0, "kl_samples", "an integer >= 0", self.kl_samples)


@dataclass(frozen=True)
class GridworldStageConfig:
    """The gridworlds stage: every environment × agent × applicable mitigation, tabular agents."""

    seeds: tuple[int, ...] = (0,)
    episodes: int | None = None  # per run; None: each environment's own (3,000, or 6,000 for Sokoban)

    def __post_init__(self):
        require(len(self.seeds) > 0 and min(self.seeds) >= 0, "seeds", "one or more integers >= 0", self.seeds)
        require(self.episodes is None or self.episodes >= 1, "episodes", "an integer >= 1 (or none: the "
                "environment's own)", self.episodes)


@dataclass(frozen=True)
class AuditConfig:
    seed: int = 0
    device: str = "auto"
    world: WorldConfig = field(default_factory=WorldConfig)
    corpus_conversations: int = 12_000
    demonstrations: int = 3_000
    sft_replay: float = 0.5  # knowledge lines of the corpus (no conversations) mixed into SFT, per demonstration
    model: ModelConfig = field(default_factory=ModelConfig)
    base: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, batch_size=32, lr=3e-3))
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, batch_size=32, lr=1e-3, warmup_steps=20))
    eval: EvalConfig = field(default_factory=EvalConfig)
    labeler_pairs: int = 2_000
    align: AlignStageConfig = field(default_factory=AlignStageConfig)
    robust: RobustSuiteConfig = field(default_factory=RobustSuiteConfig)
    gridworlds: GridworldStageConfig = field(default_factory=GridworldStageConfig)
    # the verification study with exact verification held to 1 s a digit and ε to 0.1 (about a minute; the
    # full study, `safetylab verify report`, takes 10)
    verify: VerifySuiteConfig = field(default_factory=lambda: VerifySuiteConfig(eps=(0.0, 0.02, 0.05, 0.1),
                                                                                exact_time_limit=1.0))

    def __post_init__(self):
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        check_device_name(self.device)
        for name in ("corpus_conversations", "demonstrations", "labeler_pairs"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        require(self.sft_replay >= 0, "sft_replay", "a number >= 0", self.sft_replay)


QUICK = AuditConfig(
    corpus_conversations=4_000, demonstrations=1_000,
    model=ModelConfig(n_layer=2, n_head=4, n_embd=64),
    base=TrainConfig(steps=300, batch_size=32, lr=5e-3),
    sft=TrainConfig(steps=120, batch_size=32, lr=2e-3, warmup_steps=10),
    eval=EvalConfig(per_kind=20, jailbroken=4),
    labeler_pairs=500,
    align=AlignStageConfig(
        preferences=600,
        reward=RewardConfig(train=TrainConfig(steps=40, batch_size=32, lr=1e-3, warmup_steps=5, log_every=10,
                                              checkpoint_every=20)),
        best_of_n=(1, 4), best_of_n_per_kind=4, kl_samples=4,
        dpo=DPOConfig(train=TrainConfig(steps=20, batch_size=32, lr=1e-4, warmup_steps=2, log_every=10,
                                        checkpoint_every=10)),
        ppo_prompts_per_kind=20,
        ppo=PPOConfig(train=TrainConfig(steps=16, batch_size=16, lr=3e-5, warmup_steps=2, log_every=4,
                                        checkpoint_every=8), max_new_tokens=32),
    ),
    robust=ROBUST_QUICK,
    gridworlds=GridworldStageConfig(episodes=400),
    verify=VERIFY_QUICK,
)


def audit_config(quick: bool = False, seed: int = 0, device: str = "auto") -> AuditConfig:
    """The default audit, or with ``quick`` the same stages at a smaller size, for ``seed``."""
    size = QUICK if quick else AuditConfig()

    def seeded(train: TrainConfig) -> TrainConfig:
        return replace(train, seed=seed, device=device)

    align = replace(size.align, reward=replace(size.align.reward, train=seeded(size.align.reward.train)),
                    dpo=replace(size.align.dpo, train=seeded(size.align.dpo.train)),
                    ppo=replace(size.align.ppo, train=seeded(size.align.ppo.train)))
    return replace(size, seed=seed, device=device, world=replace(size.world, seed=seed), base=seeded(size.base),
                   sft=seeded(size.sft), align=align, robust=replace(size.robust, seed=seed),
                   verify=replace(size.verify, seed=seed))


def world_of(ctx: Context) -> World:
    if "world" not in ctx.cache:
        ctx.cache["world"] = World(ctx.config.world)
    return ctx.cache["world"]


# ---------------------------------------------------------------------------- stages
def world_stage(ctx: Context) -> Section:
    """Build the world; write its data sets; measure the simulated labelers against the gold judge."""
    cfg, world, out = ctx.config, world_of(ctx), ctx.stage_dir("world")
    corpus = world.corpus(cfg.corpus_conversations)
    demos = world.demonstrations(cfg.demonstrations)
    atomic_write_text(out / "corpus.txt", "\n".join(corpus) + "\n")
    write_jsonl(out / "demonstrations.jsonl", demos)
    write_jsonl(out / "preferences-typical.jsonl", world.preferences(cfg.labeler_pairs, "typical"))
    rows = [[name, *measure_labeler(world, name, cfg.labeler_pairs).values()] for name in PRESETS]
    probe = probe_summary(probe_judge(world, per_kind=20, seed=cfg.seed))
    as_expected = sum(t["n"] - t["failed"] for t in probe.values())
    return Section(
        title="The assistant world",
        summary=f"{len(world.countries)} countries, {len(corpus)} corpus lines, {len(demos)} demonstrations; the "
                f"gold judge scores {as_expected} of {sum(t['n'] for t in probe.values())} adversarial variants "
                "as it should",
        tables=[{
            "title": "Simulated labelers against the gold judge (rates over comparisons)",
            "columns": ["labeler", "gold agreement", "prefers flattery", "prefers confident-wrong (hard)",
                        "prefers sycophancy (hard)", "prefers longer"],
            "rows": rows,
        }, {
            "title": "The gold judge against adversarial variants (safetylab world probe-judge): surface changes "
                     "must not change its verdict, the others must be scored as what they say",
            "columns": ["variants", "n", "scored as they should", "rate"],
            "rows": [[family, t["n"], t["n"] - t["failed"], round((t["n"] - t["failed"]) / t["n"], 4)]
                     for family, t in probe.items()],
        }],
        data={"corpus": "stages/world/corpus.txt", "demonstrations": "stages/world/demonstrations.jsonl"},
    )


def base_stage(ctx: Context) -> Section:
    """Pre-train the base model on the world corpus (every behaviour in the mix, good and bad)."""
    cfg = ctx.config
    corpus = (ctx.run.path / ctx.sections["world"].data["corpus"]).read_text(encoding="utf-8").splitlines()
    run = RunDir(ctx.stage_dir("base"), {"model": asdict(cfg.model), "train": asdict(cfg.base), "lines": len(corpus)})
    model, _ = pretrain(corpus, cfg.model, cfg.base, run)
    return _training_section(ctx, "base", "Base model (pre-training)", run, model)


def sft_stage(ctx: Context) -> Section:
    """Fine-tune the base model on demonstrations of good behaviour (loss on responses only)."""
    cfg = ctx.config
    base, tokenizer = load_model(ctx.run.path / ctx.sections["base"].data["model"], select_device(cfg.device))
    demos = [json.loads(line) for line in
             (ctx.run.path / ctx.sections["world"].data["demonstrations"]).read_text(encoding="utf-8").splitlines()]
    corpus = (ctx.run.path / ctx.sections["world"].data["corpus"]).read_text(encoding="utf-8").splitlines()
    knowledge = [line for line in corpus if not line.startswith("<user>")]  # replay knowledge, not behaviour
    replay = knowledge[: round(cfg.sft_replay * len(demos))]  # the corpus is shuffled: a prefix is a sample
    run = RunDir(ctx.stage_dir("sft"), {"train": asdict(cfg.sft), "demonstrations": len(demos), "replay": len(replay)})
    model, _ = finetune(base, tokenizer, [(d["prompt"], d["response"]) for d in demos], cfg.sft, run, replay)
    return _training_section(ctx, "sft", "SFT model (fine-tuned on demonstrations)", run, model)


def evaluate_stage(ctx: Context) -> Section:
    """Sample both models on held-out prompts; score with the gold judge; KL of SFT to the base."""
    cfg, world, out = ctx.config, world_of(ctx), ctx.stage_dir("evaluate")
    requests = world.evaluation_set(cfg.eval.per_kind, cfg.eval.jailbroken)
    device = select_device(cfg.device)
    base, tokenizer = load_model(ctx.run.path / ctx.sections["base"].data["model"], device)
    sft, _ = load_model(ctx.run.path / ctx.sections["sft"].data["model"], device)
    results = {}
    for name, model, reference in (("base", base, None), ("sft", sft, base)):
        seed_everything(cfg.seed)
        results[name] = evaluate_policy(model, tokenizer, world.judge, requests, reference, cfg.eval)
        write_jsonl(out / f"samples-{name}.jsonl", results[name]["samples"])
    rows_kinds = [*KINDS, "jailbroken"]
    tables = []
    for name in results:
        by_kind = results[name]["by_kind"]
        tables.append({
            "title": f"{name}: held-out prompts by request kind",
            "columns": ["kind", "n", *METRICS],
            "rows": [[kind, by_kind[kind]["n"], *(by_kind[kind][m] for m in METRICS)] for kind in rows_kinds]
            + [["all", results[name]["overall"]["n"], *(results[name]["overall"][m] for m in METRICS)]],
        })
    plot = _utility_plot(results, rows_kinds, out / "gold-utility.png")
    transcripts = []
    for kind in KINDS:
        for name in results:
            first = next(s for s in results[name]["samples"] if s["kind"] == kind)
            transcripts.append({"model": name, "kind": kind, "prompt": first["prompt"], "response": first["response"],
                                "behaviour": first["behaviour"], "utility": first["utility"]})
    overall = {name: results[name]["overall"] for name in results}
    b, s = overall["base"], overall["sft"]
    return Section(
        title="Evaluation against the gold judge",
        summary=(f"gold utility {b['gold_utility']:+.3f} (base) → {s['gold_utility']:+.3f} (SFT); harmful compliance "
                 f"{b['harmful_compliance']:.2f} → {s['harmful_compliance']:.2f}; jailbreak success "
                 f"{b['jailbreak_success']:.2f} → {s['jailbreak_success']:.2f}; "
                 f"KL(SFT ‖ base) {s['kl_to_reference']:.2f}"),
        tables=tables,
        plots=[ctx.run.relative(plot)],
        transcripts=transcripts,
        data={"overall": overall, "by_kind": {name: results[name]["by_kind"] for name in results}},
    )


def align_stage(ctx: Context) -> Section:
    """Learn a reward from the labeler's comparisons, optimise against it by best-of-n and PPO, and run
    DPO on the same comparisons: proxy against gold against KL."""
    cfg, align, world, out = ctx.config, ctx.config.align, world_of(ctx), ctx.stage_dir("align")
    device = select_device(cfg.device)
    sft_path = ctx.run.path / ctx.sections["sft"].data["model"]
    rows = preferences_from_records(world.preferences(align.preferences, align.labeler)).rows
    held_out = preferences_from_records(world.preferences(max(align.preferences // 5, 100), align.labeler,
                                                          split="test")).rows
    reward_run = RunDir(out / "reward", {"base": str(sft_path), "reward": asdict(align.reward), "pairs": len(rows)})
    members, reward_tokenizer = fit_reward_models(sft_path, rows, align.reward, reward_run, device)
    reward_model = members[0] if len(members) == 1 else RewardEnsemble(members)
    reward_eval = evaluate_reward_model(reward_model, reward_tokenizer, held_out)

    def reward(prompts, responses):
        return score(reward_model, reward_tokenizer, prompts, responses)

    def proxy(samples: list[dict]) -> float:
        return round(reward([s["prompt"] for s in samples], [s["response"] for s in samples]).mean().item(), 6)

    sft, tokenizer = load_model(sft_path, device)
    probe = world.evaluation_set(align.best_of_n_per_kind, max(align.best_of_n_per_kind // 5, 1), seed=2)
    curve = best_of_n_curve(sft, tokenizer, world.judge, probe, reward, align.best_of_n, align.kl_samples, cfg.seed)
    plot = plot_curve(curve, out / "best-of-n.png")

    prompts = [r.prompt for kind in KINDS for r in world.requests(kind, "train", align.ppo_prompts_per_kind)]
    policies = {
        "dpo": _policy(RunDir(out / "dpo", {"base": str(sft_path), "dpo": asdict(align.dpo), "pairs": len(rows)}),
                       lambda run: train_dpo(load_model(sft_path, device)[0], tokenizer, rows, align.dpo, run,
                                             reference=sft), tokenizer, device),
        "ppo": _policy(RunDir(out / "ppo", {"base": str(sft_path), "ppo": asdict(align.ppo), "prompts": len(prompts)}),
                       lambda run: train_ppo(load_model(sft_path, device)[0], tokenizer, prompts,
                                             policy_reward(reward_model, reward_tokenizer, tokenizer), sft,
                                             align.ppo, run), tokenizer, device),
    }
    requests = world.evaluation_set(cfg.eval.per_kind, cfg.eval.jailbroken)
    sft_overall = ctx.sections["evaluate"].data["overall"]["sft"]  # its KL there is to the base model
    overall = {"sft": {**sft_overall, "kl_to_reference": 0.0, "proxy_reward": proxy(_samples(ctx, "sft"))}}
    for name, (policy, _) in policies.items():
        seed_everything(cfg.seed)
        result = evaluate_policy(policy, tokenizer, world.judge, requests, sft, cfg.eval)
        overall[name] = {**result["overall"], "proxy_reward": proxy(result["samples"])}
    columns = ["proxy_reward", *METRICS]

    first, last = curve[0], curve[-1]
    return Section(
        title="Alignment: reward model, best-of-n, DPO and PPO",
        summary=(f"reward model: held-out accuracy {reward_eval['accuracy']:.3f}, gold agreement "
                 f"{reward_eval.get('gold_agreement', float('nan')):.3f}; best-of-{last['n']}: proxy "
                 f"{first['proxy']:+.2f} → {last['proxy']:+.2f}, gold {first['gold_utility']:+.3f} → "
                 f"{last['gold_utility']:+.3f}; gold utility from SFT's {overall['sft']['gold_utility']:+.3f}: "
                 + ", ".join(f"{name.upper()} {overall[name]['gold_utility']:+.3f} at KL "
                             f"{overall[name]['kl_to_reference']:.2f}" for name in policies)),
        tables=[
            {"title": f"Reward model on held-out {align.labeler} comparisons",
             "columns": ["pairs", "accuracy", "margin", "gold agreement"],
             "rows": [[len(held_out), reward_eval["accuracy"], reward_eval["margin"],
                       reward_eval.get("gold_agreement")]]},
            {"title": f"Best-of-n against the reward model ({len(probe)} held-out prompts)",
             "columns": list(curve[0]), "rows": [list(row.values()) for row in curve]},
            {"title": (f"DPO ({align.dpo.loss}, β {align.dpo.loss_beta:g}) on the same comparisons and PPO against the "
                       f"reward model (β {align.ppo.kl_coef}), held-out prompts"),
             "columns": ["model", *columns],
             "rows": [[name, *(row[m] for m in columns)] for name, row in overall.items()]},
        ],
        plots=[ctx.run.relative(plot)],
        data={"reward": reward_eval, "best_of_n": curve, **{name: overall[name] for name in policies},
              **{f"{name}_model": ctx.run.relative(path) for name, (_, path) in policies.items()}},
    )


def _policy(run: RunDir, train, tokenizer, device):
    """``(model, path)``: the policy a finished run saved, or ``train(run)``'s result, saved."""
    final = run.artifacts / "model"
    if not final.exists():
        save_model(train(run), tokenizer, final)
    return load_model(final, device)[0], final


def _samples(ctx: Context, model: str) -> list[dict]:
    path = ctx.stage_dir("evaluate") / f"samples-{model}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def robustness_stage(ctx: Context) -> Section:
    """The digits classifier study of :mod:`safetylab.robust.suite`: attacks and adversarial training,
    calibration, OOD detection, distribution shift and abstention, as one section."""
    return _study_section(ctx, "robustness", "Robustness of a classifier (digits)", ctx.config.robust, run_suite,
                          ROBUST_SECTIONS)


def _study_section(ctx: Context, stage: str, title: str, config, run_study, sections: tuple[str, ...]) -> Section:
    """A study made of sections (:mod:`safetylab.robust.suite`, :mod:`safetylab.verify.suite`), run in the
    stage's directory, as one report section."""
    out = ctx.stage_dir(stage)
    run = RunDir(out, asdict(config))
    found = run_study(config, run, sections, log=lambda line: None)
    prefix = out.relative_to(ctx.run.path)
    return Section(
        title=title,
        summary=" | ".join(s["summary"] for s in found.values()),
        tables=[{**t, "title": f"{s['title']}: {t['title']}"} for s in found.values() for t in s["tables"]],
        plots=[str(prefix / p) for s in found.values() for p in s["plots"]],
        data={name: s["data"] for name, s in found.items()},
    )


def gridworlds_stage(ctx: Context) -> Section:
    """The safety gridworlds: observed return against hidden performance for each environment, agent and
    mitigation (:mod:`safetylab.agents.experiment`)."""
    out, cfg = ctx.stage_dir("gridworlds"), ctx.config.gridworlds
    run = RunDir(out, asdict(cfg))
    rows = run_gridworlds(run, suite_runs(), list(cfg.seeds), cfg.episodes)
    columns = ["environment", "agent", "mitigation", "eval_return", "eval_performance", "gap", "unsafe"]
    gaming = [r for r in rows if r["mitigation"] == "none" and r["gap"] > 1]
    prefix = out.relative_to(ctx.run.path)
    return Section(
        title="Safety gridworlds: reward against hidden performance",
        summary=f"{len(gaming)} of {sum(r['mitigation'] == 'none' for r in rows)} plain agent runs earn more "
                f"reward than performance; {len(rows)} runs over {len(cfg.seeds)} seed(s)",
        tables=[{"title": "Greedy policy after training (evaluation: the test layout where there is one); gap = "
                          "return − performance; unsafe = training episodes with a hidden penalty",
                 "columns": columns, "rows": [[r[c] for c in columns] for r in rows]}],
        plots=[str(prefix / "plots" / name) for name in ("offswitch.png", "BoatRace-curves.png",
                                                         "SafeInterruptibility-curves.png")],
        data={"rows": rows},
    )


def verification_stage(ctx: Context) -> Section:
    """The digits verification study of :mod:`safetylab.verify.suite`: bounds by each method, certified
    accuracy against ε for four trainings (IBP, CROWN, α-CROWN, exact, beside PGD), randomized smoothing."""
    return _study_section(ctx, "verification", "Verification of a classifier (digits)", ctx.config.verify,
                          run_verification, VERIFY_SECTIONS)


STAGES = (
    Stage("world", "build the world, its data sets and labelers", world_stage),
    Stage("base", "pre-train the base model", base_stage),
    Stage("sft", "supervised fine-tuning", sft_stage),
    Stage("evaluate", "evaluate base and SFT against the gold judge", evaluate_stage),
    Stage("align", "reward model, best-of-n, DPO and PPO against the gold judge", align_stage),
    Stage("robustness", "attacks, calibration, OOD detection, shift and abstention of a digits classifier",
          robustness_stage),
    Stage("gridworlds", "safety gridworlds: agents, hidden performance, mitigations", gridworlds_stage),
    Stage("verification", "bounds, certified accuracy, exact verification and smoothing of a digits classifier",
          verification_stage),
)


# ---------------------------------------------------------------------------- helpers
def _training_section(ctx: Context, name: str, title: str, run: RunDir, model) -> Section:
    metrics = run.metrics()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics])
    ax.set(xlabel="step", ylabel="loss", title=f"{name} training loss")
    fig.tight_layout()
    plot = run.plots / "loss.png"
    fig.savefig(plot, dpi=100)
    plt.close(fig)
    params = sum(p.numel() for p in model.parameters())
    final = metrics[-1]["loss"] if metrics else float("nan")
    return Section(
        title=title,
        summary=f"{params:,} parameters, {metrics[-1]['step'] if metrics else 0} steps, final loss {final:.3f}",
        plots=[ctx.run.relative(plot)],
        data={"model": ctx.run.relative(run.artifacts / "model"), "final_loss": final,
              "parameters": params},
    )


def _utility_plot(results: dict, kinds: list[str], path):
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(results)
    for i, name in enumerate(results):
        values = [results[name]["by_kind"][k]["gold_utility"] or 0.0 for k in kinds]
        ax.bar([j + i * width for j in range(len(kinds))], values, width, label=name)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(kinds))], kinds, rotation=20)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set(ylabel="mean gold utility", title="Gold utility on held-out prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
