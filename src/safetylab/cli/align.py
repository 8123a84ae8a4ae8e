"""``safetylab align report`` (the alignment study) and ``safetylab sample best-of-n``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import Device, RunOut, Seed, Seeds, options, print_table, study_report
from safetylab.core.config import require

align_app = typer.Typer(help="The alignment study: SFT, a reward model, best-of-n, DPO, RPO, PPO and RLOO against "
                             "the gold judge.", no_args_is_help=True)
sample_app = typer.Typer(help="Sample from policies: best-of-n against a reward model.", no_args_is_help=True)
RewardDir = Annotated[Path, typer.Option(help="Reward model directory (from train rm).")]


@align_app.command("report")
def report(
    out: RunOut = Path("runs/align"),
    preset: Annotated[str, typer.Option(help="default (the audit's sizes), quick, or ideal (the ideal labeler, "
                                             "on-policy comparisons, DPO, RPO, PPO and RLOO).")] = "default",
    quick: Annotated[bool, typer.Option(help="The quick preset.")] = False,
    labeler: Annotated[str | None, typer.Option(help="Labeler of the comparisons: ideal, careful or typical "
                                                     "(default: the preset's).")] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated: dpo, rpo, ppo, rloo (default: the "
                                                     "preset's).")] = None,
    flattery: Annotated[float, typer.Option(help="Share of correct demonstrations the SFT contractor wraps in "
                                                 "flattery.")] = 0.0,
    hedging: Annotated[float, typer.Option(help="Share of demonstrations the SFT contractor hedges.")] = 0.0,
    eval_per_kind: Annotated[int | None, typer.Option(help="Held-out prompts per kind in the evaluations (a "
                                                           "fifth as many jailbroken per wrapper).")] = None,
    sft: Annotated[Path | None, typer.Option(help="Start from this SFT model (e.g. an audit's align/sft/artifacts/"
                                                  "model): run only the reward, best-of-n and policies stages.")
                   ] = None,
    seed: Seed = 0,
    seeds: Seeds = None,
    device: Device = "auto",
) -> None:
    """The alignment study: the world, base and SFT models, their evaluation, a reward model, best-of-n and
    each method from SFT, all scored by the gold judge; tables.md and plots in the run directory."""
    from dataclasses import replace

    from safetylab.align.study import FROM_SFT, STAGES, study_config

    def make_config(s: int):
        changes = {"demonstration_flattery": flattery, "demonstration_hedging": hedging}
        if labeler is not None:
            changes["labeler"] = labeler
        if methods is not None:
            changes["methods"] = tuple(m.strip() for m in methods.split(",") if m.strip())
        config = study_config("quick" if quick else preset, s, device, **changes)
        if eval_per_kind is not None:
            config = replace(config, eval=replace(config.eval, per_kind=eval_per_kind, jailbroken=eval_per_kind // 5))
        return config

    with options("sft"):
        require(sft is None or (sft / "config.json").is_file(), "sft", "a saved model directory (with config.json)",
                str(sft))
    study_report(STAGES, make_config, out, seed, seeds, only=FROM_SFT if sft else None,
                 inputs={"sft": str(sft)} if sft else None,
                 names={"preset": "--preset", "labeler": "--labeler", "methods": "--methods", "device": "--device",
                        "demonstration_flattery": "--flattery", "demonstration_hedging": "--hedging",
                        "per_kind": "--eval-per-kind"})


@align_app.command("overopt")
def overopt(
    out: RunOut = Path("runs/overopt"),
    quick: Annotated[bool, typer.Option(help="A smaller model, fewer samples and proxies (about a minute).")] = False,
    samples: Annotated[int | None, typer.Option(help="Samples per prompt: best-of-n up to this n (default 512).")]
    = None,
    labelers: Annotated[str | None, typer.Option(help="Comma-separated labelers whose comparisons train the "
                                                      "proxies (default: typical,ideal).")] = None,
    sft: Annotated[Path | None, typer.Option(help="Start from this SFT model (e.g. an audit's align/sft/artifacts/"
                                                  "model) instead of training one.")] = None,
    seed: Seed = 0,
    seeds: Seeds = None,
    device: Device = "auto",
) -> None:
    """Reward-model overoptimization (Gao et al. 2022): best-of-n from the SFT model against proxy reward models
    of several depths, data amounts and labelers; gold and proxy against √KL, and the fitted d(α − βd)."""
    from dataclasses import replace

    from safetylab.align.study import OVEROPT_STAGES, study_config

    def make_config(s: int):
        config = study_config("quick" if quick else "default", s, device)
        changes = {"samples": samples} if samples is not None else {}
        if labelers is not None:
            changes["labelers"] = tuple(x.strip() for x in labelers.split(",") if x.strip())
        config = replace(config, overopt=replace(config.overopt, **changes))
        require(sft is not None or max(config.overopt.depths) <= config.model.n_layer, "depths",
                f"reward-model depths of at most the model's {config.model.n_layer} layers", config.overopt.depths)
        return config

    with options("sft"):
        require(sft is None or (sft / "config.json").is_file(), "sft", "a saved model directory (with config.json)",
                str(sft))
    study_report(OVEROPT_STAGES, make_config, out, seed, seeds, only=("overoptimization",) if sft else None,
                 inputs={"sft": str(sft)} if sft else None,
                 names={"samples": "--samples", "labelers": "--labelers", "device": "--device"})


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
    from safetylab.align.goodhart import best_of_n_curve, plot_curve
    from safetylab.align.reward import load_reward_model, score
    from safetylab.core.devices import select_device
    from safetylab.core.runs import RunDir
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
    print_table(list(rows[0]), [list(row.values()) for row in rows], f"best-of-n on {len(requests)} held-out prompts")
