"""The interpretability study of the world's assistant, as stages of :mod:`safetylab.core.study`.

``safetylab interp report`` runs it on the model of ``--model`` (any HF causal LM trained on the world, such
as an audit's ``align/sft/artifacts/model``) or on a world assistant it trains first; the audit hands it
the align study's SFT model.

- ``model``: the model under study (handed in, or pre-trained on the world corpus and fine-tuned on
  demonstrations), its hook points;
- ``lens``: the logit lens on held-out fact and arithmetic questions: at which layer the answer is decided;
- ``probes``: linear probes for world concepts at every layer, with control tasks (selectivity);
- ``sae``: sparse autoencoders of each kind (ReLU-L1, TopK, JumpReLU) on a residual stream, with L0, explained
  variance, CE loss recovered, dead and dense latents, and a feature dashboard (HTML);
- ``steer``: the refusal direction (Arditi et al. 2024): ablated everywhere and added at one layer, measured by
  the gold judge with its KL cost;
- ``patch``: activation patching of fact recall (Meng et al. 2022): where the world's model recalls a country's
  facts, by layer × position, attention against MLP, and by head;
- ``monitor``: the harmful-intent probe as a monitor, and the SAE latent that best separates harmful from benign
  prompts as another, each calibrated to a target FPR on benign prompts and rated on held-out jailbroken
  prompts against benign prompts under the same wrappers; saved for the control runtime.

Seeds: :func:`~safetylab.core.study.run_stages` seeds each stage; the world and every data set are derived
from ``config.seed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from matplotlib.figure import Figure

from safetylab.core.config import require, require_choice
from safetylab.core.devices import check_device_name, select_device
from safetylab.core.errors import SafetylabError
from safetylab.core.io import save_figure
from safetylab.core.study import Context, Section, Stage, Table
from safetylab.interp.concepts import CONCEPTS, NEEDS_MODEL, ConceptConfig, concept
from safetylab.interp.dashboard import feature_dashboard
from safetylab.interp.hooks import Hooks, describe_names, model_signature
from safetylab.interp.lens import LensResult, world_lens
from safetylab.interp.monitors import HarmfulMonitorConfig, harmful_intent_monitor, save_monitor
from safetylab.interp.patching import FactPatchingConfig, fact_recall_patching
from safetylab.interp.plots import plot_patching, plot_steering
from safetylab.interp.probes import probe_by_layer
from safetylab.interp.sae import KINDS as SAE_KINDS
from safetylab.interp.sae import SAEConfig, ce_loss_recovered, feature_density, load_sae, sae_metrics, train_sae
from safetylab.interp.steering import RefusalDirectionConfig, refusal_direction_experiment
from safetylab.interp.store import collect_activations, world_batches
from safetylab.models.lm import load_model
from safetylab.models.train import QUICK_ASSISTANT, AssistantConfig, train_world_assistant
from safetylab.world.requests import RELATIONS
from safetylab.world.world import World, WorldConfig


@dataclass(frozen=True)
class InterpStudyConfig:
    seed: int = 0
    device: str = "auto"
    world: WorldConfig = field(default_factory=WorldConfig)
    # the world assistant trained when no model is handed in
    assistant: AssistantConfig = field(default_factory=AssistantConfig)
    # the logit lens
    lens_questions: int = 300  # held-out questions per kind
    # probes: each concept's prompts (per group, train and test split) and the answers that label some of them
    concepts: tuple[str, ...] = CONCEPTS
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    # sparse autoencoders on ``sae_hook`` (None: the middle block's resid_post), one of each kind; the text is the
    # world's corpus and demonstrations (``sae_corpus`` and ``sae_demonstrations`` rows, a tenth held out)
    sae_hook: str | None = None
    sae_kinds: tuple[str, ...] = SAE_KINDS
    sae: SAEConfig = field(default_factory=lambda: SAEConfig(batch_size=2048, steps=1000))
    sae_corpus: int = 8000
    sae_demonstrations: int = 4000
    dashboard_features: int = 12
    # the refusal direction
    steering: RefusalDirectionConfig = field(default_factory=RefusalDirectionConfig)
    # fact-recall patching, one heat map per relation
    patching: FactPatchingConfig = field(default_factory=FactPatchingConfig)
    patch_relations: tuple[str, ...] = tuple(RELATIONS)
    # the harmful-intent monitor
    monitor: HarmfulMonitorConfig = field(default_factory=HarmfulMonitorConfig)

    def __post_init__(self):
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        check_device_name(self.device)
        require(self.lens_questions >= 1, "lens_questions", "an integer >= 1", self.lens_questions)
        require(len(self.concepts) > 0, "concepts", f"one or more of {', '.join(CONCEPTS)}", self.concepts)
        for name in self.concepts:
            require_choice(name, "concepts", CONCEPTS)
        require(len(self.patch_relations) > 0, "patch_relations", f"one or more of {', '.join(RELATIONS)}",
                self.patch_relations)
        for name in self.patch_relations:
            require_choice(name, "patch_relations", RELATIONS)
        require(len(self.sae_kinds) > 0, "sae_kinds", f"one or more of {', '.join(SAE_KINDS)}", self.sae_kinds)
        for name in self.sae_kinds:
            require_choice(name, "sae_kinds", SAE_KINDS)
        for name in ("sae_corpus", "sae_demonstrations", "dashboard_features"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))


QUICK = InterpStudyConfig(
    assistant=QUICK_ASSISTANT,
    lens_questions=100,
    concept=ConceptConfig(n=30),
    sae_kinds=("topk",),
    sae=SAEConfig(batch_size=1024, steps=300, log_every=100),
    sae_corpus=2000, sae_demonstrations=1000,
    steering=RefusalDirectionConfig(n_direction=32, n_validation=24, n_harmful=24, jailbroken=6, per_kind=10,
                                    scales=(0.75,)),
    patching=FactPatchingConfig(n_pairs=24),
    patch_relations=("capital",),
    monitor=HarmfulMonitorConfig(n=120, n_eval=30, samples=2),
)


def study_config(quick: bool = False, seed: int = 0, device: str = "auto", **changes) -> InterpStudyConfig:
    """The default study (or the ``quick`` one) on ``seed`` and ``device``, with ``changes`` to its fields."""
    return seeded(replace(QUICK if quick else InterpStudyConfig(), **changes), seed, device)


def seeded(config: InterpStudyConfig, seed: int, device: str) -> InterpStudyConfig:
    """``config`` with the study, its world and its trainings on ``seed`` and ``device``."""
    return replace(config, seed=seed, device=device, world=replace(config.world, seed=seed),
                   assistant=config.assistant.seeded(seed, device), concept=replace(config.concept, seed=seed),
                   sae=replace(config.sae, seed=seed),
                   steering=replace(config.steering, seed=seed), patching=replace(config.patching, seed=seed),
                   monitor=replace(config.monitor, seed=seed))


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
    """A world assistant as the align study makes it (:func:`~safetylab.models.train.train_world_assistant`)."""
    return train_world_assistant(world_of(ctx), ctx.stage_dir("model"), ctx.config.assistant)


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


def probes_stage(ctx: Context) -> Section:
    """A probe per concept and layer (``resid_post``), fitted on the train split and scored on the test split,
    beside the same recipe on the concept's control task."""
    cfg = ctx.config
    model, tokenizer, hooks = loaded(ctx)
    world, names = world_of(ctx), hooks.names_like("resid_post")
    rows, data, unprobed = [], {}, []
    for name in cfg.concepts:
        splits = {split: concept(name, world, split, cfg.concept, model, tokenizer) for split in ("train", "test")}
        missing = [f"no {split} prompt labelled {label}" for split, c in splits.items()
                   for label, n in c.counts().items() if n == 0]
        if missing:  # an SFT model that never complies leaves will_comply with one label
            unprobed.append(f"{name} ({'; '.join(missing)})")
            continue
        scores = probe_by_layer(hooks, tokenizer, splits["train"], splits["test"], names)
        data[name] = {hook: score.to_dict() for hook, score in scores.items()}
        rows += [[name, hook, s.accuracy, s.control_accuracy, s.selectivity, s.majority, len(splits["test"])]
                 for hook, s in scores.items()]
    best = {name: max(layers.values(), key=lambda s: s["selectivity"]) for name, layers in data.items()}
    summary = "; ".join(f"{name} {b['accuracy']:.2f} (selectivity {b['selectivity']:.2f}, {b['hook']})"
                        for name, b in best.items())
    return Section(
        title="Linear probes for world concepts, by layer, with control tasks",
        summary=f"held-out probe accuracy at the most selective layer: {summary}"
                + (f"; not probed: {', '.join(unprobed)}" if unprobed else ""),
        tables=[Table("Probe accuracy on the test split; control: the same probe on random labels per prompt type "
                      "(Hewitt & Liang 2019); selectivity = accuracy − control"
                      + (f" ({', '.join(NEEDS_MODEL)}: labels from the model's own answers, gold judge)"),
                      ["concept", "stream", "accuracy", "control accuracy", "selectivity", "majority class",
                       "test prompts"], rows)],
        data={"probes": data, "unprobed": unprobed},
    )


