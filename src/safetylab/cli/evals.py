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
