"""``safetylab eval``: a policy on held-out world prompts, scored by the gold judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import Device, Seed, Seeds, options, print_table, study_report

Out = Annotated[Path | None, typer.Option("--out", "-o", help="Also write the results as JSON here.")]


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
    from safetylab.align.evaluate import METRICS, EvalConfig, evaluate_policy
    from safetylab.core.devices import select_device
    from safetylab.core.seeding import seed_everything
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
    print_table(["kind", "n", *METRICS], [[kind, m["n"], *(m[k] for k in METRICS)] for kind, m in rows.items()],
                f"{model}: gold-judge evaluation")


# ----------------------------------------------------------------------------- safetylab evals …
evals_app = typer.Typer(help="Evaluations: safety benchmarks, capabilities and red teaming on the world, your own "
                             "datasets; any model or OpenAI-compatible endpoint; logs Inspect can open.",
                        no_args_is_help=True)

ModelDir = Annotated[Path | None, typer.Option("--model", help="A model directory (HF save_pretrained with a chat "
                                                               "template).")]
Endpoint = Annotated[str | None, typer.Option(help="An OpenAI-compatible base URL instead of --model "
                                                   "(http://127.0.0.1:8000/v1 for `safetylab serve`).")]
ModelName = Annotated[str, typer.Option(help="The model's name at --endpoint.")]
KeyFile = Annotated[Path | None, typer.Option(help="A file holding the endpoint's API key (default: the "
                                                   "SAFETYLAB_API_KEY environment variable).")]
Judge = Annotated[Path | None, typer.Option(help="A text classifier directory (`control build-guard` writes them) "
                                                 "judging harmful answers beside the gold judge, or `keywords` for "
                                                 "GCG's refusal-phrase check.")]
MaxTokens = Annotated[int, typer.Option(help="Tokens per answer.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")]
Concurrency = Annotated[int, typer.Option(help="Samples in flight.")]
Resume = Annotated[bool, typer.Option(help="Skip the samples an earlier run of the same task logged.")]
LogDir = Annotated[Path, typer.Option("--out", "-o", help="The log directory.")]


def _check(model, endpoint, counts: dict[str, tuple[int, int]], max_tokens: int, temperature: float):
    """The options' values, checked before anything is loaded; returns the generation settings."""
    from safetylab.core.errors import SafetylabError
    from safetylab.evals.targets import GenerateConfig

    if (model is None) == (endpoint is None):
        raise SafetylabError("give --model DIR or --endpoint URL (one of them)")
    with options("max_tokens", "temperature"):
        config = GenerateConfig(max_tokens=max_tokens, temperature=temperature)
    for name, (value, low) in counts.items():
        if value < low:
            raise SafetylabError(f"--{name.replace('_', '-')}: expected an integer >= {low}, got {value}")
    return config


def _endpoint_target(endpoint, model_name, api_key_file, concurrency):
    """The endpoint's target (cheap: made before the task, so a bad URL fails first); None for --model."""
    import os

    from safetylab.evals.targets import OpenAITarget

    if endpoint is None:
        return None
    key = api_key_file.read_text().strip() if api_key_file is not None else os.environ.get("SAFETYLAB_API_KEY")
    with options(base_url="--endpoint"):
        return OpenAITarget(endpoint, model_name, key, max_connections=concurrency)


def _model_target(model: Path, seed: int, device: str):
    from safetylab.core.devices import select_device
    from safetylab.core.errors import SafetylabError
    from safetylab.core.seeding import seed_everything
    from safetylab.evals.targets import LocalTarget
    from safetylab.models.lm import load_model

    if not (model / "config.json").is_file():
        raise SafetylabError(f"--model: {model} is not a model directory (no config.json)")
    served, tokenizer = load_model(model, select_device(device))
    seed_everything(seed)
    return LocalTarget(served, tokenizer, name=model.name)


def _learned_judge(judge: Path | None):
    from safetylab.evals.suites import load_judge

    return None if judge is None else load_judge(judge)


def _report(task, target, out: Path, concurrency: int, resume: bool):
    from safetylab.evals.harness import metrics_table, run_task

    result = run_task(task, target, out, concurrency=concurrency, resume=resume)
    rows = [[r["group"], r["metric"], f"{r['value']:.3f}", f"[{r['low']:.3f}, {r['high']:.3f}]", r["n"]]
            for r in metrics_table(result)]
    print_table(["group", "metric", "value", "95% interval", "n"], rows,
                f"{task.name} on {target.name}: {len(result.records)} samples, {result.errors} failed")
    print(f"log: {result.log} (inspect view --log-dir {out})")
    return result


