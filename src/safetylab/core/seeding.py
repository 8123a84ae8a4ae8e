"""Seeds: one root seed per run, every stream derived from it by purpose, global state set once.

A stream that needs randomness asks for ``derive_seed(root, "gridworlds", "eval", i)`` instead of an
ad hoc offset such as ``10_000 + seed + i``: offsets make seeds collide (seed 0's member 1 is seed 1's
member 0), derived seeds do not (the chance that two purposes share a 63-bit seed is negligible).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def derive_seed(root: int, *purpose: object) -> int:
    """A seed for the stream named by ``purpose`` under the run's ``root`` seed: the first 63 bits of
    SHA-256 over the root and the purpose's parts. The same (root, purpose) always gives the same seed;
    a different root or purpose gives an unrelated one."""
    text = "/".join(map(str, (root, *purpose)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and PyTorch; return a fresh ``torch.Generator`` seeded the same way. Call it once,
    at an entry point (a command, a stage of a study); libraries take a seed or a generator instead.

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


@contextmanager
def torch_seed(seed: int) -> Iterator[None]:
    """Run the block with torch's global generator seeded by ``seed`` (weight initialisation, dropout,
    ``torch.multinomial``) and restore the generator's state after it, so the block's randomness
    neither depends on nor changes what ran before."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # manual_seed seeds the CUDA generators too: restore them
        torch.manual_seed(seed)
        yield
