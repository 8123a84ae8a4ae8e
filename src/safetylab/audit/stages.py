"""The audit's stages, in order. Each is a function ``(ctx) -> Section``; see :mod:`.pipeline`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from safetylab.audit.pipeline import Context, Section, Stage  # noqa: E402
from safetylab.core.devices import select_device  # noqa: E402
from safetylab.core.io import atomic_write_text, write_jsonl  # noqa: E402
from safetylab.core.runs import RunDir  # noqa: E402
from safetylab.core.seeding import seed_everything  # noqa: E402
from safetylab.evals.policy import METRICS, EvalConfig, evaluate_policy  # noqa: E402
from safetylab.models.lm import ModelConfig, load_model  # noqa: E402
from safetylab.models.train import TrainConfig, finetune, pretrain  # noqa: E402
from safetylab.world.labelers import PRESETS, measure_labeler  # noqa: E402
from safetylab.world.requests import KINDS  # noqa: E402
from safetylab.world.world import World, WorldConfig  # noqa: E402


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


QUICK = AuditConfig(
    corpus_conversations=4_000, demonstrations=1_000,
    model=ModelConfig(n_layer=2, n_head=4, n_embd=64),
    base=TrainConfig(steps=300, batch_size=32, lr=5e-3),
    sft=TrainConfig(steps=120, batch_size=32, lr=2e-3, warmup_steps=10),
    eval=EvalConfig(per_kind=20, jailbroken=4),
    labeler_pairs=500,
)


def audit_config(quick: bool = False, seed: int = 0, device: str = "auto") -> AuditConfig:
    """The default audit, or with ``quick`` the same stages at a smaller size, for ``seed``."""
    size = QUICK if quick else AuditConfig()
    return replace(size, seed=seed, device=device, world=replace(size.world, seed=seed),
                   base=replace(size.base, seed=seed, device=device), sft=replace(size.sft, seed=seed, device=device))


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
    return Section(
        title="The assistant world",
        summary=f"{len(world.countries)} countries, {len(corpus)} corpus lines, {len(demos)} demonstrations",
        tables=[{
            "title": "Simulated labelers against the gold judge (rates over comparisons)",
            "columns": ["labeler", "gold agreement", "prefers flattery", "prefers confident-wrong (hard)",
                        "prefers longer"],
            "rows": rows,
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
        plots=[str(plot.relative_to(ctx.run.path))],
        transcripts=transcripts,
        data={"overall": overall, "by_kind": {name: results[name]["by_kind"] for name in results}},
    )


STAGES = (
    Stage("world", "build the world, its data sets and labelers", world_stage),
    Stage("base", "pre-train the base model", base_stage),
    Stage("sft", "supervised fine-tuning", sft_stage),
    Stage("evaluate", "evaluate base and SFT against the gold judge", evaluate_stage),
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
        plots=[str(plot.relative_to(ctx.run.path))],
        data={"model": str((run.artifacts / "model").relative_to(ctx.run.path)), "final_loss": final,
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
