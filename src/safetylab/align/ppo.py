"""PPO for RLHF: the policy with a value head (an actor–critic) trained against a reward, with a
per-token KL penalty to the frozen reference (Ziegler et al. 2019, "Fine-tuning language models from
human preferences"; Stiennon et al. 2020; Ouyang et al. 2022), as in ``lm-human-preferences`` and
TRL's PPO trainer:

    rollout   sample one response per prompt from π; score it (normalised to mean 0, std 1 under the
              starting policy, minus ``missing_eos_penalty`` when it has no eos); per-token rewards
              r_t = −β kl_t + [t = last] · score (k1 or k3); values V_t from the critic; GAE
              advantages and returns; advantages whitened
    update    ``ppo_epochs`` passes over the rollout in ``mini_batches`` mini-batches, each one
              optimiser step on L = L_clip(π) + c_v · L_Vclip  (:func:`.losses.policy_loss`,
              :func:`.losses.value_loss`)
    control   β fixed, or adapted towards a target KL after each rollout (:class:`AdaptiveKLController`)

:func:`train_ppo` is that loop, top to bottom, as CleanRL's ``ppo.py`` reads; each optimiser update is
one step of a :class:`safetylab.models.train.Trainer` (accelerate, checkpoints, resume, NaN guard,
gold tracking), so a rollout spans ``ppo_epochs · mini_batches`` steps, and checkpoints fall on
rollout boundaries. β and the score normalisation are saved with each
checkpoint. Logged with TRL's names: ``objective/scores`` (raw reward-model scores;
``objective/scores_normalized``: the ones the rewards use), ``objective/kl`` (the estimator the
penalty uses, beside ``objective/kl_k1|k2|k3``), ``objective/entropy``, ``objective/non_score_reward``,
``objective/rlhf_reward``, ``objective/kl_coef``, ``policy/approxkl_avg``, ``policy/clipfrac_avg``,
``policy/entropy_avg``, ``loss/policy_avg``, ``loss/value_avg``, ``val/clipfrac_avg``, ``val/ratio``,
``val/num_eos_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import reduce
from torch import nn

from safetylab.align.advantages import (
    AdaptiveKLController,
    FixedKLController,
    ScoreNormalizer,
    gae,
    kl_penalized_rewards,
    missing_eos_penalty,
    sequence_kl_stats,
)
from safetylab.align.losses import entropy_from_logits, policy_loss, value_loss
from safetylab.align.reward import Reward, RewardModel, sample_rewards
from safetylab.align.utils import masked_mean, masked_whiten
from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError
from safetylab.core.runs import RunDir
from safetylab.models.logprobs import Batch, batch_logprobs, check_same_vocabulary, gather_logprobs
from safetylab.models.sampling import sample
from safetylab.models.train import TrainConfig, Trainer, batch_indices


@dataclass(frozen=True)
class PPOConfig:
    # steps: optimiser updates (ppo_epochs · mini_batches per rollout); batch_size: prompts per rollout
    train: TrainConfig = TrainConfig(steps=200, batch_size=32, lr=3e-5, warmup_steps=8, log_every=8,
                                     checkpoint_every=40, eval_every=40)
    ppo_epochs: int = 4
    mini_batches: int = 1
    clip: float = 0.2  # ε of the ratio
    value_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    normalize_scores: bool = True  # scores to mean 0, std 1 under the starting policy (fixed after rollout 1)
    kl_coef: float = 0.05  # β, or its start when kl_target > 0
    kl_target: float = 0.0  # > 0: adapt β towards this KL (nats per response); 0: β fixed
    kl_horizon: int = 10_000
    kl_estimator: str = "k1"  # "k1" or "k3"
    missing_eos_penalty: float = 1.0
    max_new_tokens: int = 48  # sampling is at temperature 1: the gradient is the sampling policy's
    disable_dropout: bool = True  # train in eval mode: with dropout π_old and π differ at ratio 1 (TRL's default)

    def __post_init__(self):
        for name in ("ppo_epochs", "mini_batches", "kl_horizon", "max_new_tokens"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        updates = self.ppo_epochs * self.mini_batches
        require(self.train.checkpoint_every % updates == 0, "train.checkpoint_every",
                f"a multiple of ppo_epochs × mini_batches ({updates}), so that checkpoints fall between rollouts",
                self.train.checkpoint_every)
        require(self.train.batch_size >= self.mini_batches, "mini_batches",
                f"at most the prompts per rollout (batch_size {self.train.batch_size})", self.mini_batches)
        for name in ("clip", "value_clip"):
            require(getattr(self, name) > 0, name, "a number > 0", getattr(self, name))
        require(self.vf_coef >= 0, "vf_coef", "a number >= 0", self.vf_coef)
        for name in ("gamma", "lam"):
            require(0 <= getattr(self, name) <= 1, name, "a number in [0, 1]", getattr(self, name))
        require(self.kl_coef >= 0 and math.isfinite(self.kl_coef), "kl_coef", "a finite number >= 0", self.kl_coef)
        require(self.kl_target >= 0 and math.isfinite(self.kl_target), "kl_target", "a finite number >= 0 (0: β fixed)",
                self.kl_target)
        require(self.kl_target == 0 or self.kl_coef > 0, "kl_coef", "a number > 0 to adapt towards kl_target",
                self.kl_coef)
        require_choice(self.kl_estimator, "kl_estimator", ("k1", "k3"))
        require(math.isfinite(self.missing_eos_penalty), "missing_eos_penalty", "a finite number",
                self.missing_eos_penalty)


class ActorCritic(nn.Module):
    """A causal LM (the actor) with a scalar value head on its last hidden state (the critic). One
    backbone serves both, as TRL's ``AutoModelForCausalLMWithValueHead``: no second model in memory.
    The head starts at zero, so the first values are 0."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, T, V], values [B, T])``."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                          use_cache=False)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1).float()