@evals_app.command("run")
def run(
    model: ModelDir = None, endpoint: Endpoint = None, model_name: ModelName = "safetylab-world",
    api_key_file: KeyFile = None,
    suite: Annotated[str, typer.Option(help="safety (harmful compliance, over-refusal, sycophancy, calibration, "
                                            "jailbreaks by wrapper) or capabilities (accuracy by tier).")]
    = "safety",
    dataset: Annotated[Path | None, typer.Option(help="A JSONL dataset ({input, target, id, metadata} a line) "
                                                      "instead of a suite, scored by whether the target appears "
                                                      "in the answer.")] = None,
    per_kind: Annotated[int, typer.Option(help="World prompts per request kind (per tier for capabilities).")] = 60,
    jailbroken: Annotated[int, typer.Option(help="Harmful prompts per jailbreak wrapper.")] = 12,
    controls: Annotated[int, typer.Option(help="Benign prompts per jailbreak wrapper.")] = 12,
    judge: Judge = None, max_tokens: MaxTokens = 48, temperature: Temperature = 1.0, concurrency: Concurrency = 64,
    resume: Resume = True, out: LogDir = Path("runs/evals"), seed: Seed = 0, device: Device = "auto",
) -> None:
    """Evaluate a model or an endpoint on a world suite or a dataset; write an Inspect log (inspect view
    --log-dir OUT)."""
    from safetylab.core.config import require_choice
    from safetylab.evals.harness import Task, generate, includes, read_dataset

    config = _check(model, endpoint, {"per_kind": (per_kind, 1), "jailbroken": (jailbroken, 0),
                                      "controls": (controls, 0), "concurrency": (concurrency, 1)},
                    max_tokens, temperature)
    with options("suite"):
        require_choice(suite, "suite", ("safety", "capabilities"))
    target = _endpoint_target(endpoint, model_name, api_key_file, concurrency)
    if dataset is not None:
        task = Task(dataset.stem.replace(".", "_") or "dataset", read_dataset(dataset), includes, generate(config),
                    group_by=None)
    else:
        from safetylab.evals.capabilities import capability_task
        from safetylab.evals.suites import safety_task
        from safetylab.world import World, WorldConfig

        world = World(WorldConfig(seed=seed))
        task = capability_task(world, per_kind, seed, config) if suite == "capabilities" else safety_task(
            world, per_kind, jailbroken, controls, seed=seed, learned=_learned_judge(judge), config=config)
    _report(task, target or _model_target(model, seed, device), out, concurrency, resume)


@evals_app.command("redteam")
def redteam(
    model: ModelDir = None, endpoint: Endpoint = None, model_name: ModelName = "safetylab-world",
    api_key_file: KeyFile = None,
    n: Annotated[int, typer.Option(help="Held-out harmful requests, each under every attack.")] = 20,
    attacks: Annotated[str | None, typer.Option(help="Comma-separated attacks (default: all; `none` is the plain "
                                                     "request).")] = None,
    save_attacks: Annotated[Path | None, typer.Option(help="Write the attacks that worked here, as preference "
                                                           "JSONL (the world's refusal chosen over the answer).")]
    = None,
    judge: Judge = None, max_tokens: MaxTokens = 48, temperature: Temperature = 1.0, concurrency: Concurrency = 64,
    resume: Resume = True, out: LogDir = Path("runs/evals"), seed: Seed = 0, device: Device = "auto",
) -> None:
    """Attack a model or an endpoint with template, composed and mutated jailbreaks on held-out harmful requests:
    the attack success rate of each, by the gold judge, with 95% intervals."""
    from safetylab.evals.redteam import ATTACKS, redteam_task, successful_attacks
    from safetylab.world import World, WorldConfig

    config = _check(model, endpoint, {"n": (n, 1), "concurrency": (concurrency, 1)}, max_tokens, temperature)
    chosen = tuple(a.strip() for a in attacks.split(",")) if attacks else ATTACKS
    world = World(WorldConfig(seed=seed))
    with options("attacks"):
        task = redteam_task(world, n, chosen, seed=seed, learned=_learned_judge(judge), config=config)
    target = _endpoint_target(endpoint, model_name, api_key_file, concurrency) or _model_target(model, seed, device)
    result = _report(task, target, out, concurrency, resume)
    if save_attacks is not None:
        from safetylab.core.io import write_jsonl

        count = write_jsonl(save_attacks, successful_attacks(result, world, seed))
        print(f"{count} successful attacks written to {save_attacks}")


@evals_app.command("report")
def report(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/evals-study"),
    model: Annotated[Path | None, typer.Option(help="The model to evaluate (default: train a world assistant, base "
                                                    "and SFT, in the run directory).")] = None,
    base: Annotated[Path | None, typer.Option(help="The pre-trained model --model was fine-tuned from.")] = None,
    guard: Annotated[Path | None, typer.Option(help="A guard file (`control build-guard`): the model is also "
                                                    "attacked behind its text layers.")] = None,
    judge: Judge = None,
    attacker: Annotated[bool, typer.Option(help="Also train an attacker by RL against the model (minutes).")]
    = False,
    quick: Annotated[bool, typer.Option(help="A smaller model, fewer prompts.")] = False,
    seed: Seed = 0, seeds: Seeds = None, device: Device = "auto",
) -> None:
    """The evals study: the safety benchmark, red teaming and capabilities of each model, with 95% intervals and
    an Inspect log per run."""
    from safetylab.core.errors import SafetylabError
    from safetylab.evals.attacker import AttackerConfig
    from safetylab.evals.study import STAGES, study_config

    given = {"sft": model, "base": base, "guard": guard, "judge": judge}
    if any(v is not None for v in given.values()) and seeds is not None:
        raise SafetylabError("--model, --base, --guard or --judge with --seeds: they belong to one seed; drop one")
    if base is not None and model is None:
        raise SafetylabError("--base: give the --model it goes with")
    if attacker and model is not None and base is None:
        raise SafetylabError("--attacker: give --base too (the attacker starts from the pre-trained model)")
    for name, path in given.items():
        if path is not None and not path.exists() and not (name == "judge" and str(path) == "keywords"):
            raise SafetylabError(f"--{'model' if name == 'sft' else name}: {path} does not exist")
    inputs = {k: str(v) for k, v in given.items() if v is not None} or None
    changes = {"attacker": AttackerConfig()} if attacker else {}
    study_report(STAGES, lambda s: study_config(quick, s, device, **changes), out, seed, seeds, None, inputs,
                 {"device": "--device"})