def sae_stage(ctx: Context) -> Section:
    """One SAE of each kind on the stream at ``sae_hook``, trained on the world's text and measured on held-out
    text; each saved, and the last kind's densest live latents as a dashboard. The world's text fits in memory,
    so its activations are read once and every kind trains on them in shuffled minibatches (a model whose text
    does not fit streams through :class:`~safetylab.interp.store.ActivationStore` instead)."""
    cfg, out = ctx.config, ctx.stage_dir("sae")
    _, tokenizer, hooks = loaded(ctx)
    name = cfg.sae_hook or f"blocks.{hooks.n_layers // 2}.resid_post"
    hooks.check_name(name)
    train, held = world_batches(world_of(ctx), tokenizer, cfg.sae_corpus, cfg.sae_demonstrations, seed=cfg.seed,
                                max_length=getattr(hooks.model.config, "max_position_embeddings", None))
    acts, held_acts = collect_activations(hooks, name, train), collect_activations(hooks, name, held)
    meta = {"model_signature": model_signature(hooks.model), "hook": name}
    rows, data = [], {}
    for kind in cfg.sae_kinds:
        sae, _ = train_sae(acts, replace(cfg.sae, kind=kind, d_in=acts.shape[-1]))
        sae.save(out / kind, meta)
        m, ce = sae_metrics(sae, held_acts).as_dict(), ce_loss_recovered(hooks, sae, name, held)
        rows.append([kind, sae.config.width, m["l0"], m["explained_variance"], ce["ce_clean"], ce["ce_sae"],
                     ce["ce_ablated"], ce["recovered"], m["dead"], m["dense"]])
        data[kind] = {"metrics": m, "ce": ce, "sae": ctx.run.relative(out / kind)}
    texts = [tokenizer.decode(b.input_ids[i, : b.last[i] + 1]) for b in held[:4] for i in range(len(b.last))]
    density = feature_density(sae, held_acts)
    live = [int(i) for i in density.argsort(descending=True) if density[i] > 0]
    dashboard = feature_dashboard(sae, hooks, name, tokenizer, texts, live[: cfg.dashboard_features],
                                  out / "dashboard.html", title=f"{sae.config.kind} SAE latents at {name}")
    best = max(rows, key=lambda r: r[7])
    return Section(
        title=f"Sparse autoencoders on {name}",
        summary=f"{best[0]} recovers {best[7]:.3f} of the CE loss at L0 {best[2]:.1f} ({best[1]} latents, explained "
                f"variance {best[3]:.3f}); "
                + ", ".join(f"{r[0]} {r[7]:.3f} at L0 {r[2]:.1f}" for r in rows if r is not best),
        tables=[Table(f"Held-out world text ({len(held_acts)} tokens; trained on {len(acts)} tokens, "
                      f"{cfg.sae.steps} steps of {cfg.sae.batch_size}); CE recovered = (CE_ablated − "
                      "CE_sae) / (CE_ablated − CE_clean), the activation zeroed for CE_ablated; dead: never fired, "
                      "dense: fired on > 10 % of tokens",
                      ["kind", "latents", "L0", "explained variance", "CE clean", "CE with SAE", "CE ablated",
                       "CE recovered", "dead", "dense"], rows)],
        data={"hook": name, **data, "dashboard": ctx.run.relative(dashboard)},
    )


