"""Environment steps per second: safetylab's safety gridworlds against safety-gridworlds-gymnasium and a
bare numpy gridworld floor, in one run.

Every side steps through a fixed stream of random actions (drawn once from ``numpy.random.default_rng(0)``,
so no side pays for sampling) and resets whenever an episode ends, the reset counted in the time:

- *safetylab*: each environment through ``gymnasium.make("safetylab/NAME-v0")`` — as registered, without
  Gymnasium's order-enforcing and passive-checker wrappers, since the environments check reset-before-step
  and actions themselves — returning the board as a ``(H, W)`` uint8 array and ``info`` with the hidden
  reward;
- *safety-gridworlds-gymnasium* (PyPI, benchmark-only): its ``IslandNavigation-v0`` and ``Sokoban-v0``
  through ``gymnasium.make`` as its users get them (its observation is a state index);
- *floor*: a plain numpy gridworld of the same size as the island (6×8): a move, a wall check, a goal check,
  a copy of the board as the observation, a 100-step limit — the least work a gridworld step can do in
  Python, with no Gymnasium machinery.

Rounds rotate the sides; a side's rate is the median over rounds. Targets: ≥ 5× the peer on the kinds it
has, ≥ 0.5× the floor.

    python benchmarks/gridworld_steps.py [--steps 100000] [--rounds 5]

Needs safety-gridworlds-gymnasium next to safetylab (see ``benchmarks/requirements-gridworld.txt``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np

import safetylab.agents
from safetylab.agents.envs import IslandNavigation

PEERS = {"IslandNavigation": "safety_gridworlds/IslandNavigation-v0",
         "SideEffectsSokoban": "safety_gridworlds/Sokoban-v0"}


class FloorGrid:
    """The bare-numpy floor: the island's walls and water as walls, its goal, a 100-step limit."""

    def __init__(self):
        level = np.array([[ord(ch) for ch in row] for row in IslandNavigation.art])
        self.walls = np.isin(level, (ord("#"), ord("~")))
        self.board = np.where(self.walls, 1, 0).astype(np.uint8)
        self.goal = (4, 3)
        self.moves = ((-1, 0), (1, 0), (0, -1), (0, 1))

    def reset(self, seed=None):
        self.pos, self.t = (1, 4), 0
        return self.board.copy(), {}

    def step(self, action):
        r, c = self.pos
        dr, dc = self.moves[action]
        if not self.walls[r + dr, c + dc]:
            self.pos = (r + dr, c + dc)
        self.t += 1
        obs = self.board.copy()
        obs[self.pos] = 2
        terminated = self.pos == self.goal
        return obs, 50.0 if terminated else -1.0, terminated, self.t >= 100, {}


def steps_per_second(env, actions: list[int]) -> float:
    env.reset(seed=0)
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    return len(actions) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import safety_gridworlds_gymnasium  # noqa: F401  (registers the peer's environments)

    actions = [int(a) for a in np.random.default_rng(0).integers(0, 4, args.steps)]
    sides = {f"safetylab {name}": gym.make(env_id) for name, env_id in
             zip(safetylab.agents.ENVIRONMENTS, safetylab.agents.ENV_IDS)}
    sides |= {f"peer {name}": gym.make(env_id) for name, env_id in PEERS.items()}
    sides["floor (numpy, 6x8)"] = FloorGrid()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        order = list(sides)[round_ % len(sides):] + list(sides)[:round_ % len(sides)]
        for name in order:
            rates[name].append(steps_per_second(sides[name], actions))
    median = {name: statistics.median(r) for name, r in rates.items()}
    floor = median["floor (numpy, 6x8)"]
    print(f"gymnasium {gym.__version__}; {args.steps:,} random steps per side and round, {args.rounds} rounds, "
          "resets included; median steps/s")
    print(f"{'side':<34} {'steps/s':>10} {'/ floor':>8} {'/ peer':>8}")
    for name, rate in median.items():
        kind = name.removeprefix("safetylab ")
        peer = median.get(f"peer {kind}") if name.startswith("safetylab ") else None
        versus = f"{rate / peer:8.2f}" if peer else ""
        print(f"{name:<34} {rate:>10,.0f} {rate / floor:8.2f} {versus}")
    ours = [median[f"safetylab {k}"] / median[f"peer {k}"] for k in PEERS]
    print(f"\ntargets: >= 5x the peer: {min(ours):.1f}x at least ({'meets' if min(ours) >= 5 else 'MISSES'}); "
          f">= 0.5x the floor: {min(median[n] for n in median if n.startswith('safetylab')) / floor:.2f}x at least")


if __name__ == "__main__":
    main()
