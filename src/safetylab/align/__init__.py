"""Alignment: learning what people want from comparisons, and optimizing a policy for it.

- :mod:`.losses`: Bradley–Terry, the DPO family (DPO/cDPO, robust DPO, IPO, hinge, SimPO), PPO's
  clipped policy and value losses, as small pure functions;
- :mod:`.advantages`: GAE, KL-penalised per-token rewards, RLOO baselines, KL controllers, score
  normalisation;
- :mod:`.reward`: reward models on any HF backbone (causal LMs and encoders such as MiniLM), their
  training, evaluation and ensembles;
- :mod:`.dpo`, :mod:`.ppo`, :mod:`.rloo`, :mod:`.best_of_n`: optimising a policy against preferences
  or a reward; :func:`.dpo.policy_preferences` makes on-policy comparisons;
- :mod:`.data`: preference data in TRL's JSONL format, read strictly.
"""

from safetylab.align.data import Preference, Preferences, preferences_from_records, read_preferences
from safetylab.align.dpo import DPOConfig, policy_preferences, train_dpo
from safetylab.align.ppo import PPOConfig, train_ppo
from safetylab.align.reward import (
    RewardConfig,
    RewardEnsemble,
    RewardModel,
    conservative_reward,
    evaluate_reward_model,
    fit_reward_models,
    load_reward_model,
    minilm_path,
    save_reward_model,
    score,
    train_reward_model,
)
from safetylab.align.rloo import RLOOConfig, train_rloo

__all__ = [
    "DPOConfig", "PPOConfig", "Preference", "Preferences", "RLOOConfig", "RewardConfig", "RewardEnsemble",
    "RewardModel", "conservative_reward", "evaluate_reward_model", "fit_reward_models", "load_reward_model",
    "minilm_path", "policy_preferences", "preferences_from_records", "read_preferences", "save_reward_model",
    "score", "train_dpo", "train_ppo", "train_reward_model", "train_rloo",
]
