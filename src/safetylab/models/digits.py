"""The built-in digits: scikit-learn's bundled digits (1,797 8×8 images, no download), split for the
robustness and verification studies (:mod:`safetylab.robust.study`, :mod:`safetylab.verify.study`).

Images are scaled to [0, 1] as ``(N, 1, 8, 8)`` float tensors. Two classes are held out of training
(``ood_classes``) so that they serve as near out-of-distribution inputs: the classifier knows digits
0–7 and has never seen an 8 or a 9.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from safetylab.core.errors import SafetylabError
from safetylab.core.seeding import derive_seed


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
    """Split the digits of the classes not in ``ood_classes`` per class, shuffled by a generator derived
    from the run's ``seed`` (``derive_seed(seed, "digits")``), so every command and study that takes the
    same seed sees the same split: a classifier trained by ``safetylab robust train --seed 0`` never
    meets its training digits among the test digits of ``safetylab robust report --seed 0``."""
    from sklearn.datasets import load_digits as sklearn_digits

    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise SafetylabError(f"val_fraction and test_fraction must be > 0 and sum below 1, "
                             f"got {val_fraction} and {test_fraction}")
    if not set(ood_classes) <= set(range(10)) or len(set(ood_classes)) > 8:
        raise SafetylabError(f"ood_classes must be at most 8 distinct digits in 0..9, got {ood_classes}")
    images, digits = sklearn_digits(return_X_y=True)
    x_all = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    classes = tuple(d for d in range(10) if d not in ood_classes)
    rng = np.random.default_rng(derive_seed(seed, "digits"))
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
