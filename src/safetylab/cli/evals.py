"""``safetylab eval``: a policy on held-out world prompts, scored by the gold judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import Device, Seed, options, print_table

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
evals_app = typer.Typer(help="Evaluations: safety benchmarks on the world, your own datasets, any model or "
                             "OpenAI-compatible endpoint; logs Inspect can open.", no_args_is_help=True)


@evals_app.command("run")
def run(
    model: Annotated[Path | None, typer.Option(help="A model directory (HF save_pretrained with a chat template).")]
    = None,
    endpoint: Annotated[str | None, typer.Option(help="An OpenAI-compatible base URL instead of --model "
                                                      "(http://127.0.0.1:8000/v1 for `safetylab serve`).")] = None,
    model_name: Annotated[str, typer.Option(help="The model's name at --endpoint.")] = "safetylab-world",
    api_key_file: Annotated[Path | None, typer.Option(help="A file holding the endpoint's API key (default: the "
                                                           "SAFETYLAB_API_KEY environment variable).")] = None,
    dataset: Annotated[Path | None, typer.Option(help="A JSONL dataset ({input, target, id, metadata} a line), "
                                                      "scored by whether the target appears in the answer; "
                                                      "default: the world's safety benchmark.")] = None,
    per_kind: Annotated[int, typer.Option(help="World prompts per request kind.")] = 60,
    jailbroken: Annotated[int, typer.Option(help="Harmful prompts per jailbreak wrapper.")] = 12,
    controls: Annotated[int, typer.Option(help="Benign prompts per jailbreak wrapper.")] = 12,
    judge: Annotated[Path | None, typer.Option(help="A text classifier directory (`control build-guard` writes "
                                                    "them) scoring harmful answers beside the gold judge.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 48,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 1.0,
    concurrency: Annotated[int, typer.Option(help="Samples in flight.")] = 64,
    resume: Annotated[bool, typer.Option(help="Skip the samples an earlier run of the same task logged.")] = True,
    out: Annotated[Path, typer.Option("--out", "-o", help="The log directory.")] = Path("runs/evals"),
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    """Run an evaluation against a model or an endpoint; write its Inspect log (inspect view --log-dir OUT)."""
    import os

    from safetylab.core.errors import SafetylabError
    from safetylab.evals.harness import Task, generate, includes, metrics_table, read_dataset, run_task
    from safetylab.evals.targets import GenerateConfig

    if (model is None) == (endpoint is None):
        raise SafetylabError("give --model DIR or --endpoint URL (one of them)")
    with options("max_tokens", "temperature"):
        config = GenerateConfig(max_tokens=max_tokens, temperature=temperature)
    for name, value in (("per_kind", per_kind), ("jailbroken", jailbroken), ("controls", controls),
                        ("concurrency", concurrency)):
        if value < (1 if name in ("per_kind", "concurrency") else 0):
            raise SafetylabError(f"--{name.replace('_', '-')}: expected an integer >= "
                                 f"{1 if name in ('per_kind', 'concurrency') else 0}, got {value}")
    target = None
    if endpoint is not None:
        from safetylab.evals.targets import OpenAITarget

        key = api_key_file.read_text().strip() if api_key_file is not None else os.environ.get("SAFETYLAB_API_KEY")
        target = OpenAITarget(endpoint, model_name, key, max_connections=concurrency)
    elif not (model / "config.json").is_file():
        raise SafetylabError(f"--model: {model} is not a model directory (no config.json)")
    if dataset is not None:
        task = Task(dataset.stem.replace(".", "_") or "dataset", read_dataset(dataset), includes, generate(config),
                    group_by=None)
    else:
        from safetylab.evals.suites import classifier_judge, safety_task
        from safetylab.world import World, WorldConfig

        learned = None
        if judge is not None:
            from safetylab.control.classifier import load_text_classifier

            learned = classifier_judge(load_text_classifier(judge))
        task = safety_task(World(WorldConfig(seed=seed)), per_kind, jailbroken, controls, seed=seed, learned=learned,
                           config=config)
    if target is None:
        from safetylab.core.devices import select_device
        from safetylab.core.seeding import seed_everything
        from safetylab.evals.targets import LocalTarget
        from safetylab.models.lm import load_model

        served, tokenizer = load_model(model, select_device(device))
        seed_everything(seed)
        target = LocalTarget(served, tokenizer, name=model.name)
    result = run_task(task, target, out, concurrency=concurrency, resume=resume)
    rows = [[r["group"], r["metric"], f"{r['value']:.3f}", f"[{r['low']:.3f}, {r['high']:.3f}]", r["n"]]
            for r in metrics_table(result)]
    print_table(["group", "metric", "value", "95% interval", "n"], rows,
                f"{task.name} on {target.name}: {len(result.records)} samples, {result.errors} failed")
    print(f"log: {result.log} (inspect view --log-dir {out})")
