"""Alignment: learning what people want from comparisons, and optimizing a policy for it.

- :mod:`.losses`: Bradley–Terry, the DPO family (DPO/cDPO, robust DPO, IPO, hinge, SimPO), PPO's
  clipped policy and value losses, as small pure functions;
- :mod:`.advantages`: GAE, KL-penalised per-token rewards, RLOO baselines, KL controllers;
- :mod:`.reward`: reward models on any HF backbone, their training, evaluation and ensembles;
- :mod:`.dpo`, :mod:`.rloo`, :mod:`.best_of_n`: optimising a policy against preferences or a reward;
- :mod:`.data`: preference data in TRL's JSONL format, read strictly.
"""

from safetylab.align.data import Preference, Preferences, preferences_from_records, read_preferences
from safetylab.align.reward import (
    RewardConfig,
    RewardEnsemble,
    RewardModel,
    conservative_reward,
    evaluate_reward_model,
    fit_reward_models,
    load_reward_model,
    save_reward_model,
    train_reward_model,
)

__all__ = [
    "Preference", "Preferences", "RewardConfig", "RewardEnsemble", "RewardModel", "conservative_reward",
    "evaluate_reward_model", "fit_reward_models", "load_reward_model", "preferences_from_records",
    "read_preferences", "save_reward_model", "train_reward_model",
]