@dataclass
class Rollout:
    """One batch of experience: the sampled sequences and, on their response tokens (``mask``,
    ``[B, T−1]`` aligned with next-token log-probs), π_old's log-probs, V_old, advantages and returns."""

    batch: Batch
    mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict[str, float]

    def rows(self, index: torch.Tensor) -> Rollout:
        """The rollout restricted to the rows in ``index``, trimmed to their longest sequence."""
        width = int(self.batch.attention_mask[index].sum(-1).max())
        batch = Batch(self.batch.input_ids[index, :width], self.batch.attention_mask[index, :width],
                      self.batch.response_mask[index, :width])
        tokens = [t[index, : width - 1] for t in (self.mask, self.logprobs, self.values, self.advantages, self.returns)]
        return Rollout(batch, *tokens, self.stats)


def response_logprobs_and_values(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """One forward pass of an :class:`ActorCritic`: ``(logprobs, values, mask, logits)`` at the
    positions that predict each next token (``[B, T−1]``; logits ``[B, T−1, V]``), masked to the
    response. V_t is the value of the state before token t + 1 is emitted."""
    logits, values = model(batch.input_ids, batch.attention_mask)
    logits = logits[:, :-1]
    mask = batch.response_mask[:, 1:].to(logits.dtype)
    return gather_logprobs(logits, batch.input_ids[:, 1:]) * mask, values[:, :-1] * mask, mask, logits


@torch.no_grad()
def collect_rollout(model: nn.Module, tokenizer, prompts: Sequence[str], reward: Reward, reference: nn.Module,
                    kl_coef: float, config: PPOConfig, device: torch.device,
                    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Rollout:
    """Sample, score and evaluate one response per prompt under the current actor–critic;
    ``normalize`` (a fitted :class:`ScoreNormalizer`) maps raw scores to the scale the rewards use."""
    actor = getattr(model, "module", model).policy  # generate on the bare model, not its DDP wrapper
    samples = sample(actor, tokenizer, prompts, config.max_new_tokens)
    batch = samples.to_batch(tokenizer).to(device)
    logprobs, values, mask, _ = response_logprobs_and_values(model, batch)
    ref_logprobs, _ = batch_logprobs(reference, batch)
    finished = samples.finished.to(device)
    raw = sample_rewards(reward, samples, batch)
    scores = missing_eos_penalty(raw if normalize is None else normalize(raw), finished, config.missing_eos_penalty)
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, config.kl_estimator)
    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    kl = sequence_kl_stats(logprobs, ref_logprobs, mask, config.kl_estimator)
    stats = {
        "objective/scores": raw.mean().item(),
        "objective/scores_normalized": scores.mean().item(),
        **kl,
        "objective/non_score_reward": -kl_coef * kl["objective/kl"],
        "objective/rlhf_reward": scores.mean().item() - kl_coef * kl["objective/kl"],  # on the rewards' scale
        "objective/entropy": -logprobs.sum(-1).mean().item(),
        "objective/kl_coef": kl_coef,
        "val/num_eos_tokens": finished.float().mean().item(),
    }
    return Rollout(batch, mask, logprobs, values, advantages, returns, stats)


def ppo_loss(model: nn.Module, rollout: Rollout, config: PPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_clip + c_v · L_Vclip on one mini-batch of a rollout, and TRL's statistics of it."""
    logprobs, values, mask, logits = response_logprobs_and_values(model, rollout.batch)
    pg_loss, pg = policy_loss(logprobs, rollout.logprobs, rollout.advantages, mask, config.clip)
    vf_loss, vf = value_loss(values, rollout.values, rollout.returns, mask, config.value_clip)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits), mask)
    return pg_loss + config.vf_coef * vf_loss, {
        **rollout.stats,
        "policy/approxkl_avg": pg["approxkl"].item(),
        "policy/clipfrac_avg": pg["clipfrac"].item(),
        "policy/entropy_avg": entropy.item(),
        "loss/policy_avg": pg_loss.item(),
        "loss/value_avg": vf_loss.item(),
        "val/clipfrac_avg": vf["clipfrac"].item(),
        "val/ratio": pg["ratio"].item(),
    }


