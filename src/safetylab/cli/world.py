"""``safetylab world …``: the assistant world's prompts, preferences and gold judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import Seed, emit, options
from safetylab.core.config import require, require_choice

world_app = typer.Typer(help="The assistant world: prompts, preferences, the gold judge.", no_args_is_help=True)
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Output file (default: standard output).")]


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
        check_sample(n, split)
        for name in kind or ():
            require_choice(name, "kind", KINDS)
        world = World(WorldConfig(seed=seed))
    emit(world.sample(n, split, style, kinds=tuple(kind or KINDS)), out)


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
        check_labeler(labeler)
        check_sample(n, split)
        world = World(WorldConfig(seed=seed))
    emit(world.preferences(n, labeler, split), out)


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
    emit(records, out)


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



def check_sample(n: int, split: str) -> None:
    from safetylab.world.requests import SPLITS

    require(n >= 1, "n", "an integer >= 1", n)
    require_choice(split, "split", SPLITS)


def check_labeler(labeler: str) -> None:
    from safetylab.world.labelers import PRESETS

    require_choice(labeler, "labeler", PRESETS)
