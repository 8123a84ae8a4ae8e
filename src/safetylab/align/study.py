"""The alignment study on the assistant world: SFT → reward model → best-of-n, DPO and RL, against the
gold judge.

Stages (``safetylab align report`` runs them; the audit composes them):

- ``world``: the world's data sets; the simulated labelers and the gold judge measured;
- ``base``: pre-training on the world corpus (every behaviour in the mix, good and bad);
- ``sft``: fine-tuning on demonstrations of good behaviour (optionally a contractor's, with habits);
- ``evaluate``: base and SFT on held-out prompts against the gold judge;
- ``reward``: a Bradley–Terry reward model on the labeler's comparisons of written styles and, with
  ``on_policy_per_kind``, of the SFT model's own samples (InstructGPT's on-policy comparisons);
- ``best-of-n``: proxy reward against gold utility as n grows (Goodhart's law, measured);
- ``policies``: each of ``methods`` (DPO, RPO, PPO, RLOO) from SFT, compared with SFT on held-out prompts.

``study_config(preset)`` gives the audit's sizes (``default``), a smaller ``quick`` one and ``ideal`` (the
``ideal`` labeler, on-policy comparisons, all four methods).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from matplotlib.figure import Figure

from safetylab.align.data import preferences_from_records, read_preferences
from safetylab.align.dpo import DPOConfig, policy_preferences, train_dpo
from safetylab.align.evaluate import METRICS, EvalConfig, evaluate_policy, gold_tracker
from safetylab.align.goodhart import best_of_n_curve, plot_curve, plot_overoptimization
from safetylab.align.overopt import best_of_n_scaling, fit_bon
from safetylab.align.ppo import PPOConfig, train_ppo
from safetylab.align.reward import (
    RewardConfig,
    RewardEnsemble,
    evaluate_reward_model,
    fit_reward_models,
    policy_reward,
    score,
)
from safetylab.align.rloo import RLOOConfig, train_rloo
from safetylab.core.config import require, require_choice
from safetylab.core.devices import check_device_name, select_device
from safetylab.core.io import atomic_write_text, save_figure, write_jsonl
from safetylab.core.runs import RunDir
from safetylab.core.seeding import derive_seed, seed_everything
from safetylab.core.study import Context, Section, Stage, Table
from safetylab.models.lm import ModelConfig, load_model, save_model
from safetylab.models.sampling import sample
from safetylab.models.train import TrainConfig, finetune, pretrain
from safetylab.world.labelers import PRESETS, measure_labeler
from safetylab.world.probe import probe_judge, probe_summary
from safetylab.world.requests import KINDS
from safetylab.world.world import World, WorldConfig

METHODS = ("dpo", "rpo", "ppo", "rloo")


@dataclass(frozen=True)
class OveroptConfig:
    """Gao et al. (2022)'s best-of-n experiment on the SFT model: ``samples`` responses to each of
    ``prompts_per_kind`` held-out prompts of every kind, best-of-n for n = 1 … ``samples`` by the unbiased
    estimator, against a proxy reward model for each labeler × comparisons × depth (the SFT model's first
    ``depth`` blocks with a reward head, trained on that many of the labeler's comparisons of written styles)."""

    prompts_per_kind: int = 6
    samples: int = 512
    max_new_tokens: int = 48
    labelers: tuple[str, ...] = ("typical", "ideal")
    pairs: tuple[int, ...] = (750, 3000)
    depths: tuple[int, ...] = (1, 2, 4)
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(
        train=TrainConfig(steps=200, batch_size=32, lr=5e-4, warmup_steps=20, log_every=50, checkpoint_every=200)))

    def __post_init__(self):
        for name in ("prompts_per_kind", "samples", "max_new_tokens"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1",
                    getattr(self, name))
        require(len(self.labelers) > 0 and set(self.labelers) <= set(PRESETS), "labelers",
                f"one or more of {', '.join(PRESETS)}", self.labelers)
        for name in ("pairs", "depths"):
            values = getattr(self, name)
            require(len(values) > 0 and all(isinstance(v, int) and v >= 1 for v in values), name,
                    "one or more integers >= 1", values)