def steer_stage(ctx: Context) -> Section:
    """The refusal direction: a difference of means, its layer chosen on validation prompts; ablated from every
    write to the stream and added at its layer; harmful compliance, over-refusal and KL by the gold judge."""
    cfg, out = ctx.config, ctx.stage_dir("steer")
    model, tokenizer, hooks = loaded(ctx)
    result = refusal_direction_experiment(model, tokenizer, world_of(ctx), cfg.steering, hooks)
    plot_steering(result, out / "steering.png")
    none, ablated, added = (result.condition(c) for c in ("none", "ablation", "addition"))
    columns = ["harmful_compliance", "jailbreak_success", "harmful_refusal", "over_refusal", "accuracy",
               "kl_first_token", "kl_per_token"]
    return Section(
        title="The refusal direction: ablation and addition",
        summary=f"the direction of layer {result.layer} ablated: harmful refusal {none['harmful_refusal']:.2f} → "
                f"{ablated['harmful_refusal']:.2f}, harmful compliance {none['harmful_compliance']:.2f} → "
                f"{ablated['harmful_compliance']:.2f}, jailbreak success {none['jailbreak_success']:.2f} → "
                f"{ablated['jailbreak_success']:.2f} (KL {ablated['kl_per_token']:.3f} a token); added at ×"
                f"{result.scale:g}: over-refusal {none['over_refusal']:.2f} → {added['over_refusal']:.2f} "
                f"(KL {added['kl_per_token']:.2f} a token)",
        tables=[Table("Held-out prompts under each condition (gold judge; KL(steered ‖ unsteered) on harmless "
                      "prompts, at the first response token and per token of the steered model's own answers)",
                      ["condition", "scale", *columns], [[r["condition"], r["scale"], *(r[c] for c in columns)]
                                                         for r in result.conditions]),
                Table("Addition at each scale, held-out harmless prompts", ["scale", "over_refusal", "accuracy",
                      "kl_per_token"], [[r["scale"], r["over_refusal"], r["accuracy"], r["kl_per_token"]]
                                        for r in result.sweep]),
                Table("Prompts", ["set", "n"], [[k, v] for k, v in result.counts.items()])],
        plots=[ctx.run.relative(out / "steering.png")],
        transcripts=result.examples,
        data={k: v for k, v in result.to_dict().items() if k != "examples"},
    )