def train_ppo(policy, tokenizer, prompts: Sequence[str], reward: Reward, reference, config: PPOConfig,
              run: RunDir, evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None):
    """Optimise ``policy`` against ``reward`` on ``prompts`` with PPO; returns the trained policy (the
    value head is only in the run's checkpoints). ``reference`` (frozen) must share the policy's
    tokenizer, and so must ``reward`` when it is a :class:`~safetylab.align.reward.RewardModel` (it
    then scores the sampled token ids). ``evaluate(policy)``: the gold tracker, as
    :class:`~safetylab.models.train.Trainer` runs it."""
    if not prompts:
        raise SafetylabError("ppo: no prompts")
    check_same_vocabulary(policy, reference)
    if isinstance(reward, RewardModel):
        check_same_vocabulary(policy, reward.backbone, "reward model")
    train = config.train
    updates = config.ppo_epochs * config.mini_batches  # optimiser steps per rollout
    kl_control = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon) if config.kl_target > 0
                  else FixedKLController(config.kl_coef))
    normalizer = ScoreNormalizer()  # fitted on the first rollout, then fixed

    def normalize(scores: torch.Tensor) -> torch.Tensor:
        if normalizer.mean is None:  # the first rollout: μ₀ and σ₀ over every process's samples
            moments = reduce(torch.stack([scores.mean(), scores.pow(2).mean()]), "mean")
            normalizer.fit(*moments.tolist())
        return normalizer(scores)

    track = None if evaluate is None else lambda model: evaluate(model.policy)
    with Trainer(ActorCritic(policy), train, run, "ppo", track, state=[kl_control, normalizer],
                 disable_dropout=config.disable_dropout) as trainer:
        model = trainer.model
        for iteration in range(trainer.start // updates, math.ceil(train.steps / updates)):
            # rollout: this process's share of the iteration's prompts, one response each from the current
            # policy, scored (reward, minus β · KL per token), valued by the critic, GAE advantages
            indices = batch_indices(len(prompts), train.batch_size, train.seed, iteration)
            local = [prompts[i] for i in indices[trainer.rank::trainer.processes]]
            if len(local) < config.mini_batches:
                raise SafetylabError(f"ppo: {config.mini_batches} mini-batches do not fit this process's "
                                     f"{len(local)} prompts per rollout")
            rollout = collect_rollout(model, tokenizer, local, reward, reference, kl_control.value, config,
                                      trainer.device, normalize if config.normalize_scores else None)
            kl_control.update(trainer.mean(rollout.stats["objective/kl"]), train.batch_size)

            # update: ppo_epochs passes over the rollout, each in mini_batches shuffled mini-batches, one
            # optimiser step on each (the shuffles are all drawn before the first step)
            orders = [torch.randperm(len(local)) for _ in range(config.ppo_epochs)]
            for epoch, order in enumerate(orders):
                for part, index in enumerate(order.chunk(config.mini_batches)):
                    step = iteration * updates + epoch * config.mini_batches + part
                    if trainer.start <= step < train.steps:  # a resume after a non-finite loss may start mid-rollout
                        loss, stats = ppo_loss(model, rollout.rows(index.to(trainer.device)), config)
                        trainer.update(step, loss, stats)
    return trainer.finish().policy