@dataclass(frozen=True)
class AlignStudyConfig:
    """The whole study. Training configs carry their own seeds; :func:`study_config` sets them all to the
    study's ``seed``."""

    seed: int = 0
    device: str = "auto"
    world: WorldConfig = field(default_factory=WorldConfig)
    # base and SFT
    corpus_conversations: int = 12_000
    demonstrations: int = 3_000
    demonstration_flattery: float = 0.0  # share of correct demonstrations a contractor wraps in flattery
    demonstration_hedging: float = 0.0  # share of demonstrations a contractor hedges
    sft_replay: float = 0.5  # knowledge lines of the corpus (no conversations) mixed into SFT, per demonstration
    model: ModelConfig = field(default_factory=ModelConfig)
    base: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, batch_size=32, lr=3e-3))
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, batch_size=32, lr=1e-3, warmup_steps=20))
    eval: EvalConfig = field(default_factory=EvalConfig)
    labeler_pairs: int = 2_000  # comparisons on which each simulated labeler is measured
    # the reward model
    labeler: str = "typical"
    preferences: int = 3_000  # the labeler's comparisons of written styles
    on_policy_per_kind: int = 0  # train prompts per kind whose SFT samples the labeler compares (0: none)
    on_policy_samples: int = 4  # samples per prompt, every two compared
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(
        train=TrainConfig(steps=200, batch_size=32, lr=5e-4, warmup_steps=20, log_every=25, checkpoint_every=100)))
    # best-of-n
    best_of_n: tuple[int, ...] = (1, 4, 16)
    best_of_n_per_kind: int = 10
    kl_samples: int = 16
    # the policies: DPO and RPO learn from the on-policy comparisons when there are any, else from the
    # comparisons of written styles; PPO and RLOO optimise the reward model on train-split prompts
    methods: tuple[str, ...] = ("dpo", "ppo")
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(
        train=TrainConfig(steps=100, batch_size=32, lr=1e-4, warmup_steps=10, log_every=10, checkpoint_every=50)))
    rpo_alpha: float = 1.0  # weight of the chosen responses' NLL in RPO's loss
    rl_prompts_per_kind: int = 100
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(
        train=TrainConfig(steps=80, batch_size=32, lr=1e-4, warmup_steps=8, log_every=8, checkpoint_every=40)))
    rloo: RLOOConfig = field(default_factory=lambda: RLOOConfig(
        train=TrainConfig(steps=100, batch_size=16, lr=1e-4, warmup_steps=5, log_every=10, checkpoint_every=50)))
    overopt: OveroptConfig = field(default_factory=OveroptConfig)  # `safetylab align overopt`

    def __post_init__(self):
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        check_device_name(self.device)
        for name in ("corpus_conversations", "demonstrations", "labeler_pairs", "preferences", "best_of_n_per_kind",
                     "rl_prompts_per_kind"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        for name in ("demonstration_flattery", "demonstration_hedging"):
            require(0 <= getattr(self, name) <= 1, name, "a share in [0, 1]", getattr(self, name))
        require(self.sft_replay >= 0, "sft_replay", "a number >= 0", self.sft_replay)
        require_choice(self.labeler, "labeler", PRESETS)
        require(self.on_policy_per_kind >= 0, "on_policy_per_kind", "an integer >= 0", self.on_policy_per_kind)
        require(self.on_policy_samples >= 2, "on_policy_samples", "an integer >= 2", self.on_policy_samples)
        require(len(self.best_of_n) > 0 and all(isinstance(n, int) and n >= 1 for n in self.best_of_n),
                "best_of_n", "one or more integers >= 1", self.best_of_n)
        require(self.kl_samples >= 0, "kl_samples", "an integer >= 0", self.kl_samples)
        require(len(self.methods) > 0 and set(self.methods) <= set(METHODS)
                and len(set(self.methods)) == len(self.methods), "methods",
                f"one or more of {', '.join(METHODS)}, each once", self.methods)
        require(self.rpo_alpha > 0, "rpo_alpha", "a number > 0", self.rpo_alpha)


QUICK = AlignStudyConfig(
    corpus_conversations=4_000, demonstrations=1_000,
    model=ModelConfig(n_layer=2, n_head=4, n_embd=64),
    base=TrainConfig(steps=300, batch_size=32, lr=5e-3),
    sft=TrainConfig(steps=120, batch_size=32, lr=2e-3, warmup_steps=10),
    eval=EvalConfig(per_kind=20, jailbroken=4),
    labeler_pairs=500,
    preferences=600,
    reward=RewardConfig(train=TrainConfig(steps=40, batch_size=32, lr=1e-3, warmup_steps=5, log_every=10,
                                          checkpoint_every=20)),
    best_of_n=(1, 4), best_of_n_per_kind=4, kl_samples=4,
    dpo=DPOConfig(train=TrainConfig(steps=20, batch_size=32, lr=1e-4, warmup_steps=2, log_every=10,
                                    checkpoint_every=10)),
    rl_prompts_per_kind=20,
    ppo=PPOConfig(train=TrainConfig(steps=16, batch_size=16, lr=3e-5, warmup_steps=2, log_every=4,
                                    checkpoint_every=8), max_new_tokens=32),
    rloo=RLOOConfig(train=TrainConfig(steps=10, batch_size=8, lr=3e-5, warmup_steps=2, log_every=5,
                                      checkpoint_every=5), max_new_tokens=32),
    overopt=OveroptConfig(prompts_per_kind=2, samples=32, max_new_tokens=32, labelers=("typical",), pairs=(300,),
                          depths=(1, 2), reward=RewardConfig(train=TrainConfig(
                              steps=30, batch_size=32, lr=1e-3, warmup_steps=3, log_every=10, checkpoint_every=30))),
)

# The `ideal` labeler, on-policy comparisons (four SFT samples for each of 200 train prompts per kind), and
# all four methods with the gold judge tracked during training: docs/results.md's alignment table.
IDEAL = replace(
    AlignStudyConfig(), labeler="ideal", on_policy_per_kind=200, methods=METHODS,
    reward=RewardConfig(train=TrainConfig(steps=300, batch_size=32, lr=5e-4, warmup_steps=20, log_every=25,
                                          checkpoint_every=100)),
    dpo=DPOConfig(train=TrainConfig(steps=100, batch_size=32, lr=1e-4, warmup_steps=10, log_every=10,
                                    checkpoint_every=50, eval_every=20), beta=0.1),
    ppo=PPOConfig(train=TrainConfig(steps=160, batch_size=32, lr=1e-4, warmup_steps=8, log_every=8,
                                    checkpoint_every=40, eval_every=40)),
    rloo=RLOOConfig(train=TrainConfig(steps=100, batch_size=16, lr=1e-4, warmup_steps=5, log_every=10,
                                      checkpoint_every=50, eval_every=20)),
)
PRESETS_BY_NAME = {"default": AlignStudyConfig(), "quick": QUICK, "ideal": IDEAL}


def study_config(preset: str = "default", seed: int = 0, device: str = "auto", **changes) -> AlignStudyConfig:
    """The preset (``default``: the audit's sizes; ``quick``; ``ideal``) for ``seed`` on ``device``, with
    ``changes`` to its fields."""
    require_choice(preset, "preset", PRESETS_BY_NAME)
    return seeded(replace(PRESETS_BY_NAME[preset], **changes), seed, device)


def seeded(config: AlignStudyConfig, seed: int, device: str) -> AlignStudyConfig:
    """``config`` with the study, its world and every training config on ``seed`` and ``device``."""

    def train(t: TrainConfig) -> TrainConfig:
        return replace(t, seed=seed, device=device)

    return replace(config, seed=seed, device=device, world=replace(config.world, seed=seed),
                   base=train(config.base), sft=train(config.sft),
                   reward=replace(config.reward, train=train(config.reward.train)),
                   dpo=replace(config.dpo, train=train(config.dpo.train)),
                   ppo=replace(config.ppo, train=train(config.ppo.train)),
                   rloo=replace(config.rloo, train=train(config.rloo.train)))


def world_of(ctx: Context) -> World:
    return ctx.cached("world", lambda: World(ctx.config.world))


def model_path(ctx: Context, name: str) -> Path:
    """The model of stage ``name`` ("base" or "sft"): handed in as an input, or saved by that stage."""
    if name in ctx.inputs:
        return Path(ctx.inputs[name])
    return ctx.path(ctx.section(name).data["model"])


# ---------------------------------------------------------------------------- stages
def world_stage(ctx: Context) -> Section:
    """Build the world; write its data sets; measure the simulated labelers and the gold judge."""
    cfg, world, out = ctx.config, world_of(ctx), ctx.stage_dir("world")
    corpus = world.corpus(cfg.corpus_conversations)
    demos = world.demonstrations(cfg.demonstrations, cfg.demonstration_flattery, cfg.demonstration_hedging)
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
        tables=[Table("Simulated labelers against the gold judge (rates over comparisons)",
                      ["labeler", "gold agreement", "prefers flattery", "prefers confident-wrong (hard)",
                       "prefers sycophancy (hard)", "prefers longer"], rows),
                Table("The gold judge against adversarial variants (safetylab world probe-judge): surface changes "
                      "must not change its verdict, the others must be scored as what they say",
                      ["variants", "n", "scored as they should", "rate"],
                      [[family, t["n"], t["n"] - t["failed"], round((t["n"] - t["failed"]) / t["n"], 4)]
                       for family, t in probe.items()])],
        data={"corpus": ctx.run.relative(out / "corpus.txt"),
              "demonstrations": ctx.run.relative(out / "demonstrations.jsonl")},
    )


