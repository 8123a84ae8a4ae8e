"""Alignment losses as small pure functions: reward models, the DPO family and PPO.

Each function carries its formula and paper. Notation: σ is the logistic function, and for a preference
pair (y_w chosen, y_l rejected) the DPO family uses sequence log-probs (sums over response tokens, see
:func:`safetylab.align.utils.masked_sum`) of the policy π and the frozen reference π_ref:

    h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

Preference losses return per-example values (``losses.mean()`` is the usual objective) together with
the implicit rewards that TRL logs, detached, as a :class:`PreferenceLoss`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from safetylab.align.utils import masked_mean


class PreferenceLoss(NamedTuple):
    """Per-example ``losses`` and the (detached) implicit rewards of the chosen and rejected responses."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


# ----------------------------------------------------------------------------- checks
def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_label_smoothing(eps: float) -> None:
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of one shape, got {shapes}")


def _check_lengths(**lengths: torch.Tensor) -> None:
    for name, n in lengths.items():
        if (n <= 0).any():
            raise ValueError(f"{name} must be > 0 (response lengths in tokens), got {n.tolist()}")


def _logratios(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_same_shape(policy_chosen_logps=policy_chosen, policy_rejected_logps=policy_rejected,
                      ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


def _dpo_output(losses: torch.Tensor, chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor,
                beta: float) -> PreferenceLoss:
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


# ----------------------------------------------------------------------------- reward models
def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
                       center_coef: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Reward-model loss on scalar rewards r⁺ (chosen) and r⁻ (rejected):

        L = −log σ(r⁺ − r⁻ − m) + η · (r⁺ + r⁻)²

    - Bradley & Terry 1952, "Rank analysis of incomplete block designs": P(y⁺ ≻ y⁻) = σ(r⁺ − r⁻);
      used for RLHF reward models by Ouyang et al. 2022 ("InstructGPT"), eq. 1.
    - margin m (default 0): Touvron et al. 2023 ("Llama 2"), eq. 2 — a larger margin for pairs rated
      as clearly different; a number, or a tensor of the shape of ``chosen`` (one margin per pair).
    - centring η = ``center_coef`` (default 0): Eisenstein et al. 2023 ("Helping or Herding? Reward
      model ensembles mitigate but do not eliminate reward hacking"), an auxiliary loss that pins the
      free additive constant of the rewards near 0 (TRL's ``center_rewards_coefficient``).

    ``reduction``: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-example losses).
    """
    _check_same_shape(chosen=chosen, rejected=rejected)
    if isinstance(margin, torch.Tensor) and margin.dim():
        _check_same_shape(chosen=chosen, margin=margin)  # a margin per pair, never broadcast across pairs
    if not center_coef >= 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected).pow(2)
    return _reduce(losses, reduction)


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------- DPO family
def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> PreferenceLoss:
    """Sigmoid DPO, with conservative label smoothing ε (cDPO):

        L = −(1 − ε) log σ(β h) − ε log σ(−β h)

    Rafailov et al. 2023, "Direct Preference Optimization: Your language model is secretly a reward
    model", eq. 7 (ε = 0); Mitchell 2023, "A note on DPO with noisy preferences and relationship to
    IPO" (cDPO: the label is right with probability 1 − ε). Implicit rewards β (log π − log π_ref).
    """
    _check_beta(beta)
    _check_label_smoothing(label_smoothing)
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return _dpo_output(losses, chosen, rejected, beta)


def robust_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
                    label_smoothing: float = 0.0) -> PreferenceLoss:
    """Robust DPO for labels flipped with known probability ε:

        L = [−(1 − ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)

    Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning language models with noisy
    feedback" (as TRL's ``loss_type="robust"``). It is an unbiased estimate of the clean DPO
    loss: if the observed label is flipped with probability ε, E[L(observed pair)] = −log σ(β h_true).
    Unlike cDPO it can be negative. ε = 0 gives sigmoid DPO.
    """
    _check_beta(beta)
    _check_label_smoothing(label_smoothing)
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (chosen - rejected)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _dpo_output(losses, chosen, rejected, beta)


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             ) -> PreferenceLoss:
    """IPO, a squared loss that regresses h onto a fixed target 1/(2β) instead of pushing it to ∞:

        L = (h − 1/(2β))²

    Azar et al. 2023, "A general theoretical paradigm to understand learning from human preferences",
    eq. 17 (β is the paper's τ). Its minimum is at h = 1/(2β).

    Sum or average: the paper writes h with sequence log-probs (sums). With sums the fixed target
    1/(2β) means a different per-token pull for long and short responses, so, as the IPO authors advised
    TRL (huggingface/trl PR #1265, HF blog "Preference tuning LLMs"), pass ``chosen_lengths`` and
    ``rejected_lengths`` (response tokens) and every log-prob is divided by its length first: h on
    length-averaged log-ratios, as TRL does. Without lengths the inputs are used as given (sums: the
    paper's formula). The implicit rewards use the same (averaged or summed) log-ratios.
    """
    _check_beta(beta)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if chosen_lengths is not None and rejected_lengths is not None:
        _check_same_shape(chosen_logps=chosen, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        _check_lengths(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        chosen, rejected = chosen / chosen_lengths, rejected / rejected_lengths
    losses = (chosen - rejected - 1 / (2 * beta)).pow(2)
    return _dpo_output(losses, chosen, rejected, beta)


def hinge_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
               ) -> PreferenceLoss:
    """Hinge (SLiC) loss on the DPO log-ratio difference:

        L = max(0, 1 − β h)

    Zhao et al. 2023, "SLiC-HF: Sequence likelihood calibration with human feedback" (rank calibration
    loss max(0, δ − log π(y_w) + log π(y_l)); here on the reference-corrected log-ratio h with margin
    δ = 1/β and scaled by β, as TRL's ``loss_type="hinge"``). Zero once β h ≥ 1.
    """
    _check_beta(beta)
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * (chosen - rejected))
    return _dpo_output(losses, chosen, rejected, beta)


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, *, beta: float = 2.0,
               gamma: float = 0.5) -> PreferenceLoss:
    """SimPO: reference-free and length-normalised, with a target reward margin γ:

        r(y) = β / |y| · log π(y)        L = −log σ(r(y_w) − r(y_l) − γ)

    Meng, Xia & Chen 2024, "SimPO: Simple preference optimization with a reference-free reward".
    ``*_logps`` are sequence log-prob sums and ``*_lengths`` the response lengths |y| in tokens.
    Defaults β = 2, γ = 0.5 lie in the paper's recommended ranges (β ∈ [2, 2.5], γ ∈ [0.5, 1.5]).
    The rewards returned are r(y_w) and r(y_l).
    """
    _check_beta(beta)
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _check_lengths(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen = beta * policy_chosen_logps / chosen_lengths
    rejected = beta * policy_rejected_logps / rejected_lengths
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return PreferenceLoss(losses, chosen.detach(), rejected.detach())


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                       rejected_logps: torch.Tensor) -> dict[str, float]:
    """The batch means TRL's ``DPOTrainer`` logs, under its names:

    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (chosen − rejected),
    ``rewards/accuracies`` (fraction with chosen > rejected, strictly), ``logps/chosen``, ``logps/rejected``.
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                      chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": chosen_logps.detach().float().mean().item(),
        "logps/rejected": rejected_logps.detach().float().mean().item(),
    }


# ----------------------------------------------------------------------------- PPO
def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, averaged over the masked tokens of the batch:

        ρ = exp(log π − log π_old)      L = mean_t max(−A ρ, −A clip(ρ, 1 − c, 1 + c))

    Schulman et al. 2017, "Proximal policy optimization algorithms", eq. 7 (negated, to minimise).
    Stats (detached): ``clipfrac`` — fraction of tokens where the clipped term is the larger one, i.e.
    where clipping zeroes the gradient (TRL's and ``lm-human-preferences``' definition; CleanRL instead
    counts |ρ − 1| > c regardless of the advantage's sign); ``approxkl`` — ½ mean (log ρ)², the estimator
    of KL(π_old ‖ π) that TRL and ``lm-human-preferences`` log (k2 of Schulman 2020); ``ratio`` — mean ρ.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            "approxkl": 0.5 * masked_mean(log_ratio.pow(2), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, averaged over the masked tokens of the batch:

        V_clip = V_old + clip(V − V_old, −c, c)      L = ½ mean_t max((V − R)², (V_clip − R)²)

    As in OpenAI ``baselines`` ppo2 and ``lm-human-preferences`` (also TRL, OpenRLHF); Schulman et al.
    2017 use the unclipped (V − R)². Stats (detached): ``clipfrac`` — fraction of tokens where the clipped
    error is the larger one.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err = (values - returns).pow(2)
    clipped_err = (clipped_values - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_err > unclipped_err).to(values.dtype), mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension:

        H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v

    (the form TRL and OpenRLHF use: no log-softmax tensor is kept).
    """
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)
