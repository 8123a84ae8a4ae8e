"""Direct preference optimisation and its relatives, trained on (prompt, chosen, rejected) rows.

The loss is chosen by name from :data:`LOSSES` (each a pure function in :mod:`.losses`). Reference
log-probs are computed once, before training, so the reference model is not held in memory while the
policy trains. Logged per window: ``loss`` and TRL's ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (and ``nll_loss``
with ``rpo_alpha``); with a gold tracker, the gold judge's metrics every ``eval_every`` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from safetylab.align.data import Preference, encode_preferences
from safetylab.align.losses import (
    PreferenceLoss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    preference_metrics,
    robust_dpo_loss,
    simpo_loss,
)
from safetylab.core.errors import SafetylabError
from safetylab.core.runs import RunDir
from safetylab.models.logprobs import Template, batch_logprobs
from safetylab.models.packing import check_layout
from safetylab.models.sampling import sample
from safetylab.models.train import Step, TrainConfig, train_loop
from safetylab.world.requests import Request
from safetylab.world.world import World, chat


@dataclass(frozen=True)
class DPOConfig:
    train: TrainConfig = TrainConfig(steps=200, batch_size=32, lr=1e-4, warmup_steps=10, log_every=10,
                                     checkpoint_every=50, eval_every=50)
    loss: str = "sigmoid"  # one of LOSSES
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO and robust DPO
    gamma: float = 0.5  # SimPO's target margin
    rpo_alpha: float = 0.0  # > 0: add α · NLL of the chosen responses (RPO; TRL's rpo_alpha)
    layout: str = "packed"  # each pair's prompt computed once, pairs packed (safetylab.models.packing)


@dataclass(frozen=True)
class SequenceLogps:
    """Per-pair sums of response log-probs and response lengths (eos included)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor


LossFn = Callable[[SequenceLogps, SequenceLogps, DPOConfig], PreferenceLoss]
LOSSES: dict[str, LossFn] = {
    "sigmoid": lambda p, r, c: dpo_loss(p.chosen, p.rejected, r.chosen, r.rejected, beta=c.beta,
                                        label_smoothing=c.label_smoothing),
    "robust": lambda p, r, c: robust_dpo_loss(p.chosen, p.rejected, r.chosen, r.rejected, beta=c.beta,
                                              label_smoothing=c.label_smoothing),
    "ipo": lambda p, r, c: ipo_loss(p.chosen, p.rejected, r.chosen, r.rejected, beta=c.beta,
                                    chosen_lengths=p.chosen_lengths, rejected_lengths=p.rejected_lengths),
    "hinge": lambda p, r, c: hinge_loss(p.chosen, p.rejected, r.chosen, r.rejected, beta=c.beta),
    "simpo": lambda p, r, c: simpo_loss(p.chosen, p.rejected, p.chosen_lengths, p.rejected_lengths, beta=c.beta,
                                        gamma=c.gamma),
}
REFERENCE_FREE = ("simpo",)


def chosen_nll(logps: SequenceLogps) -> torch.Tensor:
    """The mean per-token negative log-likelihood of the chosen responses,

        NLL = mean_i (−log π(y_w,i | x_i) / |y_w,i|)

    the term RPO adds to DPO with weight α (Pang et al. 2024, "Iterative reasoning preference
    optimization"; TRL's ``rpo_alpha``): it keeps the chosen responses likely while the margin grows,
    against the likelihood displacement of plain DPO (Razin et al. 2024)."""
    return (-logps.chosen / logps.chosen_lengths).mean()


def sequence_logps(model, tokenizer, rows: Sequence[Preference], template: Template = chat,
                   max_length: int | None = None, device: torch.device | str | None = None,
                   layout: str = "packed") -> SequenceLogps:
    """Sum of log-probs of each chosen and rejected response, in one forward pass over both; with the
    ``"shared-prompt"`` or ``"packed"`` layout each pair's prompt is computed once for both."""
    device = device or next(model.parameters()).device
    batch = encode_preferences(tokenizer, rows, template, max_length).to(device)
    logps, mask = batch_logprobs(model, batch, layout)
    sums, lengths = logps.sum(-1), mask.sum(-1)
    return SequenceLogps(*sums.chunk(2), *lengths.chunk(2))


@torch.no_grad()
def reference_logps(reference, tokenizer, rows: Sequence[Preference], template: Template = chat,
                    max_length: int | None = None, batch_size: int = 64, layout: str = "packed") -> SequenceLogps:
    """:func:`sequence_logps` of every row under the frozen reference, computed once."""
    parts = [sequence_logps(reference, tokenizer, rows[i:i + batch_size], template, max_length, layout=layout)
             for i in range(0, len(rows), batch_size)]
    return SequenceLogps(*(torch.cat([getattr(p, f) for p in parts]).cpu()
                           for f in ("chosen", "rejected", "chosen_lengths", "rejected_lengths")))


def train_dpo(policy, tokenizer, rows: Sequence[Preference], config: DPOConfig, run: RunDir, reference=None,
              template: Template = chat, evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None):
    """Optimise ``policy`` on ``rows`` with ``config.loss``; ``reference`` is needed except for
    reference-free losses (SimPO). Returns the trained policy."""
    if config.loss not in LOSSES:
        raise SafetylabError(f"unknown preference loss {config.loss!r} (expected one of: {', '.join(LOSSES)})")
    check_layout(config.layout)
    max_length = config.train.max_length
    ref = None
    if config.loss not in REFERENCE_FREE:
        if reference is None:
            raise SafetylabError(f"loss {config.loss!r} needs a reference model")
        ref = reference_logps(reference, tokenizer, rows, template, max_length, layout=config.layout)

    def step_loss(model, step: Step):
        local = [rows[i] for i in step.local]
        logps = sequence_logps(model, tokenizer, local, template, max_length, step.device, config.layout)
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

    return train_loop(policy, len(rows), step_loss, config.train, run, f"dpo ({config.loss})", evaluate)


@torch.no_grad()
def policy_preferences(policy, tokenizer, world: World, requests: Sequence[Request], labeler: str, k: int = 2,
                       seed: int = 0, max_new_tokens: int = 48) -> list[dict]:
    """On-policy comparisons: ``k`` samples of ``policy`` per request, every two of them compared by
    ``labeler`` (:meth:`World.compare`), as ``world.preferences`` records. Preference data drawn from
    the policy itself, as InstructGPT's labelers compared the model's own outputs (Ouyang et al. 2022),
    is what reward models and DPO learn from best (Tajwar et al. 2024, "Preference fine-tuning of LLMs
    should leverage suboptimal, on-policy data"; Xu et al. 2024, "Is DPO superior to PPO for LLM
    alignment?"). A sample that ran out of tokens before its eos is left out (DPO would train on it with
    an eos it never produced), and so is a pair of equal gold utility, so the result can hold fewer
    than k(k − 1)/2 pairs per request."""
    if k < 2:
        raise SafetylabError(f"policy_preferences: k must be at least 2 samples per request, got {k}")
    prompts = [r.prompt for r in requests]
    draws = [sample(policy, tokenizer, prompts, max_new_tokens) for _ in range(k)]
    pairs = [(r, a.texts[n], b.texts[n]) for n, r in enumerate(requests) for i, a in enumerate(draws)
             for b in draws[i + 1:] if a.finished[n] and b.finished[n]]
    return world.compare(*map(list, zip(*pairs)), labeler, seed) if pairs else []