def base_stage(ctx: Context) -> Section:
    """Pre-train the base model on the world corpus."""
    cfg = ctx.config
    corpus = ctx.path(ctx.section("world").data["corpus"]).read_text(encoding="utf-8").splitlines()
    run = RunDir(ctx.stage_dir("base"), {"model": asdict(cfg.model), "train": asdict(cfg.base), "lines": len(corpus)})
    model, _ = pretrain(corpus, cfg.model, cfg.base, run)
    return _training_section(ctx, "base", "Base model (pre-training)", run, model)


def sft_stage(ctx: Context) -> Section:
    """Fine-tune the base model on the demonstrations (loss on responses only), with knowledge replay."""
    cfg = ctx.config
    base, tokenizer = load_model(model_path(ctx, "base"), select_device(cfg.device))
    demos = [json.loads(line) for line in
             ctx.path(ctx.section("world").data["demonstrations"]).read_text(encoding="utf-8").splitlines()]
    corpus = ctx.path(ctx.section("world").data["corpus"]).read_text(encoding="utf-8").splitlines()
    knowledge = [line for line in corpus if not line.startswith("<user>")]  # replay knowledge, not behaviour
    replay = knowledge[: round(cfg.sft_replay * len(demos))]  # the corpus is shuffled: a prefix is a sample
    run = RunDir(ctx.stage_dir("sft"), {"train": asdict(cfg.sft), "demonstrations": len(demos), "replay": len(replay)})
    model, _ = finetune(base, tokenizer, [(d["prompt"], d["response"]) for d in demos], cfg.sft, run, replay)
    habits = [f"{share:.0%} {habit}" for habit, share in (("flattered", cfg.demonstration_flattery),
                                                          ("hedged", cfg.demonstration_hedging)) if share]
    title = "SFT model (fine-tuned on demonstrations" + (f", {' and '.join(habits)})" if habits else ")")
    return _training_section(ctx, "sft", title, run, model)


