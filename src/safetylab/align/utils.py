"""Shared masked maths for the alignment losses and advantages (as OpenRLHF's ``models/utils.py``).

``mask`` marks real tokens (1, or ``True``) and padding (0). Padding entries never reach a result, even
when they hold ``nan`` or ``±inf`` (``x * 0`` would be ``nan`` there, so they are selected away first).
"""

from __future__ import annotations

import torch


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x · mask`` with padding set to exactly 0, whatever ``x`` holds there."""
    if x.shape != mask.shape:
        raise ValueError(f"values of shape {tuple(x.shape)} but mask of shape {tuple(mask.shape)}")
    m = mask.to(x.dtype)
    return torch.where(m != 0, x * m, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ_t m_t x_t over ``dim`` (all entries when ``None``)."""
    xm = _masked(x, mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ_t m_t x_t / Σ_t m_t over ``dim`` (all entries when ``None``).

    An all-padding slice gives ``nan`` (0/0), as in TRL and OpenRLHF: there is no mean to report.
    """
    m = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / (m.sum() if dim is None else m.sum(dim))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries, Σ m (x − x̄)² / (n − 1) with n = Σ m when ``unbiased`` (Bessel's
    correction, as TRL's and the original ``lm-human-preferences`` ``masked_var`` do), else / n."""
    n = mask.to(x.dtype).sum()
    if unbiased and n < 2:
        raise ValueError(f"unbiased variance needs at least 2 unmasked entries, got {int(n.item())}")
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered.pow(2), mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Advantage whitening over the masked entries of the whole batch:
    (x − x̄) / √(s² + ε), with s² the *unbiased* masked variance (TRL and ``lm-human-preferences``
    ``whiten``, as used for PPO advantages). With ``shift_mean=False`` the mean is added back (only
    the scale changes). Padding entries are returned as 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _masked(out, mask)
