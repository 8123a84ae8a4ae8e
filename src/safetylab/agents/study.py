"""The gridworld study: every environment × agent × applicable mitigation, observed return against the
hidden performance (:mod:`.experiment`). ``safetylab agents report`` runs it; the audit composes it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from safetylab.agents.experiment import DEEP_TIMESTEPS, check_training, run_suite, suite_runs
from safetylab.core.runs import RunDir
from safetylab.core.study import Context, Section, Stage, Table


@dataclass(frozen=True)
class AgentsStudyConfig:
    """One seed of the suite with the tabular agents; ``episodes`` per run (None: each environment's own,
    3,000, or 6,000 for Sokoban)."""

    seed: int = 0
    episodes: int | None = None

    def __post_init__(self):
        check_training([self.seed], self.episodes, DEEP_TIMESTEPS)


QUICK = AgentsStudyConfig(episodes=400)


def study_config(quick: bool = False, seed: int = 0) -> AgentsStudyConfig:
    return replace(QUICK if quick else AgentsStudyConfig(), seed=seed)


def gridworlds_stage(ctx: Context) -> Section:
    """Each environment, agent and mitigation trained and evaluated (greedy, on the test layout where there
    is one): the reward the agent sees against the performance it delivers."""
    cfg, out = ctx.config, ctx.stage_dir("gridworlds")
    run = RunDir(out, {"seed": cfg.seed, "episodes": cfg.episodes})
    rows = run_suite(run, suite_runs(), [cfg.seed], cfg.episodes)
    columns = ["environment", "agent", "mitigation", "eval_return", "eval_performance", "gap", "unsafe"]
    gaming = [r for r in rows if r["mitigation"] == "none" and r["gap"] > 1]
    plots = [run.plots / name for name in ("offswitch.png", "BoatRace-curves.png", "SafeInterruptibility-curves.png")]
    return Section(
        title="Safety gridworlds: reward against hidden performance",
        summary=f"{len(gaming)} of {sum(r['mitigation'] == 'none' for r in rows)} plain agent runs earn more "
                f"reward than performance; {len(rows)} runs",
        tables=[Table("Greedy policy after training (evaluation: the test layout where there is one); gap = "
                      "return − performance; unsafe = training episodes with a hidden penalty",
                      columns, [[r[c] for c in columns] for r in rows])],
        plots=[ctx.run.relative(p) for p in plots],
        data={"rows": rows, "records": ctx.run.relative(out / "records.jsonl")},
    )



STAGES = (Stage("gridworlds", "safety gridworlds: agents, hidden performance, mitigations", gridworlds_stage),)