def evaluate_stage(ctx: Context) -> Section:
    """Sample both models on held-out prompts; score with the gold judge; KL of SFT to the base."""
    cfg, world, out = ctx.config, world_of(ctx), ctx.stage_dir("evaluate")
    requests = world.evaluation_set(cfg.eval.per_kind, cfg.eval.jailbroken)
    device = select_device(cfg.device)
    base, tokenizer = load_model(model_path(ctx, "base"), device)
    sft, _ = load_model(model_path(ctx, "sft"), device)
    results = {}
    for name, model, reference in (("base", base, None), ("sft", sft, base)):
        seed_everything(cfg.seed)  # common random numbers: both models see the same draws
        results[name] = evaluate_policy(model, tokenizer, world.judge, requests, reference, cfg.eval)
        write_jsonl(out / f"samples-{name}.jsonl", results[name]["samples"])
    kinds = [*KINDS, "jailbroken"]
    tables = [Table(f"{name}: held-out prompts by request kind", ["kind", "n", *METRICS],
                    [[kind, r["by_kind"][kind]["n"], *(r["by_kind"][kind][m] for m in METRICS)] for kind in kinds]
                    + [["all", r["overall"]["n"], *(r["overall"][m] for m in METRICS)]])
              for name, r in results.items()]
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
        plots=[ctx.run.relative(_utility_plot(results, kinds, out / "gold-utility.png"))],
        transcripts=transcripts,
        data={"overall": overall, "by_kind": {name: results[name]["by_kind"] for name in results}},
    )


def reward_stage(ctx: Context) -> Section:
    """Fit the reward model on the labeler's comparisons; measure it on held-out ones."""
    cfg, world, out = ctx.config, world_of(ctx), ctx.stage_dir("reward")
    sft_path = model_path(ctx, "sft")
    styles, held_styles, _, _ = preference_split(world, None, cfg.labeler, cfg.preferences)
    held_out = {"written styles": held_styles}
    sampled = on_policy_comparisons(ctx)
    if sampled:
        held_out["SFT samples"] = sampled["test"]
    rows = styles + sampled.get("train", [])
    run = RunDir(out / "run", {"base": str(sft_path), "reward": asdict(cfg.reward), "pairs": len(rows)})
    members, tokenizer = fit_reward_models(sft_path, rows, cfg.reward, run, select_device(cfg.device))
    model = members[0] if len(members) == 1 else RewardEnsemble(members)
    results = {name: evaluate_reward_model(model, tokenizer, held) for name, held in held_out.items()}
    first = results["written styles"]
    return Section(
        title=f"Reward model on {cfg.labeler} comparisons",
        summary=f"held-out accuracy {first['accuracy']:.3f}, gold agreement {first.get('gold_agreement', 0):.3f} "
                f"({len(styles)} comparisons of written styles"
                + (f", {len(sampled['train'])} of SFT samples)" if sampled else ")"),
        tables=[Table(f"Reward model on held-out {cfg.labeler} comparisons", ["comparisons of", "pairs", "accuracy",
                                                                             "margin", "gold agreement"],
                      [[name, len(held_out[name]), r["accuracy"], r["margin"], r.get("gold_agreement")]
                       for name, r in results.items()])],
        data={"evaluation": results, "pairs": {"styles": len(styles), "sampled": len(sampled.get("train", []))},
              "members": [ctx.run.relative(run.path / "members" / str(i) / "artifacts" / "reward-model")
                          for i in range(len(members))]},
    )