def patch_stage(ctx: Context) -> Section:
    """Causal tracing of fact recall, one relation at a time: clean into corrupted (another country)."""
    cfg, out = ctx.config, ctx.stage_dir("patch")
    _, tokenizer, hooks = loaded(ctx)
    results = {relation: fact_recall_patching(hooks, tokenizer, world_of(ctx), replace(cfg.patching, relation=relation))
               for relation in cfg.patch_relations}
    plots = []
    for relation, r in results.items():
        parts = {"residual stream": r.resid, "attention out": r.attn, "MLP out": r.mlp}
        plots.append(plot_patching(parts, out / f"{relation}.png", f"Where the {relation} is recalled "
                                   f"({cfg.patching.mode})", r.tokens))
        if r.heads is not None:
            plots.append(plot_patching({"heads (all positions)": r.heads}, out / f"{relation}-heads.png"))
    rows = []
    for relation, r in results.items():
        top = r.summary()
        for part in ("top_resid", "top_attn", "top_mlp", "top_heads"):
            best = top[part][0] if top[part] else None
            if best is not None:
                where = best.get("token", f"head {best.get('head')}")
                rows.append([relation, part.removeprefix("top_"), best["name"], where, best["score"]])
    first = next(iter(results.values())).summary()
    attn, mlp = first["top_attn"][0], first["top_mlp"][0]
    return Section(
        title="Activation patching: where facts are recalled",
        summary=f"{first['relation']} ({first['pairs']} country pairs, logit difference {first['ld_clean']:.1f} clean, "
                f"{first['ld_corrupt']:.1f} corrupted): attention writes most at {attn['name']} on "
                f"{attn['token']!r} ({attn['score']:.2f}), the MLP at {mlp['name']} on {mlp['token']!r} "
                f"({mlp['score']:.2f})",
        tables=[Table(f"The cell of highest normalised score ({cfg.patching.mode}: 1 = the clean run's logit "
                      "difference, 0 = the corrupted run's)", ["relation", "part", "hook point", "token or head",
                                                                "score"], rows)],
        plots=[ctx.run.relative(p) for p in plots],
        data={relation: r.summary() for relation, r in results.items()},
    )


