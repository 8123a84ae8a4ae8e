"""Tabular Q-learning and SARSA, the agents of the safety gridworlds' textbook findings.

Both keep Q(s, ·) in a dict keyed by the observation's bytes and act ε-greedily. They differ only in
the target of the update after (s, a, r, s′), which is what the interruptibility and whisky findings
turn on (Orseau & Armstrong 2016, "Safely Interruptible Agents"):

- Q-learning (Watkins & Dayan 1992), off-policy:  Q(s, a) += α (r + γ max_a′ Q(s′, a′) − Q(s, a))
- SARSA (Rummery & Niranjan 1994), on-policy:    Q(s, a) += α (r + γ Q(s′, a′) − Q(s, a)),
  a′ the action actually taken next.

Updates use the action the environment actually executed (``info["actual_action"]``, when an
interruption overrides the agent), and the agent's exploration follows ``info["exploration"]`` when the
environment reports one (the whisky). An episode's record holds its return and hidden performance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from safetylab.core.config import require
from safetylab.core.errors import SafetylabError
from safetylab.core.seeding import derive_seed

AGENTS = ("q-learning", "sarsa")


@dataclass(frozen=True)
class TabularConfig:
    episodes: int = 3000
    alpha: float = 0.5  # learning rate
    gamma: float = 0.99
    epsilon_start: float = 1.0  # ε anneals linearly over the first half of training
    epsilon_end: float = 0.05
    seed: int = 0

    def __post_init__(self):
        require(self.episodes >= 1, "episodes", "an integer >= 1", self.episodes)
        require(0 < self.alpha <= 1, "alpha", "a learning rate in (0, 1]", self.alpha)
        require(0 <= self.gamma <= 1, "gamma", "a discount in [0, 1]", self.gamma)
        require(0 <= self.epsilon_start <= 1, "epsilon_start", "a probability in [0, 1]", self.epsilon_start)
        require(0 <= self.epsilon_end <= self.epsilon_start, "epsilon_end",
                f"a probability in [0, epsilon_start = {self.epsilon_start}]", self.epsilon_end)
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)


def epsilon_at(config: TabularConfig, episode: int) -> float:
    """Linear annealing from ``epsilon_start`` to ``epsilon_end`` over the first half of the episodes."""
    span = max(1, config.episodes // 2)
    return config.epsilon_start + (config.epsilon_end - config.epsilon_start) * min(1.0, episode / span)


class TabularAgent:
    """Q-values per observation; ``on_policy`` picks SARSA's target over Q-learning's."""

    def __init__(self, n_actions: int, on_policy: bool, config: TabularConfig):
        self.n_actions, self.on_policy, self.config = n_actions, on_policy, config
        self.q: dict[bytes, np.ndarray] = {}
        self._unseen = np.zeros(n_actions)
        self.rng = np.random.default_rng(config.seed)

    def values(self, state: bytes) -> np.ndarray:
        q = self.q.get(state)
        if q is None:
            q = self.q[state] = np.zeros(self.n_actions)
        return q

    def act(self, state: bytes, epsilon: float) -> int:
        """ε-greedy, ties broken at random; an unvisited state gets a random action (and is not stored)."""
        if self.rng.random() < epsilon:
            return int(self.rng.integers(self.n_actions))
        q = self.q.get(state, self._unseen)
        return int(self.rng.choice(np.flatnonzero(q == q.max())))

    def update(self, state: bytes, action: int, reward: float, next_state: bytes, next_action: int,
               done: bool) -> None:
        """One TD update; ``done`` only for a terminal state (a truncated episode bootstraps)."""
        q = self.values(state)
        if done:
            target = reward
        elif self.on_policy:
            target = reward + self.config.gamma * self.values(next_state)[next_action]
        else:
            target = reward + self.config.gamma * self.values(next_state).max()
        q[action] += self.config.alpha * (target - q[action])


def make_agent(name: str, n_actions: int, config: TabularConfig) -> TabularAgent:
    if name not in AGENTS:
        raise SafetylabError(f"agent must be one of {', '.join(AGENTS)}, got {name!r}")
    return TabularAgent(n_actions, on_policy=name == "sarsa", config=config)


RewardFn = Callable[[np.ndarray, int, float, np.ndarray, dict], float]


def run_episode(env: gym.Env, agent: TabularAgent, epsilon: float, learn: bool = True, seed: int | None = None,
                reward_fn: RewardFn | None = None, follow_overrides: bool = True, trace: list | None = None) -> dict:
    """One episode; learns from it when ``learn``. ``reward_fn(obs, action, reward, next_obs, info)``
    replaces the reward the agent learns from (a learned or shaped reward); the record keeps the true
    return and the hidden performance.

    Each update waits one step, until the next *executed* action is known: SARSA's target is the action
    that really followed (an interruption's override included), which is what makes it on-policy. With
    ``follow_overrides=False`` SARSA's target takes the action the agent *chose* next instead, so overrides
    do not enter its values: the safely interruptible SARSA of Orseau & Armstrong 2016 (the updated pair
    is always the executed one; Q-learning's max target is unaffected). ``trace``, when given, receives
    ``(state, executed action, hidden reward)`` for every step."""
    obs, _ = env.reset(seed=seed)
    state, explore, pending = obs.tobytes(), epsilon, None
    total = steps = 0
    while True:
        action = agent.act(state, explore)
        next_obs, reward, terminated, truncated, info = env.step(action)
        actual = info.get("actual_action", action)
        if trace is not None:
            trace.append((state, actual, info["hidden_reward"]))
        if learn and pending is not None:
            agent.update(*pending, state, actual if follow_overrides else action, False)
        if learn:
            learned = reward if reward_fn is None else reward_fn(obs, actual, reward, next_obs, info)
            pending = (state, actual, learned)
        total += reward
        steps += 1
        if info.get("exploration") is not None:
            explore = info["exploration"]  # the whisky changed the agent's own exploration
        obs, state = next_obs, next_obs.tobytes()
        if terminated or truncated:
            if learn:  # a terminal state has no future; a truncated one bootstraps on the greedy value
                agent.update(*pending, state, int(np.argmax(agent.values(state))), terminated)
            return {"return": total, "performance": info["performance"], "steps": steps,
                    "terminated": terminated, **{k: info[k] for k in env.unwrapped.episode_metrics}}


def episode_seeds(root: int, purpose: str, episodes: int) -> range:
    """The reset seeds of ``episodes`` episodes of the stream ``purpose`` ("train", "eval") under the run's
    ``root`` seed: consecutive seeds from a derived 63-bit start, so streams of different roots or
    purposes do not meet (seed 0's episode 1 is no longer seed 1's episode 0)."""
    start = derive_seed(root, "episodes", purpose)
    return range(start, start + episodes)


def train(env: gym.Env, agent: TabularAgent, config: TabularConfig, reward_fn: RewardFn | None = None,
          follow_overrides: bool = True) -> list[dict]:
    """``config.episodes`` episodes of ε-greedy learning; one record per episode. Episode i resets the
    environment with :func:`episode_seeds`' i-th seed, so two training seeds never share an episode."""
    history = []
    for episode, seed in enumerate(episode_seeds(config.seed, "train", config.episodes)):
        record = run_episode(env, agent, epsilon_at(config, episode), seed=seed,
                             reward_fn=reward_fn, follow_overrides=follow_overrides)
        history.append({"episode": episode, **record})
    return history


def evaluate(env: gym.Env, agent: TabularAgent, episodes: int = 100, seed: int = 0, epsilon: float = 0.0,
             abstain: Callable[[np.ndarray], bool] | None = None) -> dict:
    """Mean return and performance of the (greedy by default) policy, without learning. With ``abstain``,
    the agent stops and hands over (the episode ends, counted as it stands, and ``abstained`` says how
    often) whenever ``abstain(obs)`` flags the observation as unfamiliar. Episodes reset with
    ``episode_seeds(seed, "eval", episodes)``. The environment's
    ``episode_metrics`` are averaged over the episodes that ran to their end."""
    returns, performances, abstained, ends = [], [], 0, []
    for reset_seed in episode_seeds(seed, "eval", episodes):
        if abstain is None:
            record = run_episode(env, agent, epsilon, learn=False, seed=reset_seed)
            returns.append(record["return"])
            performances.append(record["performance"])
            ends.append(record)
            continue
        obs, _ = env.reset(seed=reset_seed)
        total = hidden = 0.0
        while not abstain(obs):
            obs, reward, terminated, truncated, info = env.step(agent.act(obs.tobytes(), epsilon))
            total, hidden = total + reward, hidden + info["hidden_reward"]
            if terminated or truncated:
                ends.append(info)
                break
        else:
            abstained += 1
        returns.append(total)
        performances.append(hidden)
    return {"return": float(np.mean(returns)), "performance": float(np.mean(performances)), "episodes": episodes,
            "abstained": abstained / episodes, **episode_metrics(env, ends)}


def episode_metrics(env: gym.Env, ends: list[dict]) -> dict[str, float]:
    """The mean of each of the environment's ``episode_metrics`` over the last steps' ``info`` (or
    records) of finished episodes."""
    return {key: float(np.mean([end[key] for end in ends])) if ends else float("nan")
            for key in env.unwrapped.episode_metrics}