def on_policy_comparisons(ctx: Context) -> dict[str, list]:
    """The labeler's comparisons of the SFT model's own samples, on train and test prompts (none without
    ``on_policy_per_kind``); made once, kept in the reward stage's directory (the SFT model is loaded only
    to make a missing file)."""
    cfg = ctx.config
    if not cfg.on_policy_per_kind:
        return {}

    def make() -> dict[str, list]:
        world, out, found, loaded = world_of(ctx), ctx.stage_dir("reward"), {}, None
        for split, per_kind in (("train", cfg.on_policy_per_kind), ("test", max(cfg.on_policy_per_kind // 4, 1))):
            path = out / f"sampled-{split}.jsonl"
            if not path.exists():
                loaded = loaded or load_model(model_path(ctx, "sft"), select_device(cfg.device))
                sft, tokenizer = loaded
                requests = [r for kind in KINDS for r in world.requests(kind, split, per_kind)]
                write_jsonl(path, policy_preferences(sft, tokenizer, world, requests, cfg.labeler,
                                                     cfg.on_policy_samples, cfg.seed))
            found[split] = read_preferences(path).rows
        return found

    return ctx.cached("on-policy", make)


def reward_fn(ctx: Context):
    """The reward stage's model as ``(reward(prompts, responses), model, tokenizer)``."""
    from safetylab.align.reward import load_reward_model

    def load():
        device = select_device(ctx.config.device)
        loaded = [load_reward_model(ctx.path(p), device) for p in ctx.section("reward").data["members"]]
        model = loaded[0][0] if len(loaded) == 1 else RewardEnsemble([m for m, _ in loaded])
        tokenizer = loaded[0][1]
        return (lambda prompts, responses: score(model, tokenizer, prompts, responses)), model, tokenizer

    return ctx.cached("reward", load)


def best_of_n_stage(ctx: Context) -> Section:
    """Best-of-n against the reward model on held-out prompts: proxy, gold and KL as n grows."""
    cfg, world, out = ctx.config, world_of(ctx), ctx.stage_dir("best-of-n")
    sft, tokenizer = load_model(model_path(ctx, "sft"), select_device(cfg.device))
    reward, _, _ = reward_fn(ctx)
    probe = world.evaluation_set(cfg.best_of_n_per_kind, max(cfg.best_of_n_per_kind // 5, 1), seed=2)
    curve = best_of_n_curve(sft, tokenizer, world.judge, probe, reward, cfg.best_of_n, cfg.kl_samples, cfg.seed)
    first, last = curve[0], curve[-1]
    return Section(
        title="Best-of-n against the reward model",
        summary=f"best-of-{last['n']}: proxy {first['proxy']:+.2f} → {last['proxy']:+.2f}, gold "
                f"{first['gold_utility']:+.3f} → {last['gold_utility']:+.3f} at KL ≤ {last['kl_bound']:.2f}",
        tables=[Table(f"Best-of-n against the reward model ({len(probe)} held-out prompts)", list(curve[0]),
                      [list(row.values()) for row in curve])],
        plots=[ctx.run.relative(plot_curve(curve, out / "best-of-n.png"))],
        data={"curve": curve},
    )


def policies_stage(ctx: Context) -> Section:
    """Each method from SFT (DPO and RPO on comparisons, PPO and RLOO against the reward model), then
    every policy and SFT on the same held-out prompts with the same draws."""
    cfg, world, out = ctx.config, world_of(ctx), ctx.stage_dir("policies")
    device = select_device(cfg.device)
    sft_path = model_path(ctx, "sft")
    sft, tokenizer = load_model(sft_path, device)
    reward, reward_model, reward_tokenizer = reward_fn(ctx)
    sampled = on_policy_comparisons(ctx)
    pairs = sampled["train"] if sampled else preference_split(world, None, cfg.labeler, cfg.preferences)[0]
    prompts = [r.prompt for kind in KINDS for r in world.requests(kind, "train", cfg.rl_prompts_per_kind)]
    tracker = small_gold_tracker(world, tokenizer, sft)
    rl_reward = policy_reward(reward_model, reward_tokenizer, tokenizer)
    trainers = {
        "dpo": (cfg.dpo, lambda policy, run: train_dpo(policy, tokenizer, pairs, cfg.dpo, run, sft, evaluate=tracker)),
        "rpo": (replace(cfg.dpo, rpo_alpha=cfg.rpo_alpha), lambda policy, run: train_dpo(
            policy, tokenizer, pairs, replace(cfg.dpo, rpo_alpha=cfg.rpo_alpha), run, sft, evaluate=tracker)),
        "ppo": (cfg.ppo, lambda policy, run: train_ppo(policy, tokenizer, prompts, rl_reward, sft, cfg.ppo, run,
                                                       evaluate=tracker)),
        "rloo": (cfg.rloo, lambda policy, run: train_rloo(policy, tokenizer, prompts, rl_reward, sft, cfg.rloo, run,
                                                          evaluate=tracker)),
    }
    policies, paths = {"sft": sft}, {}
    for name in cfg.methods:
        config, train = trainers[name]
        run = RunDir(out / name, {"base": str(sft_path), name: asdict(config),
                                  "data": len(prompts) if name in ("ppo", "rloo") else len(pairs)})
        policies[name], paths[name] = trained_policy(run, sft_path, partial(train, run=run), tokenizer, device)
    requests = world.evaluation_set(cfg.eval.per_kind, cfg.eval.jailbroken)
    overall = {}
    for name, policy in policies.items():  # SFT first
        seed_everything(cfg.seed)  # common random numbers: every policy sees the same draws
        result = evaluate_policy(policy, tokenizer, world.judge, requests, sft, cfg.eval)
        proxy = reward([s["prompt"] for s in result["samples"]], [s["response"] for s in result["samples"]])
        overall[name] = {**result["overall"], "proxy_reward": round(proxy.mean().item(), 6)}
        overall[name]["gold_gain"] = overall[name]["gold_utility"] - overall["sft"]["gold_utility"]
    columns = ["proxy_reward", "gold_gain", *METRICS]
    data_name = "on-policy comparisons" if sampled else f"{cfg.labeler} comparisons of written styles"
    return Section(
        title="Policies from SFT: " + ", ".join(m.upper() for m in cfg.methods),
        summary=f"gold utility from SFT's {overall['sft']['gold_utility']:+.3f}: " + ", ".join(
            f"{name.upper()} {overall[name]['gold_utility']:+.3f} at KL {overall[name]['kl_to_reference']:.2f}"
            for name in cfg.methods),
        tables=[Table(f"On held-out prompts (DPO/RPO: {data_name}, β {cfg.dpo.loss_beta:g}; PPO/RLOO against the "
                      "reward model); gold_gain = gold utility − SFT's, paired by seed",
                      ["model", *columns], [[name, *(row[m] for m in columns)] for name, row in overall.items()])],
        data={"overall": overall, "models": {name: ctx.run.relative(path) for name, path in paths.items()}},
    )


def overoptimization_stage(ctx: Context) -> Section:
    """Gold and proxy of best-of-n against √KL for proxy reward models of several depths, data amounts and
    labelers, with Gao et al.'s fitted form for each (:mod:`safetylab.align.overopt`)."""
    cfg, world, out = ctx.config, world_of(ctx), ctx.stage_dir("overoptimization")
    o, device, sft_path = cfg.overopt, select_device(cfg.device), model_path(ctx, "sft")
    sft, tokenizer = load_model(sft_path, device)
    requests = world.evaluation_set(o.prompts_per_kind, 0, seed=derive_seed(cfg.seed, "overopt", "prompts"))
    prompts = [r.prompt for r in requests for _ in range(o.samples)]
    seed_everything(derive_seed(cfg.seed, "overopt", "samples"))
    texts = sample(sft.eval(), tokenizer, prompts, o.max_new_tokens).texts
    gold = torch.tensor([world.judge.score(requests[i // o.samples], t).utility for i, t in enumerate(texts)])
    gold = gold.view(len(requests), o.samples)
    oracle = best_of_n_scaling(gold, gold, seed=cfg.seed)
    kinds = {k: torch.tensor([i for i, r in enumerate(requests) if r.kind == k])
             for k in dict.fromkeys(r.kind for r in requests)}
    results = []
    for labeler in o.labelers:
        rows, held_out, _, _ = preference_split(world, None, labeler, max(o.pairs))
        for pairs in o.pairs:
            for depth in o.depths:
                train = replace(o.reward.train, seed=cfg.seed, device=cfg.device)
                reward = replace(o.reward, layers=depth, train=train)
                run = RunDir(out / f"{labeler}-{pairs}-pairs-{depth}-blocks",
                             {"base": str(sft_path), "reward": asdict(reward), "pairs": pairs})
                (model,), rtok = fit_reward_models(sft_path, rows[:pairs], reward, run, device)
                proxy = score(model, rtok, prompts, texts).view_as(gold)
                curve = best_of_n_scaling(proxy, gold, seed=cfg.seed)
                fit = fit_bon([r["d"] for r in curve], [r["gold"] - curve[0]["gold"] for r in curve])
                by_kind = {kind: best_of_n_scaling(proxy[rows_of], gold[rows_of], seed=cfg.seed)
                           for kind, rows_of in kinds.items()}
                results.append({"labeler": labeler, "pairs": pairs, "depth": depth,
                                "held_out": evaluate_reward_model(model, rtok, held_out), "curve": curve,
                                "fit": fit.to_dict(), "by_kind": by_kind})
    table_rows, falls = [], 0
    for r in results:
        best = max(r["curve"], key=lambda row: row["gold"])
        fit, curve = r["fit"], r["curve"]
        falls += curve[-1]["gold"] < best["gold"]
        table_rows.append([r["labeler"], r["pairs"], r["depth"], r["held_out"]["accuracy"], best["n"],
                           round(best["gold"] - curve[0]["gold"], 4), round(curve[-1]["gold"] - curve[0]["gold"], 4),
                           round(curve[-1]["proxy"] - curve[0]["proxy"], 3), round(fit["alpha"], 4),
                           round(fit["beta"], 4), round(fit["r2"], 3),
                           None if fit["peak_d"] is None else round(fit["peak_d"], 3),
                           None if fit["peak"] is None else round(fit["peak"], 4)])
    largest = [r for r in results if r["pairs"] == max(o.pairs) and r["depth"] == max(o.depths)]
    kind_rows = [[kind, *(_rise_and_fall(r["by_kind"][kind]) for r in largest)] for kind in kinds]
    n = o.samples
    return Section(
        title="Reward-model overoptimization: best-of-n against proxies of several sizes (Gao et al. 2022)",
        summary=f"gold falls after its peak for {falls} of {len(results)} proxy reward models by best-of-{n}; "
                f"best-of-{n} by gold itself gains {oracle[-1]['gold'] - oracle[0]['gold']:+.3f}",
        tables=[Table(f"Best-of-n to n = {n} ({len(requests)} held-out prompts, {n} samples each; gold and proxy as "
                      "change from n = 1; the fit R_bon(d) = d(α − βd) of the gold change, d = √KL)",
                      ["labeler", "comparisons", "RM blocks", "RM held-out accuracy", "best n", "best gold",
                       f"gold at n = {n}", f"proxy at n = {n}", "α", "β", "R²", "d*", "gold at d*"], table_rows),
                Table(f"By request kind, the largest proxies ({max(o.pairs)} comparisons, {max(o.depths)} blocks): the "
                      f"gold change at its best n, and at n = {n}",
                      ["kind", *(f"{r['labeler']} labels" for r in largest)], kind_rows),
                Table("Best-of-n by the gold judge itself (the most a perfect proxy could gain)", ["n", "√KL", "gold"],
                      [[r["n"], round(r["d"], 3), round(r["gold"] - oracle[0]["gold"], 4)] for r in oracle])],
        plots=[ctx.run.relative(plot_overoptimization(results, out / "overoptimization.png"))],
        data={"results": results, "oracle": oracle, "prompts": len(requests), "samples": n},
    )


def _rise_and_fall(curve: list[dict]) -> str:
    """``+best (n = …) → at the last n`` of a best-of-n curve's gold, as change from n = 1."""
    start, best = curve[0]["gold"], max(curve, key=lambda row: row["gold"])
    return f"{best['gold'] - start:+.3f} (n = {best['n']}) → {curve[-1]['gold'] - start:+.3f}"


STAGES = (
    Stage("world", "build the world, its data sets and labelers", world_stage),
    Stage("base", "pre-train the base model", base_stage),
    Stage("sft", "supervised fine-tuning", sft_stage),
    Stage("evaluate", "evaluate base and SFT against the gold judge", evaluate_stage),
    Stage("reward", "a reward model on the labeler's comparisons", reward_stage),
    Stage("best-of-n", "best-of-n against the reward model: proxy against gold", best_of_n_stage),
    Stage("policies", "DPO, RPO, PPO and RLOO from SFT against the gold judge", policies_stage),
)
FROM_SFT = ("reward", "best-of-n", "policies")  # the stages that run from a given SFT model
# `safetylab align overopt`: the world, base and SFT models, then the overoptimization experiment
OVEROPT_STAGES = (*STAGES[:3], Stage("overoptimization", "best-of-n against proxy reward models of several sizes: "
                                     "Gao et al.'s scaling", overoptimization_stage))


# ---------------------------------------------------------------------------- helpers
def _training_section(ctx: Context, name: str, title: str, run: RunDir, model) -> Section:
    metrics = run.metrics()
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics])
    ax.set(xlabel="step", ylabel="loss", title=f"{name} training loss")
    fig.tight_layout()
    plot = save_figure(fig, run.plots / "loss.png")
    params = sum(p.numel() for p in model.parameters())
    final = metrics[-1]["loss"] if metrics else float("nan")
    return Section(
        title=title,
        summary=f"{params:,} parameters, {metrics[-1]['step'] if metrics else 0} steps, final loss {final:.3f}",
        plots=[ctx.run.relative(plot)],
        data={"model": ctx.run.relative(run.artifacts / "model"), "final_loss": final, "parameters": params},
    )


def _utility_plot(results: dict, kinds: list[str], path: Path) -> Path:
    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    width = 0.8 / len(results)
    for i, name in enumerate(results):
        values = [results[name]["by_kind"][k]["gold_utility"] or 0.0 for k in kinds]
        ax.bar([j + i * width for j in range(len(kinds))], values, width, label=name)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(kinds))], kinds, rotation=20)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set(ylabel="mean gold utility", title="Gold utility on held-out prompts")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------- one method at a time
def preference_split(world: World, preferences: Path | None, labeler: str, n: int):
    """``(train rows, held-out rows, source, skipped lines)``: a preference file's first 90% and last 10%,
    or ``n`` of the world's train-split comparisons by ``labeler`` and a fifth as many (at least 100)
    test-split ones."""
    if preferences is not None:
        data = read_preferences(preferences)
        cut = max(len(data.rows) * 9 // 10, 1)
        return data.rows[:cut], data.rows[cut:] or data.rows[-1:], str(preferences), data.skipped
    train = preferences_from_records(world.preferences(n, labeler)).rows
    held_out = preferences_from_records(world.preferences(max(n // 5, 100), labeler, split="test")).rows
    return train, held_out, f"world seed {world.config.seed}, labeler {labeler}, {n} pairs", []


def train_and_compare(name: str, run: RunDir, base: Path, reference, tokenizer, world: World, device, seed: int,
                      train) -> dict[str, dict]:
    """Train a policy from the model at ``base`` (loaded as ``reference``) with ``train(policy, tracker)``
    (the gold judge tracked on a small held-out set), save it in ``run``'s ``artifacts/model`` (a finished
    run's policy is loaded instead), and compare it with the starting model on held-out world prompts,
    both with the same draws. Writes ``eval.json``; returns ``{"start": metrics, name: metrics}``."""
    tracker = small_gold_tracker(world, tokenizer, reference)
    policy, _ = trained_policy(run, base, lambda start: train(start, tracker), tokenizer, device)
    requests = world.evaluation_set(60, 12)
    results = {}
    for label, model in (("start", reference), (name, policy)):
        seed_everything(seed)
        results[label] = evaluate_policy(model, tokenizer, world.judge, requests, reference)["overall"]
    run.write_json("eval.json", results)
    return results


def trained_policy(run: RunDir, start: Path, train, tokenizer, device):
    """``(policy, path)``: the policy a finished ``run`` saved in ``artifacts/model``, or
    ``train(the model at start)``, saved there first."""
    path = run.artifacts / "model"
    if not path.exists():
        save_model(train(load_model(start, device)[0]), tokenizer, path)
    return load_model(path, device)[0], path


def small_gold_tracker(world: World, tokenizer, reference):
    """The gold judge tracked during training on a small held-out set (10 prompts a kind, 2 jailbroken per
    wrapper) against ``reference``, for the policy trainers' ``evaluate=``."""
    return gold_tracker(tokenizer, world.judge, world.evaluation_set(10, 2, seed=1), reference,
                        EvalConfig(per_kind=10, jailbroken=2))
