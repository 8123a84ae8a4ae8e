"""Safety gridworlds, agents that fail them, and mitigations that fix them.

- :mod:`.gridworld`: the engine — a Gymnasium ``Env`` whose steps return the visible reward and, in
  ``info``, the hidden reward and (at the end) the episode's performance;
- :mod:`.envs`: the environments, registered as ``safetylab/NAME-v0`` when this package is imported.
"""

from safetylab.agents.envs import ENVIRONMENTS, register_environments
from safetylab.agents.gridworld import ACTION_NAMES, TILES, Gridworld

ENV_IDS = register_environments()

__all__ = ["ACTION_NAMES", "ENVIRONMENTS", "ENV_IDS", "TILES", "Gridworld", "register_environments"]
