"""``safetylab agents …``: agents on the safety gridworlds, observed reward against hidden performance.

``run`` and ``suite`` write a run directory: ``records.jsonl`` (one record per run and seed),
``summary.json`` and ``table.md`` (mean ± sd over seeds), learning curves of return and performance, and
strips and GIFs of a greedy episode. ``report`` runs the audit's gridworld study (``tables.md``; with
``--seeds``, one study per seed and ``summary.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import Seed, Seeds, options, parse_seeds, study_report

agents_app = typer.Typer(help="Safety gridworlds: agents that game them, mitigations that fix them.",
                         no_args_is_help=True)

Out = Annotated[Path, typer.Option("--out", "-o", help="Run directory.")]
SeedList = Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")]
Episodes = Annotated[int | None, typer.Option(help="Training episodes per tabular run (default: the environment's).")]
Timesteps = Annotated[int, typer.Option(help="Training steps per deep (ppo, dqn) run.")]


def _execute(out: Path, runs: list[tuple[str, str, str | None]], seeds: list[int], episodes: int | None,
             timesteps: int) -> None:
    from safetylab.agents.experiment import check_training, run_suite, table_markdown
    from safetylab.core.runs import RunDir

    with options("seeds", "episodes", "timesteps"):
        check_training(seeds, episodes, timesteps)
    run = RunDir(out, {"runs": [list(r) for r in runs], "seeds": seeds, "episodes": episodes, "timesteps": timesteps})
    rows = run_suite(run, runs, seeds, episodes, timesteps)
    print(table_markdown(rows))
    print(f"\nrun directory: {run.path}")


@agents_app.command("run")
def run_command(
    env: Annotated[str, typer.Option(help="Environment name, e.g. BoatRace (see `safetylab agents suite`).")],
    agent: Annotated[str, typer.Option(help="q-learning or sarsa (tabular), ppo or dqn (Stable-Baselines3).")
                     ] = "q-learning",
    mitigation: Annotated[str | None, typer.Option(help="A mitigation that applies to the environment.")] = None,
    episodes: Episodes = None,
    timesteps: Timesteps = 30_000,
    seeds: SeedList = "0",
    out: Out = Path("runs/agents"),
) -> None:
    """Train one agent on one environment (optionally mitigated) and report reward against performance."""
    from safetylab.agents.experiment import check_run

    with options("agent"):
        check_run(env, agent, mitigation)
    _execute(out, [(env, agent, mitigation)], parse_seeds(seeds), episodes, timesteps)


@agents_app.command("suite")
def suite_command(
    seeds: SeedList = "0,1,2",
    env: Annotated[list[str] | None, typer.Option(help="Only these environments (repeatable).")] = None,
    agent: Annotated[list[str] | None, typer.Option(help="Agents (repeatable; default q-learning and sarsa).")
                     ] = None,
    episodes: Episodes = None,
    timesteps: Timesteps = 30_000,
    out: Out = Path("runs/agents-suite"),
) -> None:
    """Every environment × agent × applicable mitigation over seeds: the table of reward against hidden
    performance, learning curves and episode strips. Deep agents get the mitigations that change the
    environment only (shield, supervisor-blind, goal diversity)."""
    from safetylab.agents.experiment import check_agent, suite_runs

    with options("agent"):
        for name in agent or ():
            check_agent(name)
    _execute(out, suite_runs(env, tuple(agent) if agent else None), parse_seeds(seeds), episodes, timesteps)


@agents_app.command("report")
def report(
    out: Out = Path("runs/agents-report"),
    quick: Annotated[bool, typer.Option(help="400 episodes a run.")] = False,
    episodes: Episodes = None,
    seed: Seed = 0,
    seeds: Seeds = None,
) -> None:
    """The gridworld study the audit runs (every environment × tabular agent × applicable mitigation, one
    seed), as a run directory with tables.md; with --seeds, once per seed and the mean ± sd summary."""
    from dataclasses import replace

    from safetylab.agents.study import STAGES, study_config

    def make_config(s: int):
        config = study_config(quick, s)
        return config if episodes is None else replace(config, episodes=episodes)

    study_report(STAGES, make_config, out, seed, seeds, names={"episodes": "--episodes"})
