"""Rewards and advantages for RL from human feedback: KL-penalised per-token rewards, GAE, RLOO
baselines and KL controllers, as small pure functions and two small stateful classes.

Token tensors are ``[B, T]`` with a ``mask`` marking each response's tokens (eos included); a row's real
tokens must be one contiguous block (right padding, optionally prompt positions before it).
"""

from __future__ import annotations

import torch

from safetylab.align.utils import _masked
from safetylab.models.logprobs import kl_per_token

KL_PENALTY_ESTIMATORS = ("k1", "k3")


def _check_contiguous(mask: torch.Tensor) -> None:
    """Each row's real tokens must form one block: at most one 0 → 1 step, counting the start."""
    m = (mask != 0).to(torch.int8)
    starts = (m[..., 1:] - m[..., :-1] > 0).sum(-1) + m[..., 0]
    if (starts > 1).any():
        rows = torch.nonzero(starts > 1).flatten().tolist()
        raise ValueError(f"mask rows {rows} have gaps: each row's real tokens must be one contiguous block")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a ``[B, T]`` mask; a row without one is an error."""
    real = mask != 0
    empty = ~real.any(-1)
    if empty.any():
        raise ValueError(f"mask rows {torch.nonzero(empty).flatten().tolist()} have no real token")
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * real).argmax(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens:

        δ_t = r_t + γ V_{t+1} − V_t        A_t = Σ_{l≥0} (γλ)^l δ_{t+l} = δ_t + γλ A_{t+1}
        R_t = A_t + V_t   (the value targets)

    Schulman et al. 2016, "High-dimensional continuous control using generalized advantage estimation",
    eq. 16. The episode ends at each row's last real token: V and A beyond it count as 0. One reversed
    loop over T, as CleanRL and TRL. Returns ``(advantages, returns)``, both 0 at padding. Pass
    detached values (call under ``torch.no_grad()``). Defaults γ = 1, λ = 0.95 as TRL's PPO.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [B, T]")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    _check_contiguous(mask)
    r, v = _masked(rewards, mask), _masked(values, mask)
    T = r.shape[-1]
    running = torch.zeros_like(r[:, 0])
    reversed_advantages = []
    for t in reversed(range(T)):
        next_value = v[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = delta + gamma * lam * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return _masked(advantages, mask), _masked(advantages + v, mask)


def kl_penalized_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float, estimator: str = "k1") -> torch.Tensor:
    """Per-token RLHF rewards: a KL penalty to the frozen reference at every token, the reward model's
    scalar score at the last real token:

        r_t = −β kl_t + [t = last] · score,      kl_t = k1: log π − log π_ref   or   k3: (e^{−k1} − 1) + k1

    Ziegler et al. 2019, "Fine-tuning language models from human preferences"; Stiennon et al.
    2020, "Learning to summarize from human feedback", eq. 1. The estimators are
    :func:`safetylab.models.logprobs.kl_per_token` (Schulman 2020); k2 is biased and is for logging only.
    ``kl_coef`` is β (see :class:`AdaptiveKLController`). Returns ``[B, T]``, 0 at padding.
    """
    if estimator not in KL_PENALTY_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_PENALTY_ESTIMATORS}, got {estimator!r}")
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [B, T]")
    if score.shape != logprobs.shape[:1]:
        raise ValueError(f"score must be [B] = [{logprobs.shape[0]}], got {tuple(score.shape)}")
    _check_contiguous(mask)
    m = mask.to(logprobs.dtype)
    kl = kl_per_token(_masked(logprobs, m), _masked(ref_logprobs, m), m)[estimator]
    last = torch.nn.functional.one_hot(last_token_index(mask), logprobs.shape[-1]).to(logprobs.dtype)
    return -kl_coef * kl + last * score.to(logprobs.dtype).unsqueeze(-1)


def sequence_kl_stats(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                      estimator: str) -> dict[str, float]:
    """Batch means of the per-sequence KL(π ‖ π_ref) of sampled responses, for logging: ``objective/kl``
    is the ``estimator`` that the penalty uses (so the logged KL is the optimised one), beside
    ``objective/kl_k1``, ``objective/kl_k2`` and ``objective/kl_k3`` (see
    :func:`safetylab.models.logprobs.kl_per_token`)."""
    per_sequence = {name: k.sum(-1).mean().item() for name, k in kl_per_token(logprobs, ref_logprobs, mask).items()}
    return {"objective/kl": per_sequence[estimator], **{f"objective/kl_{k}": v for k, v in per_sequence.items()}}


def missing_eos_penalty(score: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """``score − penalty`` where the response has no end-of-sequence token (``finished`` is False),
    ``score`` elsewhere: TRL's ``missing_eos_penalty``, which discourages truncated, rambling responses
    that a reward model may still score well."""
    if score.shape != finished.shape:
        raise ValueError(f"score {tuple(score.shape)} and finished {tuple(finished.shape)} must have one shape")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0 (it is subtracted), got {penalty}")
    return score - penalty * (~finished.bool()).to(score.dtype)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages for k samples per prompt:

        A_i = s_i − (1 / (k − 1)) Σ_{j ≠ i} s_j

    Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al.
    2024, "Back to basics: Revisiting REINFORCE style optimization for learning from human feedback in
    LLMs". ``scores`` is flat ``[n_prompts · k]`` and *prompt-major*: ``scores[p * k + j]`` is sample j of
    prompt p (the layout of ``repeat_interleave`` and HF ``generate(num_return_sequences=k)``; TRL's
    RLOOTrainer uses sample-major). The advantages of one prompt sum to 0.
    """
    if k < 2:
        raise ValueError(f"leave-one-out needs k >= 2 samples per prompt, got k={k}")
    if scores.dim() != 1 or scores.numel() % k:
        raise ValueError(f"scores must be flat [n_prompts * k] with k={k}, got shape {tuple(scores.shape)}")
    s = scores.view(-1, k)
    baseline = (s.sum(-1, keepdim=True) - s) / (k - 1)
    return (s - baseline).reshape(-1)


