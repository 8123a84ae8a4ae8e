"""Device selection: the caller names one or takes the best available; nothing is hard-coded."""

from __future__ import annotations

import torch

from safetylab.core.errors import SafetylabError

DEVICES = ("auto", "cpu", "cuda", "mps")


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; a named device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise SafetylabError(f"device {name!r}: expected one of {', '.join(DEVICES)} (cuda:N allowed)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SafetylabError(f"device {name!r}: CUDA is not available on this machine")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SafetylabError(f"device {name!r}: MPS is not available on this machine")
    return torch.device(name)
