"""The out-of-distribution gate: is this prompt unlike anything the served model was validated on?

The features are the served model's own: its final hidden state (``ln_final.out``) at the prompt's last token,
read through :class:`safetylab.interp.Hooks`. The detector is deep nearest neighbours (Sun et al. 2022,
:class:`safetylab.robust.ood.KNN`): the distance from the normalised feature to its k-th nearest normalised
in-distribution feature. A prompt beyond the threshold is unfamiliar — the guard escalates it to a person rather
than trusting the other layers' scores there. Saved as the feature bank (safetensors) and the model's signature,
so a gate fitted for one model refuses another.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from safetylab.control.layers import ScoreLayer
from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_text, read_json
from safetylab.robust.ood import KNN

FORMAT = "safetylab.ood-gate/1"
META, BANK = "ood.json", "bank.safetensors"
HOOK = "ln_final.out"


def prompt_features(hooks, tokenizer, prompts: Sequence[str], hook: str = HOOK, batch_size: int = 64) -> torch.Tensor:
    """(n, d) float32 activations at ``hook`` at each prompt's last token."""
    from safetylab.interp.data import prompt_activations

    return prompt_activations(hooks, tokenizer, list(prompts), hook, batch_size=batch_size)[hook].float().cpu()


class OODLayer(ScoreLayer):
    """KNN distance (``k``-th neighbour) of the prompt's features to ``bank``, the features of in-distribution
    prompts, against the thresholds (``escalate`` usually: an unfamiliar prompt is for a person, not a
    refusal)."""

    kind = "ood"
    blocking = True

    def __init__(self, hooks, tokenizer, bank: torch.Tensor, k: int = 10, hook: str = HOOK, name: str = "ood",
                 escalate: float | None = None, block: float | None = None):
        super().__init__(name, escalate, block, "anomaly score")
        hooks.check_name(hook)
        self.hooks, self.tokenizer, self.bank, self.hook = hooks, tokenizer, bank, hook
        self.detector = KNN(nn.Identity(), k=k).fit_features(bank)

    def scores(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.detector.score_features(prompt_features(self.hooks, self.tokenizer, prompts, self.hook))

    def score(self, text: str, prompt: str | None) -> float:
        return float(self.scores([text])[0])

    def save(self, path: str | os.PathLike) -> Path:
        from safetylab.interp.hooks import model_signature

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{BANK}.tmp"
        save_file({"bank": self.bank.contiguous()}, str(tmp))
        os.replace(tmp, path / BANK)
        meta = {"format": FORMAT, "hook": self.hook, "k": self.detector.k,
                "model_signature": model_signature(self.hooks.model)}
        atomic_write_text(path / META, json.dumps(meta, indent=2) + "\n")
        return path


def fit_ood_layer(hooks, tokenizer, prompts: Sequence[str], k: int = 10, hook: str = HOOK,
                  escalate: float = math.inf, block: float | None = None) -> OODLayer:
    """An :class:`OODLayer` fitted on in-distribution ``prompts``; it escalates nothing until its threshold is
    calibrated (``escalate`` infinite)."""
    return OODLayer(hooks, tokenizer, prompt_features(hooks, tokenizer, prompts, hook), k, hook, escalate=escalate,
                    block=block)


def load_ood_layer(path: str | os.PathLike, hooks, tokenizer, name: str = "ood", escalate: float | None = None,
                   block: float | None = None) -> OODLayer:
    """The gate saved in ``path``, on the served model of ``hooks`` (refused if it was fitted on another)."""
    from safetylab.interp.hooks import check_signature

    path = Path(path)
    if not (path / META).is_file() or not (path / BANK).is_file():
        raise SafetylabError(f"{path}: not an OOD gate (expected {META} and {BANK})")
    meta = read_json(path / META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SafetylabError(f"{path / META}: not an OOD gate file (expected format {FORMAT!r})")
    check_signature(meta.get("model_signature", {}), hooks.model, f"the OOD gate at {path}")
    bank = load_file(str(path / BANK))["bank"]
    return OODLayer(hooks, tokenizer, bank, int(meta["k"]), meta["hook"], name, escalate, block)


__all__ = ["OODLayer", "fit_ood_layer", "load_ood_layer", "prompt_features"]
