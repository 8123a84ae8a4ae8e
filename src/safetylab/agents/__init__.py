"""Safety gridworlds, agents that fail them, and mitigations that fix them.

- :mod:`.gridworld`: the engine — a Gymnasium ``Env`` whose steps return the visible reward and, in
  ``info``, the hidden reward and (at the end) the episode's performance;
- :mod:`.envs`: the environments, registered as ``safetylab/NAME-v0`` when this package is imported;
- :mod:`.tabular` and :mod:`.deep`: Q-learning and SARSA; PPO and DQN through Stable-Baselines3;
- :mod:`.mitigations`: shield, safely interruptible SARSA, relative reachability, a supervisor the agent
  cannot see, a reward learned from preferences, abstention in unfamiliar states, training-level
  diversity;
- :mod:`.offswitch`: the off-switch game; :mod:`.experiment`: runs, the suite, curves and episode strips.
"""

from safetylab.agents.envs import ENVIRONMENTS, register_environments
from safetylab.agents.gridworld import ACTION_NAMES, TILES, Gridworld

ENV_IDS = register_environments()

__all__ = ["ACTION_NAMES", "ENVIRONMENTS", "ENV_IDS", "TILES", "Gridworld", "register_environments"]