def monitor_stage(ctx: Context) -> Section:
    """The harmful-intent monitors: a probe, and (when the ``sae`` stage ran) the SAE latent that best separates
    harmful from benign prompts; each fitted, calibrated to the target FPR, rated on held-out jailbreaks."""
    cfg, out = ctx.config, ctx.stage_dir("monitor")
    _, tokenizer, hooks = loaded(ctx)
    results = {"probe": harmful_intent_monitor(hooks, tokenizer, world_of(ctx), cfg.monitor)}
    sae = study_sae(ctx, hooks)
    if sae is not None:
        results["feature"] = harmful_intent_monitor(hooks, tokenizer, world_of(ctx), cfg.monitor, *sae)
    paths = {kind: out / name for kind, name in (("probe", "harmful-intent"), ("feature", "harmful-intent-feature"))}
    for kind, result in results.items():
        save_monitor(result.monitor, paths[kind])
    probe = results["probe"]
    r = probe.report
    measures = [("AUROC", lambda x: x.report.auroc), ("TPR at the threshold", lambda x: x.report.tpr),
                ("FPR at the threshold (wrapped benign)", lambda x: x.report.fpr),
                ("FPR on plain benign prompts", lambda x: x.fpr_plain_benign),
                ("FPR at 95 % TPR", lambda x: x.report.fpr_at_95_tpr), ("validation FPR", lambda x: x.validation_fpr),
                ("jailbroken prompts complied with", lambda x: x.complied), ("TPR on those", lambda x: x.tpr_complied),
                ("hook point", lambda x: x.hook),
                ("latent", lambda x: f"#{x.monitor.feature}" if hasattr(x.monitor, "feature") else ""),
                ("threshold", lambda x: x.threshold),
                ("jailbroken / benign wrapped test prompts",
                 lambda x: f"{x.report.n_positives} / {x.report.n_negatives}")]
    complied = ("the model complied with none of them" if probe.tpr_complied is None else
                f"it flags {probe.tpr_complied:.0%} of the {probe.complied} the model complied with (gold judge)")
    feature = results.get("feature")
    return Section(
        title="Monitors for harmful intent: a probe and an SAE latent",
        summary=f"calibrated to {cfg.monitor.fpr:.0%} FPR, the probe catches {r.tpr:.0%} of held-out jailbroken "
                f"harmful prompts at {r.fpr:.1%} FPR on benign prompts under the same wrappers (AUROC {r.auroc:.3f}); "
                + complied + ("" if feature is None else
                              f"; the best SAE latent ({feature.hook} #{feature.monitor.feature}) catches "
                              f"{feature.report.tpr:.0%} at {feature.report.fpr:.1%} FPR "
                              f"(AUROC {feature.report.auroc:.3f})"),
        tables=[Table("The harmful-intent monitors on the test split (positives: jailbroken harmful requests; "
                      "negatives: benign requests under the same wrappers); the probe's threshold is in log-odds, "
                      "the latent's in its activation", ["measure", *results],
                      [[name, *(value(x) for x in results.values())] for name, value in measures])],
        data={**probe.to_dict(), "monitor": ctx.run.relative(paths["probe"]),
              **({} if feature is None else
                 {"feature": {**feature.to_dict(), "monitor": ctx.run.relative(paths["feature"])}})},
    )


def study_sae(ctx: Context, hooks: Hooks):
    """``(sae, hook)``: the ``sae`` stage's SAE of the highest CE recovered, or None when that stage has not run."""
    try:
        section = ctx.section("sae")
    except SafetylabError:
        return None
    kinds = [k for k in SAE_KINDS if k in section.data]
    best = max(kinds, key=lambda k: section.data[k]["ce"]["recovered"])
    return load_sae(ctx.path(section.data[best]["sae"]), hooks, section.data["hook"])[0], section.data["hook"]


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
    Stage("probes", "linear probes by layer with control tasks", probes_stage),
    Stage("sae", "sparse autoencoders of each kind on a residual stream", sae_stage),
    Stage("steer", "the refusal direction, ablated and added", steer_stage),
    Stage("patch", "activation patching of fact recall", patch_stage),
    Stage("monitor", "the harmful-intent monitors: a probe and an SAE latent", monitor_stage),
)
