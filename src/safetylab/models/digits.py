"""The built-in demo: scikit-learn's bundled digits (1,797 8×8 images, no download) and small classifiers.

Images are scaled to [0, 1] as ``(N, 1, 8, 8)`` float tensors. Two classes are held out of training
(``ood_classes``) so that they serve as near out-of-distribution inputs: the classifier knows digits
0–7 and has never seen an 8 or a 9.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_bytes, atomic_write_text


@dataclass(frozen=True)
class Digits:
    """Stratified train / validation / test splits of the known classes, and the held-out classes."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_ood: torch.Tensor  # images of the held-out classes (near-OOD)
    classes: tuple[int, ...]  # the original digit of each class index
    ood_classes: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_digits(seed: int = 0, ood_classes: tuple[int, ...] = (8, 9), val_fraction: float = 0.2,
                test_fraction: float = 0.2) -> Digits:
    """Split the digits of the classes not in ``ood_classes`` per class, shuffled by ``seed``."""
    from sklearn.datasets import load_digits as sklearn_digits

    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise SafetylabError(f"val_fraction and test_fraction must be > 0 and sum below 1, "
                             f"got {val_fraction} and {test_fraction}")
    if not set(ood_classes) <= set(range(10)) or len(set(ood_classes)) > 8:
        raise SafetylabError(f"ood_classes must be at most 8 distinct digits in 0..9, got {ood_classes}")
    images, digits = sklearn_digits(return_X_y=True)
    x_all = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    classes = tuple(d for d in range(10) if d not in ood_classes)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for d in classes:
        idx = rng.permutation(np.flatnonzero(digits == d))
        n_val, n_test = round(val_fraction * len(idx)), round(test_fraction * len(idx))
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    index_of = {d: i for i, d in enumerate(classes)}
    split = {}
    for name, chunks in parts.items():
        idx = rng.permutation(np.concatenate(chunks))
        split[name] = (x_all[idx], torch.tensor([index_of[d] for d in digits[idx]], dtype=torch.long))
    ood = np.flatnonzero(np.isin(digits, ood_classes))
    return Digits(*split["train"], *split["val"], *split["test"], x_ood=x_all[ood], classes=classes,
                  ood_classes=tuple(ood_classes))


def digits_cnn(num_classes: int = 8, width: int = 16, hidden: int = 128, dropout: float = 0.2) -> nn.Sequential:
    """A small CNN for 1×8×8 inputs: two convolutions (the second with stride 2), a hidden layer with
    dropout (used by MC dropout; identity in eval mode), and the logits.

    Built only from layers that bound propagation supports (no max-pooling), so the same network can be
    attacked, calibrated and verified.
    """
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * 4 * 4, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def digits_mlp(num_classes: int = 8, hidden: int = 128, dropout: float = 0.2) -> nn.Sequential:
    """A two-hidden-layer MLP on the 64 pixels, for feature-vector experiments and verification."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


ARCHS = {"cnn": digits_cnn, "mlp": digits_mlp}


def build_classifier(spec: dict) -> nn.Sequential:
    """A digits classifier from its spec ``{"arch": "cnn" | "mlp", **keyword arguments}``."""
    spec = dict(spec)
    arch = spec.pop("arch", None)
    if arch not in ARCHS:
        raise SafetylabError(f"classifier spec: arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    try:
        return ARCHS[arch](**spec)
    except TypeError as e:
        raise SafetylabError(f"classifier spec for {arch}: {e}") from None


def save_classifier(model: nn.Module, spec: dict, directory: str | Path) -> Path:
    """``model.safetensors`` and ``classifier.json`` (the spec), each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    atomic_write_bytes(directory / "model.safetensors", save(weights))
    atomic_write_text(directory / "classifier.json", json.dumps(spec, indent=2) + "\n")
    return directory


def load_classifier(directory: str | Path) -> tuple[nn.Sequential, dict]:
    """The classifier saved by :func:`save_classifier`, in eval mode, with its spec."""
    directory = Path(directory)
    spec_file, weights = directory / "classifier.json", directory / "model.safetensors"
    if not spec_file.is_file() or not weights.is_file():
        raise SafetylabError(f"{directory}: not a saved classifier (expected classifier.json and model.safetensors; "
                             "make one with `safetylab robust train`)")
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SafetylabError(f"{spec_file}: invalid JSON ({e.msg}, line {e.lineno})") from None
    model = build_classifier(spec)
    try:
        model.load_state_dict(load(weights.read_bytes()))
    except RuntimeError as e:
        raise SafetylabError(f"{weights}: weights do not fit the spec in classifier.json ({e})") from None
    return model.eval(), spec