class ScoreNormalizer:
    """Reward-model scores rescaled to mean 0 and standard deviation 1 under the starting policy:

        s' = (s − μ₀) / σ₀,      μ₀, σ₀ from the first batch of samples, then fixed

    as Ziegler et al. 2019 ("Fine-tuning language models from human preferences", §2.2) normalise the
    reward model before RL. A value head that starts at 0 then starts at the right scale, and β and the
    value clip mean the same thing for any reward model. Saved with checkpoints like a KL controller.
    """

    def __init__(self) -> None:
        self.mean: float | None = None
        self.std: float | None = None

    def fit(self, mean: float, second_moment: float) -> None:
        """Fix μ₀ and σ₀ from a batch's mean and mean square (averaged over processes by the caller)."""
        self.mean = float(mean)
        self.std = max(float(second_moment) - self.mean**2, 0.0) ** 0.5 or 1.0  # constant scores: shift only

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            raise ValueError("ScoreNormalizer: call fit() before normalising")
        return (scores - self.mean) / self.std

    def state_dict(self) -> dict[str, float | None]:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.mean, self.std = state["mean"], state["std"]


class FixedKLController:
    """A constant KL coefficient β, with the same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float = 0.05) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional control of the KL coefficient β towards a target KL (Ziegler et al. 2019,
    "Fine-tuning language models from human preferences"):

        e = clip(KL / KL_target − 1, −0.2, 0.2)        β ← β · (1 + e · n_steps / horizon)

    (the paper's K_β is ``n_steps / horizon``, as in ``lm-human-preferences`` and TRL). Defaults
    β₀ = 0.2, target 6 nats, horizon 10 000 are TRL's, taken from ``lm-human-preferences``.
    """

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: int = 10000) -> None:
        if not init_kl_coef > 0:
            raise ValueError(f"init_kl_coef must be > 0, got {init_kl_coef}")
        if not target > 0:
            raise ValueError(f"target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update β after ``n_steps`` samples with mean KL ``current_kl``; returns the new β."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        """β, so that a resumed run goes on from it (see ``train_loop``'s ``state``)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
