"""The deep RL baseline (Stable-Baselines3) on the gridworlds: the one-hot board, training records, the
greedy policy, and which mitigations it can take."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import safetylab.agents  # noqa: F401
from safetylab.agents.deep import OneHotBoard, evaluate_deep, train_deep
from safetylab.agents.experiment import greedy_policy, run_experiment, suite_runs
from safetylab.agents.gridworld import TILES
from safetylab.core.errors import SafetylabError

pytest.importorskip("stable_baselines3")


def test_one_hot_board():
    env = OneHotBoard(gym.make("safetylab/BoatRace-v0"))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (25 * len(TILES),) and obs.dtype == np.uint8
    board = obs.reshape(25, len(TILES))
    assert (board.sum(1) == 1).all() and board[6, TILES["A"]] == 1  # the agent at (1, 1)


@pytest.mark.parametrize("algorithm", ["ppo", "dqn"])
def test_deep_agents_train_record_and_act(algorithm):
    model, history = train_deep(gym.make("safetylab/IslandNavigation-v0"), algorithm, 1200, seed=0)
    assert history and {"return", "performance"} <= set(history[0])
    result = evaluate_deep(model, gym.make("safetylab/IslandNavigation-v0"), 3)
    assert np.isfinite(result["return"]) and result["performance"] <= result["return"] + 1e-9
    policy = greedy_policy(model)
    action = policy(gym.make("safetylab/IslandNavigation-v0").reset(seed=0)[0])
    assert isinstance(action, int) and 0 <= action < 4


def test_deep_agents_take_only_the_mitigations_that_change_the_environment():
    runs = suite_runs(["IslandNavigation", "SideEffectsSokoban"], ("ppo",))
    assert runs == [("IslandNavigation", "ppo", None), ("IslandNavigation", "ppo", "shield"),
                    ("SideEffectsSokoban", "ppo", None)]
    record, *_ = run_experiment("IslandNavigation", "ppo", "shield", 0, timesteps=600)
    assert record["unsafe"] == 0  # the shield keeps the deep agent out of the water too
    with pytest.raises(SafetylabError, match="works with the tabular agents"):
        run_experiment("SideEffectsSokoban", "ppo", "relative-reachability", 0, timesteps=100)
    with pytest.raises(SafetylabError, match="deep agent must be one of ppo, dqn"):
        train_deep(gym.make("safetylab/BoatRace-v0"), "a2c", 100)
