"""A deep RL baseline on the same gridworlds: Stable-Baselines3's PPO (Schulman et al. 2017) or DQN (Mnih
et al. 2015) with an MLP on the one-hot board.

Unlike the tabular agents, these generalise across boards they never saw — which is what lets goal
misgeneralization show as a *wrong goal pursued competently* rather than as an unseen state. Training
records each episode's return and hidden performance from ``info`` (the environment's own bookkeeping),
so the deep runs fill the same table as the tabular ones.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from safetylab.agents.gridworld import TILES
from safetylab.agents.tabular import episode_metrics, episode_seeds
from safetylab.core.errors import SafetylabError

DEEP_AGENTS = ("ppo", "dqn")


class OneHotBoard(gym.ObservationWrapper):
    """The board as a flat one-hot vector (H·W·tiles), the input an MLP policy needs; uint8, a quarter of
    float32's memory in a replay buffer (the policy reads it as floats)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.cells = int(np.prod(env.observation_space.shape))
        self.observation_space = spaces.Box(0, 1, (self.cells * len(TILES),), dtype=np.uint8)
        self._eye = np.eye(len(TILES), dtype=np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return self._eye[observation.reshape(-1)].reshape(-1)


def _episode_recorder(history: list[dict]):
    from stable_baselines3.common.callbacks import BaseCallback

    class EpisodeRecorder(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "performance" in info:
                    history.append({"episode": len(history), "return": info["episode_return"],
                                    "performance": info["performance"]})
            return True

    return EpisodeRecorder()


def train_deep(env: gym.Env, algorithm: str, timesteps: int, seed: int = 0):
    """Train PPO or DQN (Stable-Baselines3 defaults, an MLP on the one-hot board) for ``timesteps``
    environment steps on ``env``; return the model and one record per finished episode."""
    if algorithm not in DEEP_AGENTS:
        raise SafetylabError(f"deep agent must be one of {', '.join(DEEP_AGENTS)}, got {algorithm!r}")
    try:
        from stable_baselines3 import DQN, PPO
    except ImportError:
        raise SafetylabError("the deep RL baseline needs stable-baselines3: pip install 'safetylab[rl]'") from None
    kwargs: dict[str, Any] = {"seed": seed, "verbose": 0, "device": "cpu"}
    if algorithm == "dqn":
        # a replay buffer no larger than the run: SB3's default holds 1,000,000 transitions
        kwargs |= {"learning_starts": 1000, "exploration_fraction": 0.3, "target_update_interval": 500,
                   "buffer_size": min(timesteps, 100_000)}
    model = (PPO if algorithm == "ppo" else DQN)("MlpPolicy", OneHotBoard(env), **kwargs)
    history: list[dict] = []
    model.learn(timesteps, callback=_episode_recorder(history))
    return model, history


def evaluate_deep(model, env: gym.Env, episodes: int = 100, seed: int = 0) -> dict:
    """Mean return and performance of the model's deterministic policy, and the environment's
    ``episode_metrics``; episodes reset with ``episode_seeds(seed, "eval", episodes)``."""
    env = OneHotBoard(env)
    returns, performances, ends = [], [], []
    for reset_seed in episode_seeds(seed, "eval", episodes):
        obs, _ = env.reset(seed=reset_seed)
        while True:
            action, _ = model.predict(obs, deterministic=True)
            obs, _, terminated, truncated, info = env.step(int(action))
            if terminated or truncated:
                returns.append(info["episode_return"])
                performances.append(info["performance"])
                ends.append(info)
                break
    return {"return": float(np.mean(returns)), "performance": float(np.mean(performances)), "episodes": episodes,
            "abstained": 0.0, **episode_metrics(env, ends)}
