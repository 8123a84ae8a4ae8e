"""``safetylab agents …``: agents on the safety gridworlds, observed reward against hidden performance.

Both commands write a run directory: ``records.jsonl`` (one record per run and seed), ``summary.json``
and ``table.md`` (mean ± sd over seeds), learning curves of return and performance, and strips and GIFs
of a greedy episode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

agents_app = typer.Typer(help="Safety gridworlds: agents that game them, mitigations that fix them.",
                         no_args_is_help=True)

Out = Annotated[Path, typer.Option("--out", "-o", help="Run directory.")]
Seeds = Annotated[str, typer.Option(help="Comma-separated seeds.")]
Episodes = Annotated[int | None, typer.Option(help="Training episodes per run (default: the environment's).")]


def _seeds(text: str) -> list[int]:
    from safetylab.core.errors import SafetylabError

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SafetylabError(f"--seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds:
        raise SafetylabError("--seeds: expected at least one seed")
    return seeds


def _execute(out: Path, runs: list[tuple[str, str, str | None]], seeds: list[int], episodes: int | None) -> None:
    import safetylab.agents  # noqa: F401  (registers the environments)
    from safetylab.agents.experiment import (
        PLANS,
        episode_frames,
        plot_learning_curves,
        run_experiment,
        save_episode,
        summarize,
    )
    from safetylab.core.progress import Progress
    from safetylab.core.runs import RunDir

    run = RunDir(out, {"runs": [list(r) for r in runs], "seeds": seeds, "episodes": episodes})
    records, histories = [], {}
    with Progress("agents", len(runs) * len(seeds)) as progress:
        for environment, agent, mitigation in runs:
            label = f"{agent}" + (f" + {mitigation}" if mitigation else "")
            for seed in seeds:
                record, history, learner = run_experiment(environment, agent, mitigation, seed, episodes)
                records.append(record)
                histories.setdefault(environment, {}).setdefault(label, []).append(history)
                if seed == seeds[0]:
                    frames = episode_frames(environment, learner, **PLANS[environment].test_kwargs)
                    name = f"{environment}-{label.replace(' + ', '-')}"
                    save_episode(frames, run.plots / f"{name}.png")
                    save_episode(frames, run.plots / f"{name}.gif")
                progress.advance(gap=record["gap"])
    from safetylab.core.io import atomic_write_text, write_jsonl

    write_jsonl(run.file("records.jsonl"), records)
    rows = summarize(records)
    run.write_json("summary.json", rows)
    for environment, by_label in histories.items():
        plot_learning_curves(by_label, run.plots / f"{environment}-curves.png", environment)
    atomic_write_text(run.file("table.md"), table_markdown(rows))
    print(table_markdown(rows))
    print(f"\nrun directory: {run.path}")


def table_markdown(rows: list[dict]) -> str:
    columns = ("train_return", "train_performance", "eval_return", "eval_performance", "gap", "unsafe")
    lines = ["| environment | agent | mitigation | " + " | ".join(columns) + " |", "|" + "---|" * (3 + len(columns))]
    for r in rows:
        cells = [f"{r[c]:.2f} ± {r[c + '_sd']:.2f}" for c in columns]
        lines.append(f"| {r['environment']} | {r['agent']} | {r['mitigation']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@agents_app.command("run")
def run_command(
    env: Annotated[str, typer.Option(help="Environment name, e.g. BoatRace (see `safetylab agents suite`).")],
    agent: Annotated[str, typer.Option(help="q-learning or sarsa.")] = "q-learning",
    mitigation: Annotated[str | None, typer.Option(help="A mitigation that applies to the environment.")] = None,
    episodes: Episodes = None,
    seeds: Seeds = "0",
    out: Out = Path("runs/agents"),
) -> None:
    """Train one agent on one environment (optionally mitigated) and report reward against performance."""
    from safetylab.agents.experiment import check_environment
    from safetylab.agents.mitigations import check_mitigation
    from safetylab.agents.tabular import AGENTS
    from safetylab.core.errors import SafetylabError

    check_environment(env)
    check_mitigation(mitigation, env)
    if agent not in AGENTS:
        raise SafetylabError(f"--agent must be one of {', '.join(AGENTS)}, got {agent!r}")
    _execute(out, [(env, agent, mitigation)], _seeds(seeds), episodes)


@agents_app.command("suite")
def suite_command(
    seeds: Seeds = "0,1,2",
    env: Annotated[list[str] | None, typer.Option(help="Only these environments (repeatable).")] = None,
    episodes: Episodes = None,
    out: Out = Path("runs/agents-suite"),
) -> None:
    """Every environment × agent × applicable mitigation over seeds: the table of reward against hidden
    performance, learning curves and episode strips."""
    from safetylab.agents.experiment import suite_runs

    _execute(out, suite_runs(env), _seeds(seeds), episodes)
