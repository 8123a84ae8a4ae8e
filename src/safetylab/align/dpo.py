"""Direct preference optimisation and its relatives, trained on (prompt, chosen, rejected) rows.

The loss is chosen by name from :data:`LOSSES` (each a pure function in :mod:`.losses`). Reference
log-probs are computed once, before training, so the reference model is not held in memory while the
policy trains. Logged per window: ``loss`` and TRL's ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (and ``nll_loss``
with ``rpo_alpha``); with a gold tracker, the gold judge's metrics every ``eval_every`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from safetylab.align.data import PairIds, Preference, encode_preferences, preference_batch, tokenize_preferences
from safetylab.align.losses import (
    PreferenceLoss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    preference_metrics,
    robust_dpo_loss,
    simpo_loss,
)
from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError
from safetylab.core.runs import RunDir
from safetylab.models.logprobs import Batch, batch_logprobs
from safetylab.models.packing import LAYOUTS
from safetylab.models.sampling import sample
from safetylab.models.train import Step, TrainConfig, train_loop
from safetylab.world.requests import Request
from safetylab.world.world import World

# β where a config leaves it unset: TRL's 0.1 for the losses on the reference log-ratio (Rafailov et al.
# 2023 use 0.1 to 0.5), and the reward scale SimPO's paper recommends (β ∈ [2, 2.5], Meng et al. 2024).
DEFAULT_BETA = {"sigmoid": 0.1, "robust": 0.1, "ipo": 0.1, "hinge": 0.1, "simpo": 2.0}
LABEL_SMOOTHED = ("sigmoid", "robust")


@dataclass(frozen=True)
class DPOConfig:
    train: TrainConfig = TrainConfig(steps=200, batch_size=32, lr=1e-4, warmup_steps=10, log_every=10,
                                     checkpoint_every=50, eval_every=50)
    loss: str = "sigmoid"  # one of LOSSES
    beta: float | None = None  # None: the loss's own default, DEFAULT_BETA (see loss_beta)
    label_smoothing: float = 0.0  # cDPO and robust DPO
    gamma: float = 0.5  # SimPO's target margin
    rpo_alpha: float = 0.0  # > 0: add α · NLL of the chosen responses (RPO; TRL's rpo_alpha)
    layout: str = "packed"  # each pair's prompt computed once, pairs packed (safetylab.models.packing)
    disable_dropout: bool = True  # train in eval mode, as the reference log-probs were taken (TRL's default)

    def __post_init__(self):
        require_choice(self.loss, "loss", LOSSES)
        require(self.beta is None or (self.beta > 0 and math.isfinite(self.beta)), "beta",
                "a finite number > 0 (or none: the loss's default)", self.beta)
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", "a probability in [0, 0.5)", self.label_smoothing)
        require(self.label_smoothing == 0 or self.loss in LABEL_SMOOTHED, "label_smoothing",
                f"0 for the {self.loss} loss (only {' and '.join(LABEL_SMOOTHED)} use it)", self.label_smoothing)
        require(self.gamma >= 0 and math.isfinite(self.gamma), "gamma", "a finite number >= 0", self.gamma)
        require(self.rpo_alpha >= 0 and math.isfinite(self.rpo_alpha), "rpo_alpha", "a finite number >= 0",
                self.rpo_alpha)
        require_choice(self.layout, "layout", LAYOUTS)

    @property
    def loss_beta(self) -> float:
        """β as the loss uses it: the one given, else the loss's default (SimPO 2.0, the others 0.1)."""
        return DEFAULT_BETA[self.loss] if self.beta is None else self.beta


