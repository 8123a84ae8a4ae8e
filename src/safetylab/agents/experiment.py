"""Experiments: train an agent on a gridworld, with or without a mitigation, and compare the reward it
earns with the hidden performance it delivers; the suite runs every environment × agent × mitigation
over seeds.

A run trains a tabular agent for ``episodes`` ε-greedy episodes (a deep one, PPO or DQN, for
``timesteps`` steps) and then evaluates the greedy policy for 100 episodes on the evaluation
environment — the test layout where the environment has one (distributional shift, goal
misgeneralization). Its record: mean return and performance over the last tenth of training and over
the evaluation, the gap between them, and ``unsafe`` — training episodes whose performance fell short
of their return (a hidden penalty: drowning, a cornered box, an unwatched shortcut).
"""

from __future__ import annotations

import gc
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

import gymnasium as gym
import numpy as np
from matplotlib.figure import Figure

from safetylab.agents.deep import DEEP_AGENTS, evaluate_deep, train_deep
from safetylab.agents.envs import ENVIRONMENTS
from safetylab.agents.gridworld import TILES
from safetylab.agents.mitigations import (
    MITIGATIONS,
    check_mitigation,
    familiarity_check,
    mitigated,
    train_with_preferences,
    view_for,
)
from safetylab.agents.tabular import AGENTS, TabularAgent, TabularConfig, evaluate, make_agent, train
from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_bytes, atomic_write_text, save_figure, write_jsonl
from safetylab.core.progress import Progress
from safetylab.core.runs import RunDir


@dataclass(frozen=True)
class EnvironmentPlan:
    episodes: int = 3000
    test_kwargs: dict[str, Any] = field(default_factory=dict)  # the evaluation environment's options
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra evaluations, by name


PLANS: dict[str, EnvironmentPlan] = {
    name: EnvironmentPlan() for name in ENVIRONMENTS
} | {
    "SideEffectsSokoban": EnvironmentPlan(episodes=6000),
    "DistributionalShift": EnvironmentPlan(test_kwargs={"testing": True}),
    "GoalMisgeneralization": EnvironmentPlan(test_kwargs={"testing": True}),
    "FriendFoe": EnvironmentPlan(variants={room: {"room": room} for room in ("friend", "neutral", "adversary")}),
}


def check_environment(name: str) -> str:
    if name not in ENVIRONMENTS:
        raise SafetylabError(f"environment must be one of {', '.join(ENVIRONMENTS)}, got {name!r}")
    return name


DEEP_TIMESTEPS = 30_000
# mitigations that change only the environment: any agent can use them
ENV_ONLY = ("shield", "supervisor-blind", "goal-diversity")


def check_agent(name: str) -> str:
    """``name`` must be an agent of the suite: tabular (q-learning, sarsa) or deep (ppo, dqn)."""
    require_choice(name, "agent", (*AGENTS, *DEEP_AGENTS))
    return name


def check_run(environment: str, agent: str, mitigation: str | None) -> None:
    """An agent, and a mitigation, that can train on ``environment``: checked before any run starts.
    Deep agents take the mitigations that change only the environment."""
    check_environment(environment)
    check_mitigation(mitigation, environment)
    check_agent(agent)
    if agent in DEEP_AGENTS and mitigation not in (None, *ENV_ONLY):
        raise SafetylabError(f"mitigation {mitigation!r} works with the tabular agents ({', '.join(AGENTS)}), "
                             f"not with {agent} (which takes {', '.join(ENV_ONLY)})")


def check_training(seeds: Sequence[int], episodes: int | None, timesteps: int) -> None:
    """How long and over which seeds agents train: checked before any run starts."""
    require(len(seeds) > 0 and min(seeds) >= 0, "seeds", "one or more integers >= 0", list(seeds))
    require(episodes is None or episodes >= 1, "episodes", "an integer >= 1 (or none: the environment's own)",
            episodes)
    require(timesteps >= 1, "timesteps", "an integer >= 1", timesteps)


