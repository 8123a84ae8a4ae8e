"""Best-of-n sampling: draw n responses, keep the one a reward model scores highest.

The simplest way to optimise against a reward, and the cleanest view of Goodhart's law: as n
grows, the proxy reward of the kept response rises for sure, while its true (gold) value need not.
Its KL to the sampling policy is at most log n − (n − 1)/n (Stiennon et al. 2020, appendix; shown to
be an upper bound by Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment
policy"); :func:`best_of_n_kl` estimates the actual value, which is lower when responses repeat.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from safetylab.models.sampling import sample

RewardFn = Callable[[Sequence[str], Sequence[str]], torch.Tensor]


def best_of_n_kl_bound(n: int) -> float:
    """log n − (n − 1)/n: the KL of best-of-n to the base policy when rewards never tie, and an
    upper bound on it otherwise (Beirami et al. 2024)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_kl(base_rewards: torch.Tensor, n: int) -> torch.Tensor:
    """KL(best-of-n ‖ base) per prompt, from m rewards of base samples per prompt (``[P, m]``).

    With F(r) = P(R ≤ r) and F⁻(r) = P(R < r) under the base policy, best-of-n puts mass
    F(r)ⁿ − F⁻(r)ⁿ on each reward level r that the base gives mass F(r) − F⁻(r), and within a level
    it keeps the base's proportions, so KL = Σ_r (Fⁿ − F⁻ⁿ) log((Fⁿ − F⁻ⁿ) / (F − F⁻)). For
    distinct rewards and m → ∞ this tends to log n − (n − 1)/n; ties (repeated responses) lower it.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = []
    for row in base_rewards.detach().float().cpu():
        levels, counts = torch.unique(row, return_counts=True)  # sorted ascending
        p = counts.double() / row.numel()
        upper = p.cumsum(0)
        lower = upper - p
        q = upper.pow(n) - lower.pow(n)
        keep = q > 0
        out.append((q[keep] * (q[keep] / p[keep]).log()).sum())
    return torch.stack(out).float()


@dataclass
class BestOfN:
    """The kept responses and what they cost: ``rewards`` ``[P, n]`` of every candidate, ``best``
    the index kept per prompt, ``kl_bound`` and (with ``kl_samples``) ``kl`` per prompt."""

    prompts: list[str]
    responses: list[str]
    candidates: list[list[str]]
    rewards: torch.Tensor
    best: torch.Tensor
    kl_bound: float
    kl: torch.Tensor | None

    @property
    def proxy(self) -> torch.Tensor:
        """The reward of each kept response."""
        return self.rewards.gather(1, self.best[:, None]).squeeze(1)


@torch.no_grad()
def best_of_n(policy, tokenizer, prompts: Sequence[str], reward: RewardFn, n: int, kl_samples: int = 0,
              max_new_tokens: int = 48, temperature: float = 1.0, batch_size: int = 256) -> BestOfN:
    """Sample ``n`` responses per prompt from ``policy``, keep the highest-``reward`` one (the first
    on ties). ``kl_samples`` > 0 draws that many more responses per prompt to estimate the KL of the
    best-of-n policy (:func:`best_of_n_kl`)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    repeated = [p for p in prompts for _ in range(n)]  # prompt-major: row p holds its n candidates
    texts = sample(policy, tokenizer, repeated, max_new_tokens, temperature, batch_size=batch_size).texts
    rewards = reward(repeated, texts).float().view(len(prompts), n).cpu()
    best = rewards.argmax(1)
    candidates = [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
    kl = None
    if kl_samples:
        extra = [p for p in prompts for _ in range(kl_samples)]
        base_texts = sample(policy, tokenizer, extra, max_new_tokens, temperature, batch_size=batch_size).texts
        kl = best_of_n_kl(reward(extra, base_texts).float().view(len(prompts), kl_samples), n)
    responses = [c[int(b)] for c, b in zip(candidates, best)]
    return BestOfN(list(prompts), responses, candidates, rewards, best, best_of_n_kl_bound(n), kl)