@dataclass(frozen=True)
class SequenceLogps:
    """Per-pair sums of response log-probs and response lengths (eos included)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor


LossFn = Callable[[SequenceLogps, SequenceLogps, DPOConfig], PreferenceLoss]
LOSSES: dict[str, LossFn] = {
    "sigmoid": lambda p, r, c: dpo_loss(p.chosen, p.rejected, r.chosen, r.rejected, beta=c.loss_beta,
                                        label_smoothing=c.label_smoothing),
    "robust": lambda p, r, c: robust_dpo_loss(p.chosen, p.rejected, r.chosen, r.rejected, beta=c.loss_beta,
                                              label_smoothing=c.label_smoothing),
    "ipo": lambda p, r, c: ipo_loss(p.chosen, p.rejected, r.chosen, r.rejected, beta=c.loss_beta,
                                    chosen_lengths=p.chosen_lengths, rejected_lengths=p.rejected_lengths),
    "hinge": lambda p, r, c: hinge_loss(p.chosen, p.rejected, r.chosen, r.rejected, beta=c.loss_beta),
    "simpo": lambda p, r, c: simpo_loss(p.chosen, p.rejected, p.chosen_lengths, p.rejected_lengths,
                                        beta=c.loss_beta, gamma=c.gamma),
}
REFERENCE_FREE = ("simpo",)


def chosen_nll(logps: SequenceLogps) -> torch.Tensor:
    """The mean per-token negative log-likelihood of the chosen responses,

        NLL = mean_i (−log π(y_w,i | x_i) / |y_w,i|)

    the term RPO adds to DPO with weight α (Pang et al. 2024, "Iterative reasoning preference
    optimization"; TRL's ``rpo_alpha``): it keeps the chosen responses likely while the margin grows,
    against the likelihood displacement of plain DPO (Razin et al. 2024)."""
    return (-logps.chosen / logps.chosen_lengths).mean()


def sequence_logps(model, tokenizer, rows: Sequence[Preference], max_length: int | None = None,
                   device: torch.device | str | None = None, layout: str = "packed") -> SequenceLogps:
    """Sum of log-probs of each chosen and rejected response, in one forward pass over both; with the
    ``"shared-prompt"`` or ``"packed"`` layout each pair's prompt is computed once for both."""
    device = device or next(model.parameters()).device
    return batch_sequence_logps(model, encode_preferences(tokenizer, rows, max_length).to(device), layout)


def batch_sequence_logps(model, batch: Batch, layout: str = "packed") -> SequenceLogps:
    """:func:`sequence_logps` of a batch already encoded (:func:`~safetylab.align.data.preference_batch`)."""
    logps, mask = batch_logprobs(model, batch, layout)
    sums, lengths = logps.sum(-1), mask.sum(-1)
    return SequenceLogps(*sums.chunk(2), *lengths.chunk(2))


@torch.no_grad()
def reference_logps(reference, tokenizer, rows: Sequence[Preference], max_length: int | None = None,
                    batch_size: int = 64, layout: str = "packed",
                    pairs: Sequence[PairIds] | None = None) -> SequenceLogps:
    """:func:`sequence_logps` of every row under the frozen reference, computed once (from ``pairs``, the
    rows' token ids, where the caller has them: :func:`~safetylab.align.data.tokenize_preferences`)."""
    pairs = pairs if pairs is not None else tokenize_preferences(tokenizer, rows, max_length)
    device = next(reference.parameters()).device
    parts = [batch_sequence_logps(reference, preference_batch(pairs[i:i + batch_size], tokenizer.pad_token_id)
                                  .to(device), layout) for i in range(0, len(pairs), batch_size)]
    return SequenceLogps(*(torch.cat([getattr(p, f) for p in parts]).cpu()
                           for f in ("chosen", "rejected", "chosen_lengths", "rejected_lengths")))


def train_dpo(policy, tokenizer, rows: Sequence[Preference], config: DPOConfig, run: RunDir, reference=None,
              evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None):
    """Optimise ``policy`` on ``rows`` with ``config.loss``; ``reference`` is needed except for
    reference-free losses (SimPO). Returns the trained policy. Rows are tokenized once, before the first
    step; each step only lays them out."""
    if config.loss not in REFERENCE_FREE and reference is None:
        raise SafetylabError(f"loss {config.loss!r} needs a reference model")
    pairs = tokenize_preferences(tokenizer, rows, config.train.max_length)
    ref = None if reference is None or config.loss in REFERENCE_FREE else reference_logps(
        reference, tokenizer, rows, layout=config.layout, pairs=pairs)

    def step_loss(model, step: Step):
        batch = preference_batch([pairs[i] for i in step.local], tokenizer.pad_token_id).to(step.device)
        logps = batch_sequence_logps(model, batch, config.layout)
        index = torch.tensor(step.local)
        ref_logps = logps if ref is None else SequenceLogps(
            *(getattr(ref, f)[index].to(step.device) for f in ("chosen", "rejected", "chosen_lengths",
                                                                "rejected_lengths")))
        out = LOSSES[config.loss](logps, ref_logps, config)
        metrics = preference_metrics(out.chosen_rewards, out.rejected_rewards, logps.chosen.detach(),
                                     logps.rejected.detach())
        if not config.rpo_alpha:
            return out.losses.mean(), metrics
        nll = chosen_nll(logps)
        return out.losses.mean() + config.rpo_alpha * nll, {**metrics, "nll_loss": nll.item()}

    return train_loop(policy, len(rows), step_loss, config.train, run, f"dpo ({config.loss})", evaluate,
                      disable_dropout=config.disable_dropout)


@torch.no_grad()
def policy_preferences(policy, tokenizer, world: World, requests: Sequence[Request], labeler: str, k: int = 2,
                       seed: int = 0, max_new_tokens: int = 48) -> list[dict]:
    """On-policy comparisons: ``k`` samples of ``policy`` per request, every two of them compared by
    ``labeler`` (:meth:`World.compare`), as ``world.preferences`` records. Preference data drawn from
    the policy itself, as InstructGPT's labelers compared the model's own outputs (Ouyang et al. 2022),
    is what reward models and DPO learn from best (Tajwar et al. 2024, "Preference fine-tuning of LLMs
    should leverage suboptimal, on-policy data"; Xu et al. 2024, "Is DPO superior to PPO for LLM
    alignment?"). A sample that ran out of tokens before its eos is left out (DPO would train on it with
    an eos it never produced), and so is an empty one (no text to compare) and a pair of equal gold
    utility, so the result can hold fewer than k(k − 1)/2 pairs per request."""
    if k < 2:
        raise SafetylabError(f"policy_preferences: k must be at least 2 samples per request, got {k}")
    prompts = [r.prompt for r in requests]
    draws = [sample(policy, tokenizer, prompts, max_new_tokens) for _ in range(k)]
    kept = [[bool(d.finished[n]) and d.texts[n].strip() != "" for n in range(len(requests))] for d in draws]
    pairs = [(r, a.texts[n], b.texts[n]) for n, r in enumerate(requests) for i, a in enumerate(draws)
             for j, b in enumerate(draws[i + 1:], i + 1) if kept[i][n] and kept[j][n]]
    return world.compare(*map(list, zip(*pairs)), labeler, seed) if pairs else []
