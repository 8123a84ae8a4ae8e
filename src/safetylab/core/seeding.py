"""Seeding that makes a CPU run bit-for-bit reproducible."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and PyTorch; return a fresh ``torch.Generator`` seeded the same way.

    With ``deterministic`` PyTorch is asked for deterministic kernels (``warn_only`` so that an op
    without one warns instead of failing); on CPU, with the same thread count, runs then repeat
    bit for bit.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)
