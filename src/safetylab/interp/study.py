"""The interpretability study of the world's assistant, as stages of :mod:`safetylab.core.study`.

``safetylab interp report`` runs it on the model of ``--model`` (any HF causal LM trained on the world, such
as an audit's ``align/sft/artifacts/model``) or on a world assistant it trains first; the audit hands it
the align study's SFT model.

- ``model``: the model under study (handed in, or pre-trained on the world corpus and fine-tuned on
  demonstrations), its hook points;
- ``lens``: the logit lens on held-out fact and arithmetic questions: at which layer the answer is decided.

Seeds: :func:`~safetylab.core.study.run_stages` seeds each stage; the world and every data set are derived
from ``config.seed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from matplotlib.figure import Figure

from safetylab.core.config import require
from safetylab.core.devices import check_device_name, select_device
from safetylab.core.io import save_figure
from safetylab.core.runs import RunDir
from safetylab.core.study import Context, Section, Stage, Table
from safetylab.interp.hooks import Hooks, describe_names, model_signature
from safetylab.interp.lens import LensResult, world_lens
from safetylab.models.lm import ModelConfig, load_model
from safetylab.models.train import TrainConfig, finetune, pretrain
from safetylab.world.world import World, WorldConfig


@dataclass(frozen=True)
class InterpStudyConfig:
    seed: int = 0
    device: str = "auto"
    world: WorldConfig = field(default_factory=WorldConfig)
    # the world assistant trained when no model is handed in (the align study's default sizes)
    corpus_conversations: int = 12_000
    demonstrations: int = 3_000
    model: ModelConfig = field(default_factory=ModelConfig)
    base: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, batch_size=32, lr=3e-3))
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, batch_size=32, lr=1e-3, warmup_steps=20))
    # the logit lens
    lens_questions: int = 300  # held-out questions per kind

    def __post_init__(self):
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        check_device_name(self.device)
        for name in ("corpus_conversations", "demonstrations", "lens_questions"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))


QUICK = InterpStudyConfig(
    corpus_conversations=4_000, demonstrations=1_000,
    model=ModelConfig(n_layer=2, n_head=4, n_embd=64),
    base=TrainConfig(steps=300, batch_size=32, lr=5e-3),
    sft=TrainConfig(steps=120, batch_size=32, lr=2e-3, warmup_steps=10),
    lens_questions=100,
)


def study_config(quick: bool = False, seed: int = 0, device: str = "auto", **changes) -> InterpStudyConfig:
    """The default study (or the ``quick`` one) on ``seed`` and ``device``, with ``changes`` to its fields."""
    return seeded(replace(QUICK if quick else InterpStudyConfig(), **changes), seed, device)


def seeded(config: InterpStudyConfig, seed: int, device: str) -> InterpStudyConfig:
    """``config`` with the study, its world and its trainings on ``seed`` and ``device``."""
    return replace(config, seed=seed, device=device, world=replace(config.world, seed=seed),
                   base=replace(config.base, seed=seed, device=device),
                   sft=replace(config.sft, seed=seed, device=device))


# ---------------------------------------------------------------------------- shared objects
def world_of(ctx: Context) -> World:
    return ctx.cached("world", lambda: World(ctx.config.world))


def model_path(ctx: Context) -> Path:
    if "model" in ctx.inputs:
        return Path(ctx.inputs["model"])
    return ctx.path(ctx.section("model").data["model"])


def loaded(ctx: Context):
    """``(model, tokenizer, hooks)`` of the model under study, loaded once per process."""
    def load():
        model, tokenizer = load_model(model_path(ctx), select_device(ctx.config.device))
        return model, tokenizer, Hooks(model)
    return ctx.cached("model", load)


# ---------------------------------------------------------------------------- stages
def model_stage(ctx: Context) -> Section:
    """The model under study: the one handed in, or a world assistant (base + SFT) trained here."""
    if "model" in ctx.inputs:
        path, origin = Path(ctx.inputs["model"]), "handed in"
    else:
        path, origin = train_assistant(ctx), "pre-trained on the world corpus and fine-tuned on demonstrations here"
    model, _ = load_model(path)
    hooks, signature = Hooks(model), model_signature(model)
    return Section(
        title="The model under study",
        summary=f"{signature['model_type']}, {signature['n_layers']} layers, d_model {signature['d_model']}; {origin}",
        tables=[Table("Model and hook points", ["field", "value"],
                      [*([k, v] for k, v in signature.items()),
                       ["parameters", sum(p.numel() for p in model.parameters())],
                       ["hook points", describe_names(hooks.names)]])],
        data={"model": str(path) if "model" in ctx.inputs else ctx.run.relative(path), "signature": signature},
    )


def train_assistant(ctx: Context) -> Path:
    """A world assistant as the align study makes it: pre-training on the corpus, then SFT on demonstrations
    with half as many knowledge lines of the corpus replayed."""
    cfg, world, out = ctx.config, world_of(ctx), ctx.stage_dir("model")
    corpus = world.corpus(cfg.corpus_conversations)
    base_run = RunDir(out / "base", {"model": asdict(cfg.model), "train": asdict(cfg.base), "lines": len(corpus)})
    base, tokenizer = pretrain(corpus, cfg.model, cfg.base, base_run)
    demos = world.demonstrations(cfg.demonstrations)
    replay = [line for line in corpus if not line.startswith("<user>")][: len(demos) // 2]
    sft_run = RunDir(out / "sft", {"train": asdict(cfg.sft), "demonstrations": len(demos), "replay": len(replay)})
    finetune(base, tokenizer, [(d["prompt"], d["response"]) for d in demos], cfg.sft, sft_run, replay)
    return sft_run.artifacts / "model"


def lens_stage(ctx: Context) -> Section:
    """The logit lens on held-out fact and arithmetic questions, at the token before the answer."""
    cfg, out = ctx.config, ctx.stage_dir("lens")
    _, tokenizer, hooks = loaded(ctx)
    results = {kind: world_lens(hooks, tokenizer, world_of(ctx), kind, cfg.lens_questions, cfg.seed)
               for kind in ("facts", "arithmetic")}
    save_figure(plot_lens(results), out / "lens.png")
    facts = results["facts"]
    return Section(
        title="The logit lens: where the answer is decided",
        summary=f"the answer to a held-out fact question has probability {facts.prob[-1]:.2f} after the last block "
                f"and {facts.prob[len(facts.prob) // 2]:.2f} halfway ({facts.names[len(facts.prob) // 2]})",
        tables=[Table(f"{kind}: the answer token read from each layer's stream ({r.n} questions"
                      + (f", {r.skipped} with an answer of several tokens skipped)" if r.skipped else ")"),
                      ["stream", "P(answer)", "answer is top-1"],
                      [[name, round(p, 4), round(t, 4)] for name, p, t in zip(r.names, r.prob, r.top1)])
                for kind, r in results.items()],
        plots=[ctx.run.relative(out / "lens.png")],
        data={kind: asdict(r) for kind, r in results.items()},
    )


def plot_lens(results: dict[str, LensResult]) -> Figure:
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for kind, r in results.items():
        ax.plot(range(len(r.names)), r.prob, marker="o", label=f"{kind}: P(answer)")
        ax.plot(range(len(r.names)), r.top1, marker="s", linestyle="--", label=f"{kind}: answer is top-1")
    names = next(iter(results.values())).names
    ax.set_xticks(range(len(names)), [n.replace(".resid_post", "") for n in names], rotation=30, fontsize=8)
    ax.set_ylabel("rate")
    ax.set_title("Logit lens on held-out questions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


STAGES = (
    Stage("model", "the model under study", model_stage),
    Stage("lens", "the logit lens on held-out questions", lens_stage),
)