def run_experiment(environment: str, agent: str, mitigation: str | None = None, seed: int = 0,
                   episodes: int | None = None, timesteps: int = DEEP_TIMESTEPS) -> tuple[dict, list[dict], Any]:
    """Train and evaluate one (environment, agent, mitigation, seed); return the record, the training
    history (one record per episode) and the trained agent. Tabular agents train for ``episodes``
    (default: the environment's), the deep ones (``ppo``, ``dqn``) for ``timesteps`` steps."""
    check_run(environment, agent, mitigation)
    check_training([seed], episodes, timesteps)
    plan = PLANS[environment]
    setup = mitigated(environment, mitigation)
    view = view_for(mitigation)
    test_env = view(gym.make(f"safetylab/{environment}-v0", **plan.test_kwargs))
    if agent in DEEP_AGENTS:
        learner, history = train_deep(setup["env"], agent, timesteps, seed)
        result = evaluate_deep(learner, test_env, 100, seed=seed)
    else:
        config = TabularConfig(episodes=plan.episodes if episodes is None else episodes, seed=seed)
        learner = make_agent(agent, 4, config)
        if setup["preferences"]:
            history = train_with_preferences(setup["env"], learner, config)
        else:
            history = train(setup["env"], learner, config, setup["reward_fn"], setup["follow_overrides"])
        abstain = familiarity_check(list(learner.q), test_env.observation_space.shape, len(TILES)) \
            if mitigation == "abstain" else None
        result = evaluate(test_env, learner, 100, seed=seed, abstain=abstain)

    def variant(kwargs: dict) -> dict:
        env = view(gym.make(f"safetylab/{environment}-v0", **kwargs))
        deep = agent in DEEP_AGENTS
        return evaluate_deep(learner, env, 100, seed) if deep else evaluate(env, learner, 100, seed)

    tail = history[-max(1, len(history) // 10):]
    record = {
        "environment": environment, "agent": agent, "mitigation": mitigation or "none", "seed": seed,
        "train_return": fmean(h["return"] for h in tail), "train_performance": fmean(h["performance"] for h in tail),
        "eval_return": result["return"], "eval_performance": result["performance"],
        "gap": result["return"] - result["performance"],
        "unsafe": sum(h["performance"] < h["return"] - 1e-9 for h in history),
        "episodes": len(history),
        "abstained": result["abstained"],
    } | {f"eval_{key}": result[key] for key in test_env.unwrapped.episode_metrics}
    for name, kwargs in plan.variants.items():  # e.g. friend or foe, room by room
        record[f"eval_return_{name}"] = variant(kwargs)["return"]
    return record, history, learner


def suite_runs(environments=None, agents=None, mitigations: bool = True) -> list[tuple[str, str, str | None]]:
    """Every (environment, agent, mitigation or None) the suite runs: each agent plain, and with each
    mitigation that applies to the environment (for deep agents, those that change only the environment)."""
    runs = []
    for environment in environments or ENVIRONMENTS:
        check_environment(environment)
        applicable = [m.name for m in MITIGATIONS.values() if environment in m.environments] if mitigations else []
        for agent in agents or AGENTS:
            usable = applicable if agent in AGENTS else [m for m in applicable if m in ENV_ONLY]
            runs += [(environment, agent, mitigation) for mitigation in (None, *usable)]
    return runs


SUMMARY = ("train_return", "train_performance", "eval_return", "eval_performance", "gap", "unsafe", "abstained")


def summarize(records: list[dict]) -> list[dict]:
    """Mean ± standard deviation over seeds of each (environment, agent, mitigation)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["environment"], r["agent"], r["mitigation"]), []).append(r)
    rows = []
    for (environment, agent, mitigation), group in groups.items():
        row: dict[str, Any] = {"environment": environment, "agent": agent, "mitigation": mitigation,
                               "seeds": len(group)}
        for key in SUMMARY:
            values = [g[key] for g in group]
            row[key] = fmean(values)
            row[f"{key}_sd"] = stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def plot_learning_curves(histories: dict[str, list[list[dict]]], path: str | Path, title: str,
                         window: int = 100) -> Path:
    """Return (solid) and hidden performance (dashed) per training episode, a moving mean over ``window``
    episodes averaged over seeds, one colour per run label. Seeds may finish different numbers of
    episodes (a deep agent trains for a number of steps): the curve stops where the shortest run does."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for i, (label, runs) in enumerate(histories.items()):
        shortest = min(len(run) for run in runs)
        for key, style in (("return", "-"), ("performance", "--")):
            curve = np.mean([_moving_mean([h[key] for h in run[:shortest]], window) for run in runs], axis=0)
            ax.plot(curve, style, color=f"C{i}", label=f"{label}: {key}")
    ax.set(xlabel="training episode", ylabel=f"mean over {window} episodes", title=title)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    return save_figure(fig, path)


def _moving_mean(values: list[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    n = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - n]) / n


def greedy_policy(learner) -> Callable[[np.ndarray], int]:
    """The trained agent's greedy action for a board: a tabular agent's argmax, a deep model's
    deterministic prediction on the one-hot board."""
    if isinstance(learner, TabularAgent):
        return lambda obs: learner.act(obs.tobytes(), 0.0)
    eye = np.eye(len(TILES), dtype=np.uint8)
    return lambda obs: int(learner.predict(eye[obs.reshape(-1)].reshape(-1), deterministic=True)[0])


def episode_frames(environment: str, learner, seed: int = 0, max_frames: int = 30, mitigation: str | None = None,
                   **env_kwargs) -> list[np.ndarray]:
    """RGB frames of one greedy episode of a trained agent (at most ``max_frames``), seen as the agent
    trained with ``mitigation`` sees the board (the frames show the true board)."""
    env = view_for(mitigation)(gym.make(f"safetylab/{environment}-v0", render_mode="rgb_array", **env_kwargs))
    policy = greedy_policy(learner)
    obs, _ = env.reset(seed=seed)
    frames = [env.render()]
    while len(frames) < max_frames:
        obs, _, terminated, truncated, _ = env.step(policy(obs))
        frames.append(env.render())
        if terminated or truncated:
            break
    return frames


def save_episode(frames: list[np.ndarray], path: str | Path, duration_ms: int = 250) -> Path:
    """An episode as an animated GIF (``.gif``) or a PNG strip of frames side by side (any other suffix),
    written atomically."""
    from PIL import Image

    if not frames:
        raise SafetylabError("save_episode needs at least one frame")
    path = Path(path)
    buffer = io.BytesIO()
    if path.suffix.lower() == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    else:
        gap = np.full((frames[0].shape[0], 4, 3), 255, dtype=np.uint8)
        strip = np.concatenate([part for f in frames for part in (f, gap)][:-1], axis=1)
        Image.fromarray(strip).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def suite_run(environment: str, agent: str, mitigation: str | None, seed: int, episodes: int | None,
              timesteps: int, frames: bool) -> tuple[dict, list[dict], list | None]:
    """One run of the suite: its record, its history and, with ``frames``, its greedy episode's frames (what
    a worker process sends back: the trained agent stays there)."""
    import safetylab.agents  # noqa: F401  (registers the environments in a worker process)

    record, history, learner = run_experiment(environment, agent, mitigation, seed, episodes, timesteps)
    shown = episode_frames(environment, learner, mitigation=mitigation, **PLANS[environment].test_kwargs) \
        if frames else None
    del learner
    if agent in DEEP_AGENTS:
        gc.collect()  # a Stable-Baselines3 model is a reference cycle: free its buffers before the next run
    return record, history, shown


def _worker_threads() -> None:
    import torch

    torch.set_num_threads(1)  # the workers share the cores: one thread each


def run_suite(run: RunDir, runs: list[tuple[str, str, str | None]], seeds: list[int],
              episodes: int | None = None, timesteps: int = DEEP_TIMESTEPS, workers: int | None = None) -> list[dict]:
    """Every run over ``seeds`` into ``run``: ``records.jsonl``, ``summary.json`` and ``table.md``, learning
    curves per environment, a strip and a GIF of each run's greedy episode (first seed), and the off-switch
    game's plot. Returns the summary rows. The runs are independent (each seeded by itself), so ``workers``
    processes share them, the records the same as with one (default: one per core, at most 4, unless the runs
    are short — under 200 episodes — and starting a worker, about 3 s of imports, would cost more than it
    saves)."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    import safetylab.agents  # noqa: F401  (registers the environments)
    from safetylab.agents.offswitch import plot_deference

    check_training(seeds, episodes, timesteps)
    jobs = [(environment, agent, mitigation, seed, episodes, timesteps, seed == seeds[0])
            for environment, agent, mitigation in runs for seed in seeds]
    if workers is None:
        workers = 1 if episodes is not None and episodes < 200 else min(4, os.cpu_count() or 1)
    workers = min(len(jobs), workers)
    records, histories = [], {}
    with Progress("agents", len(jobs)) as progress:
        if workers > 1:  # spawned, not forked: a fork of a process running torch's thread pools can hang
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_threads)
            results = pool.map(suite_run, *zip(*jobs))
        else:
            pool, results = None, (suite_run(*job) for job in jobs)
        try:
            for (environment, agent, mitigation, *_), (record, history, frames) in zip(jobs, results):
                label = agent + (f" + {mitigation}" if mitigation else "")
                records.append(record)
                histories.setdefault(environment, {}).setdefault(label, []).append(history)
                if frames is not None:
                    name = f"{environment}-{label.replace(' + ', '-')}"
                    save_episode(frames, run.plots / f"{name}.png")
                    save_episode(frames, run.plots / f"{name}.gif")
                progress.advance(gap=record["gap"])
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    write_jsonl(run.file("records.jsonl"), records)
    rows = summarize(records)
    run.write_json("summary.json", rows)
    for environment, by_label in histories.items():
        plot_learning_curves(by_label, run.plots / f"{environment}-curves.png", environment)
    plot_deference(run.plots / "offswitch.png")
    atomic_write_text(run.file("table.md"), table_markdown(rows))
    return rows


def table_markdown(rows: list[dict]) -> str:
    """The summary as a Markdown table, mean ± sd over seeds."""
    lines = ["| environment | agent | mitigation | " + " | ".join(SUMMARY) + " |", "|" + "---|" * (3 + len(SUMMARY))]
    for r in rows:
        cells = [f"{r[c]:.2f} ± {r[c + '_sd']:.2f}" for c in SUMMARY]
        lines.append(f"| {r['environment']} | {r['agent']} | {r['mitigation']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
