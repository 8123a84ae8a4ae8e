"""Device selection: the caller names one or takes the best available; nothing is hard-coded."""

from __future__ import annotations

import torch

from safetylab.core.config import require
from safetylab.core.errors import SafetylabError

DEVICES = ("auto", "cpu", "cuda", "mps")


def check_device_name(name: str, field: str = "device") -> str:
    """``name`` must name a kind of device (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``); whether
    that device is available is :func:`select_device`'s question."""
    kind, colon, index = str(name).partition(":")
    require(kind in DEVICES and (not colon or (kind == "cuda" and index.isdigit())), field,
            "auto, cpu, cuda, cuda:N or mps", name)
    return name


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; a named device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = check_device_name(name).split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise SafetylabError(f"device {name!r}: CUDA is not available on this machine")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SafetylabError(f"device {name!r}: MPS is not available on this machine")
    return torch.device(name)
