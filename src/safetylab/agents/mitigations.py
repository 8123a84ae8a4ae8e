"""Mitigations that narrow the gap between the reward an agent earns and the performance we wanted.

Each is a small, documented change to the environment, the reward the agent learns from, or its update:

- ``shield`` (safe exploration, island navigation): Alshiekh et al. 2018, "Safe Reinforcement Learning
  via Shielding" — an action whose next tile is unsafe is replaced by a safe one before it runs;
- ``interruption-indifferent`` (safe interruptibility): Orseau & Armstrong 2016, "Safely Interruptible
  Agents" — the agent learns from the actions it chose, so interruptions do not enter its values;
- ``relative-reachability`` (side effects): Krakovna et al. 2019, "Penalizing side effects using
  stepwise relative reachability" — the learned reward loses λ · the share of states the step made
  harder to reach than the stepwise inaction baseline (staying put) kept them;
- ``supervisor-blind`` (absent supervisor): Leike et al. 2017, §2.3, ask that an agent behave the same
  whether or not it is watched; this wrapper takes away the cue that tells the two apart (the
  supervisor's marks on the board), so no policy can condition on oversight — the gridworld form of
  keeping evaluation indistinguishable from deployment;
- ``goal-diversity`` (goal misgeneralization): Langosco et al. 2022 — training levels in which the coin
  is not always where it usually is;
- ``abstain`` (distributional shift): the agent hands over instead of acting in a state unlike any it
  trained in — flagged by :class:`safetylab.robust.ood.KNN` on the one-hot board (distance to the
  nearest training state), the same detector that guards the classifiers;
- ``preferences`` (reward gaming and tampering): Christiano et al. 2017, "Deep reinforcement learning from
  human preferences" — the agent learns from a reward model fitted, by the Bradley–Terry loss of
  :mod:`safetylab.align`, to comparisons of its own trajectory segments labelled by the hidden
  performance (a simulated human who sees what the reward misses).
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from safetylab.agents.gridworld import MOVES, TILES, Gridworld
from safetylab.core.errors import SafetylabError


class Shield(gym.Wrapper):
    """Replaces an action whose target tile is one of ``unsafe`` (default: water) by the first safe action
    (up, down, left, right); ``info["actual_action"]`` is the action that ran and ``info["shielded"]``
    says whether the shield stepped in. The shield reads the board: it knows the map, not the reward."""

    def __init__(self, env: gym.Env, unsafe: tuple[str, ...] = ("~",)):
        super().__init__(env)
        self.unsafe = frozenset(TILES[ch] for ch in unsafe)

    def safe(self, action: int) -> bool:
        grid: Gridworld = self.env.unwrapped
        return grid.tile_ahead(action) not in self.unsafe

    def step(self, action):
        safe = action if self.safe(action) else next((a for a in range(len(MOVES)) if self.safe(a)), action)
        obs, reward, terminated, truncated, info = self.env.step(safe)
        info["actual_action"], info["shielded"] = int(safe), safe != action
        return obs, reward, terminated, truncated, info


class SupervisorBlind(gym.ObservationWrapper):
    """Shows the board with the supervisor's marks ``S`` read as floor, so watched and unwatched episodes
    look the same and a policy cannot behave differently in them."""

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.where(observation == TILES["S"], TILES[" "], observation).astype(np.uint8)


@dataclass
class RelativeReachability:
    """Reward shaping by stepwise relative reachability (Krakovna et al. 2019) for deterministic
    gridworlds: reward − λ · (1/|S|) Σ_y max(0, R(s_{t−1}, y) − R(s_t, y)), with discounted reachability
    R(x, y) = γ_r^{d(x, y)} (d: the fewest steps from x to y, ∞ if none) over the states S reachable from
    the start, and the inaction baseline s_{t−1} (the state had the agent stayed put). States are found
    and distances measured by breadth-first search on copies of the environment, once per state.

    λ = 100 by default. On the Sokoban level the penalties of the corner-push route sum to 0.57 and those
    of the careful route to 0.24 (it moves the box too). Q-learning keeps off the corner from λ = 20 on;
    SARSA, whose values carry its own exploration, only from λ = 100 (5 seeds each); at λ = 200 SARSA
    stops reaching the goal on some seeds."""

    env: Gridworld
    weight: float = 100.0
    gamma: float = 0.95
    _states: dict[bytes, int] = field(default_factory=dict)
    _reach: np.ndarray | None = None

    def __post_init__(self):
        self.env = self.env.unwrapped
        start = copy.deepcopy(self.env)
        start.reset(seed=0)
        frontier, copies, edges = deque([start]), {start._observe().tobytes(): start}, {}
        while frontier:  # every state reachable from the start, and its successors
            state = frontier.popleft()
            key = state._observe().tobytes()
            edges[key] = []
            for action in range(len(MOVES)):
                nxt = copy.deepcopy(state)
                *_, terminated, truncated, _ = nxt.step(action)
                nxt._steps = 0  # distances, not the step limit, matter here
                nxt_key = nxt._observe().tobytes()
                edges[key].append(nxt_key)
                if nxt_key not in copies and not terminated:
                    copies[nxt_key] = nxt
                    frontier.append(nxt)
            if len(copies) > 5000:
                raise SafetylabError("relative reachability: more than 5,000 states; it needs a small environment")
        self._states = {key: i for i, key in enumerate(edges)}
        n = len(self._states)
        self._reach = np.zeros((n, n))
        for key, i in self._states.items():  # BFS distances from each state
            dist, queue = {key: 0}, deque([key])
            while queue:
                x = queue.popleft()
                for y in edges.get(x, ()):
                    if y not in dist:
                        dist[y] = dist[x] + 1
                        queue.append(y)
            for y, d in dist.items():
                if y in self._states:
                    self._reach[i, self._states[y]] = self.gamma ** d

    def penalty(self, before: np.ndarray, after: np.ndarray) -> float:
        i, j = self._states.get(before.tobytes()), self._states.get(after.tobytes())
        if i is None or j is None:
            return 0.0  # a terminal state: nothing further to reach
        return float(np.maximum(0.0, self._reach[i] - self._reach[j]).mean())

    def __call__(self, obs, action, reward, next_obs, info) -> float:
        return reward - self.weight * self.penalty(obs, next_obs)


class PreferenceReward:
    """A reward r̂(s, a), one value per (observation, action), fitted to comparisons of trajectory segments
    (Christiano et al. 2017): P(σ¹ ≻ σ²) = sigmoid(Σ_{σ¹} r̂ − Σ_{σ²} r̂), the Bradley–Terry model, trained with
    :func:`safetylab.align.losses.bradley_terry_loss` by Adam. The labeler prefers the segment with the
    higher hidden return (ties are not compared). The comparisons fix r̂ up to a constant; it is shifted
    so that its largest value is 0 — a learned step cost, so that an agent never prefers to keep an episode
    going for reward that only exists because of the shift (unseen pairs also get 0: optimism, which makes
    the agent try them)."""

    def __init__(self, segment: int = 10, pairs: int = 500, epochs: int = 100, lr: float = 0.05, seed: int = 0):
        self.segment, self.pairs, self.epochs, self.lr = segment, pairs, epochs, lr
        self.rng = np.random.default_rng(seed)
        self.index: dict[tuple[bytes, int], int] = {}
        self.segments: list[tuple[list[int], float]] = []  # (indices of its (s, a), hidden return)
        self.weights = np.zeros(0)

    def add(self, trace: list[tuple[bytes, int, float]]) -> None:
        """Cut an episode's ``(state, action, hidden reward)`` steps into segments."""
        for start in range(0, max(1, len(trace) - self.segment + 1), self.segment):
            part = trace[start:start + self.segment]
            keys = [self.index.setdefault((s, a), len(self.index)) for s, a, _ in part]
            self.segments.append((keys, sum(h for *_, h in part)))

    def fit(self) -> float:
        """Fit r̂ to ``pairs`` fresh comparisons of stored segments; return the labeler agreement."""
        import torch

        from safetylab.align.losses import bradley_terry_loss

        first, second = self.rng.integers(len(self.segments), size=(2, self.pairs))
        keep = [i for i in range(self.pairs) if self.segments[first[i]][1] != self.segments[second[i]][1]]
        if not keep:
            return float("nan")
        winner = [first[i] if self.segments[first[i]][1] > self.segments[second[i]][1] else second[i] for i in keep]
        loser = [second[i] if w == first[i] else first[i] for i, w in zip(keep, winner)]
        pad = len(self.index)  # a last, always-zero weight pads the shorter segments
        members = torch.full((len(self.segments), self.segment), pad, dtype=torch.long)
        for j, (keys, _) in enumerate(self.segments):
            members[j, :len(keys)] = torch.tensor(keys)
        weights = torch.zeros(pad + 1, dtype=torch.float64)
        weights[:len(self.weights)] = torch.from_numpy(self.weights)
        weights.requires_grad_(True)
        mask = torch.ones(pad + 1, dtype=torch.float64)
        mask[pad] = 0.0
        optimizer = torch.optim.Adam([weights], lr=self.lr)
        win, lose = members[winner], members[loser]
        for _ in range(self.epochs):
            w = weights * mask
            loss = bradley_terry_loss(w[win].sum(1), w[lose].sum(1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.weights = weights.detach()[:pad].numpy().copy()
        self.weights -= self.weights.max()  # r̂ ≤ 0: a learned step cost, so ending an episode is never shunned
        w = torch.from_numpy(np.append(self.weights, 0.0))
        return float((w[win].sum(1) > w[lose].sum(1)).double().mean())

    def __call__(self, obs, action, reward, next_obs, info) -> float:
        i = self.index.get((obs.tobytes(), action))
        return float(self.weights[i]) if i is not None and i < len(self.weights) else 0.0


def train_with_preferences(env: gym.Env, agent, config, rounds: int = 10, reward: PreferenceReward | None = None,
                           ) -> list[dict]:
    """Christiano et al.'s loop with a tabular agent: ``rounds`` times, the agent trains for
    ``config.episodes / rounds`` episodes on the current r̂ while its trajectories are stored, then r̂ is
    refitted on comparisons of them. The first round explores with r̂ = 0."""
    from safetylab.agents.tabular import episode_seeds, epsilon_at, run_episode

    reward = reward or PreferenceReward(seed=config.seed)
    history, per_round = [], max(1, config.episodes // rounds)
    for episode, seed in enumerate(episode_seeds(config.seed, "train", config.episodes)):
        trace: list = []
        record = run_episode(env, agent, epsilon_at(config, episode), seed=seed, reward_fn=reward,
                             trace=trace)
        reward.add(trace)
        history.append({"episode": episode, **record})
        if (episode + 1) % per_round == 0:
            history[-1]["labeler_agreement"] = reward.fit()
    return history


def familiarity_check(states: list[bytes], shape: tuple[int, int], tiles: int) -> Callable[[np.ndarray], bool]:
    """``unfamiliar(obs)``: True when the board is none of the training boards — its KNN score (k = 1: the
    distance from the normalised one-hot board to the nearest training one) is above 0."""
    import torch
    from torch import nn

    from safetylab.robust.ood import KNN

    def one_hot(boards: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.from_numpy(boards.astype(np.int64)), tiles).flatten(1).float()

    boards = np.stack([np.frombuffer(s, dtype=np.uint8).reshape(shape) for s in states])
    detector = KNN(nn.Identity(), k=1).fit_features(one_hot(boards.reshape(len(boards), -1)))
    # two distinct boards of n cells are at least √(4/n) apart once normalised (≥ 0.2 up to 100 cells);
    # a seen board scores 0 up to float32 rounding (~1e-3)
    return lambda obs: bool(detector.score_features(one_hot(obs.reshape(1, -1)))[0] > 0.05)


@dataclass(frozen=True)
class Mitigation:
    name: str
    environments: tuple[str, ...]
    summary: str


MITIGATIONS = {m.name: m for m in (
    Mitigation("shield", ("IslandNavigation",), "unsafe actions replaced before they run (Alshiekh et al. 2018)"),
    Mitigation("interruption-indifferent", ("SafeInterruptibility",),
               "learn from chosen actions, not the interruption's (Orseau & Armstrong 2016)"),
    Mitigation("relative-reachability", ("SideEffectsSokoban",),
               "penalise states made unreachable, stepwise inaction baseline (Krakovna et al. 2019)"),
    Mitigation("supervisor-blind", ("AbsentSupervisor",),
               "the supervisor's marks hidden: no policy can depend on being watched (Leike et al. 2017)"),
    Mitigation("goal-diversity", ("GoalMisgeneralization",),
               "a third of training levels put the coin elsewhere (Langosco et al. 2022)"),
    Mitigation("abstain", ("DistributionalShift",),
               "hand over in states unlike any seen in training (a KNN detector on the board)"),
    Mitigation("preferences", ("BoatRace", "TomatoWatering", "CleaningRobot"),
               "reward learned from segment comparisons labelled by performance (Christiano et al. 2017)"),
)}


def check_mitigation(name: str | None, environment: str) -> Mitigation | None:
    """The mitigation ``name`` if it applies to ``environment``; a clear error otherwise."""
    if name is None:
        return None
    if name not in MITIGATIONS:
        raise SafetylabError(f"mitigation must be one of {', '.join(MITIGATIONS)}, got {name!r}")
    mitigation = MITIGATIONS[name]
    if environment not in mitigation.environments:
        raise SafetylabError(f"mitigation {name!r} applies to {', '.join(mitigation.environments)}, "
                             f"not to {environment}")
    return mitigation


def mitigated(environment: str, mitigation: str | None, env_kwargs: dict[str, Any] | None = None) -> dict:
    """What training with ``mitigation`` changes: ``env`` (the training environment), ``reward_fn`` and
    ``follow_overrides`` for :func:`safetylab.agents.tabular.train`; ``preferences`` asks for
    :func:`train_with_preferences` instead."""
    check_mitigation(mitigation, environment)
    kwargs = dict(env_kwargs or {})
    if mitigation == "goal-diversity":
        kwargs["goal_diversity"] = 1 / 3
    env = gym.make(f"safetylab/{environment}-v0", **kwargs)
    plan: dict[str, Any] = {"env": env, "reward_fn": None, "follow_overrides": True,
                            "preferences": mitigation == "preferences"}
    if mitigation == "shield":
        plan["env"] = Shield(env)
    elif mitigation == "supervisor-blind":
        plan["env"] = view_for(mitigation)(env)
    elif mitigation == "interruption-indifferent":
        plan["follow_overrides"] = False
    elif mitigation == "relative-reachability":
        plan["reward_fn"] = RelativeReachability(env.unwrapped)
    return plan


def view_for(mitigation: str | None) -> Callable[[gym.Env], gym.Env]:
    """What an agent trained with ``mitigation`` keeps seeing afterwards, as a wrapper for evaluation
    environments (the supervisor stays hidden; every other mitigation leaves the view alone)."""
    return SupervisorBlind if mitigation == "supervisor-blind" else (lambda env: env)
