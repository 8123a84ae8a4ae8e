"""RLOO: REINFORCE with a leave-one-out baseline, critic-free RLHF (Ahmadian et al. 2024, "Back to
basics: revisiting REINFORCE style optimization for learning from human feedback in LLMs"; Kool et
al. 2019).

Each step samples k responses to each of a batch of prompts from the current policy, scores them
with the reward, and subtracts a KL penalty to the frozen reference:

    R(x, y) = score(x, y) − β · Σ_t KL_t(π ‖ π_ref)        (k1 or k3 per token)
    A_i = R_i − mean_{j≠i} R_j                            (over the k samples of one prompt)
    L = −mean over tokens of A · π(y_t) / sg(π(y_t))        (a PPO surrogate at ratio 1: REINFORCE)

Responses without an end-of-sequence token lose ``missing_eos_penalty`` from their score. The loop is
:func:`safetylab.models.train.train_loop` (accelerate, checkpoints, resume, NaN guard, gold tracking);
the prompt pool takes the place of a data set. Logged with TRL's names: ``objective/scores``,
``objective/kl`` (the estimator the penalty uses, beside ``objective/kl_k1|k2|k3``),
``objective/rlhf_reward``, ``objective/non_score_reward``, ``objective/entropy`` (Σ −log π per
response), ``val/num_eos_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from safetylab.align.advantages import missing_eos_penalty, rloo_advantages, sequence_kl_stats
from safetylab.align.losses import policy_loss
from safetylab.align.reward import Reward, RewardModel, sample_rewards
from safetylab.core.config import require, require_choice
from safetylab.core.runs import RunDir
from safetylab.models.logprobs import batch_logprobs, check_same_vocabulary, kl_per_token
from safetylab.models.packing import LAYOUTS
from safetylab.models.sampling import sample
from safetylab.models.train import Step, TrainConfig, train_loop


@dataclass(frozen=True)
class RLOOConfig:
    train: TrainConfig = TrainConfig(steps=100, batch_size=16, lr=3e-5, warmup_steps=5, log_every=10,
                                     checkpoint_every=50, eval_every=50)  # batch_size: prompts per step
    k: int = 4  # samples per prompt
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # "k1" or "k3"
    missing_eos_penalty: float = 1.0
    max_new_tokens: int = 48  # sampling is at temperature 1: the gradient is the sampling policy's
    layout: str = "packed"  # the k samples of a prompt share one prompt computation (safetylab.models.packing)
    disable_dropout: bool = True  # train in eval mode: the sampling policy is the policy trained (TRL's default)

    def __post_init__(self):
        require(self.k >= 2, "k", "an integer >= 2 (a leave-one-out baseline needs other samples)", self.k)
        require(self.kl_coef >= 0 and math.isfinite(self.kl_coef), "kl_coef", "a finite number >= 0", self.kl_coef)
        require_choice(self.kl_estimator, "kl_estimator", ("k1", "k3"))
        require(math.isfinite(self.missing_eos_penalty), "missing_eos_penalty", "a finite number",
                self.missing_eos_penalty)
        require(self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1", self.max_new_tokens)
        require_choice(self.layout, "layout", LAYOUTS)


def train_rloo(policy, tokenizer, prompts: Sequence[str], reward: Reward, reference, config: RLOOConfig,
               run: RunDir,
               evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None):
    """Optimise ``policy`` against ``reward`` on ``prompts`` with RLOO; returns the trained policy.
    ``reference`` (frozen) must share the policy's tokenizer, and so must ``reward`` when it is a
    :class:`~safetylab.align.reward.RewardModel` (it then scores the sampled token ids; a function
    of text works with any tokenizer)."""
    check_same_vocabulary(policy, reference)
    if isinstance(reward, RewardModel):
        check_same_vocabulary(policy, reward.backbone, "reward model")

    def step_loss(model, step: Step):
        generator = getattr(model, "module", model)  # generate on the bare model, not its DDP wrapper
        repeated = [prompts[i] for i in step.local for _ in range(config.k)]  # prompt-major
        samples = sample(generator, tokenizer, repeated, config.max_new_tokens)
        batch = samples.to_batch(tokenizer).to(step.device)
        logps, mask = batch_logprobs(model, batch, config.layout)
        with torch.no_grad():
            ref_logps, _ = batch_logprobs(reference, batch, config.layout)
            kl = kl_per_token(logps.detach(), ref_logps, mask)[config.kl_estimator].sum(-1)
            kl_stats = sequence_kl_stats(logps.detach(), ref_logps, mask, config.kl_estimator)
            scores = sample_rewards(reward, samples, batch, config.layout)
            scores = missing_eos_penalty(scores, samples.finished.to(step.device), config.missing_eos_penalty)
            rewards = scores - config.kl_coef * kl
            advantages = rloo_advantages(rewards, config.k)
        loss, _ = policy_loss(logps, logps.detach(), advantages[:, None].expand_as(logps), mask)
        return loss, {
            "objective/scores": scores.mean().item(),
            **kl_stats,
            "objective/non_score_reward": (-config.kl_coef * kl).mean().item(),
            "objective/rlhf_reward": rewards.mean().item(),
            "objective/entropy": -logps.detach().sum(-1).mean().item(),
            "val/num_eos_tokens": samples.finished.float().mean().item(),
        }

    return train_loop(policy, len(prompts), step_loss, config.train, run, "rloo", evaluate,
                      disable_dropout=config.disable_dropout)
