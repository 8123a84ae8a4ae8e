"""The tiny GPT-style language model of the world, built from a config (nothing downloaded), and
load/save of any Hugging Face causal LM with safetensors."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from safetylab.core.config import require
from safetylab.core.errors import SafetylabError
from safetylab.core.runs import saved_inside
from safetylab.models.tokenizer import adopt_world_template


@dataclass(frozen=True)
class ModelConfig:
    """GPT-2 shape (Radford et al. 2019) at toy scale; ``n_positions`` bounds prompt + response."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 128
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "n_positions"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        require(self.n_embd % self.n_head == 0, "n_embd", f"a multiple of n_head ({self.n_head})", self.n_embd)
        require(0 <= self.dropout < 1, "dropout", "a probability in [0, 1)", self.dropout)


def build_model(config: ModelConfig, tokenizer) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 sized for ``tokenizer`` (uses the torch seed in force)."""
    hf_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_pytorch_tanh",  # GPT-2's tanh GELU, as one fused kernel
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(hf_config)


def save_model(model: PreTrainedModel, tokenizer, path: str | os.PathLike) -> Path:
    """``save_pretrained`` (safetensors) of model and tokenizer, written to a temporary directory and
    renamed into place, so an interrupted save never leaves a directory that looks complete."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Load ``(model, tokenizer)`` saved by :func:`save_model` or any HF causal LM directory.

    Fails with a clear error if the directory is missing, the weights are missing or corrupt, or
    the tokenizer does not match the model's vocabulary. A world tokenizer saved without a chat
    template gets the world's (:func:`~safetylab.models.tokenizer.adopt_world_template`).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SafetylabError(f"{path}: not a model directory (no config.json); expected a save_pretrained directory"
                             + saved_inside(path, "model.safetensors"))
    if not any(path.glob("*.safetensors")):
        raise SafetylabError(f"{path}: no safetensors weights found (only safetensors checkpoints are loaded)"
                             + saved_inside(path, "model.safetensors"))
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise SafetylabError(f"{path}: no tokenizer files (expected tokenizer.json saved with the model)")
    try:
        tokenizer = adopt_world_template(AutoTokenizer.from_pretrained(path, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure here means a missing or broken tokenizer
        raise SafetylabError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                           output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - corrupt or truncated weights
        raise SafetylabError(f"{path}: cannot load the model weights ({type(e).__name__}: {e})") from None
    for problem in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(problem):
            names = ", ".join(sorted(map(str, info[problem]))[:3])
            raise SafetylabError(f"{path}: the weights do not match config.json ({problem.replace('_', ' ')}: {names})")
    check_tokenizer(model, tokenizer, where=str(path))
    return model.to(device).eval(), tokenizer


def check_tokenizer(model: PreTrainedModel, tokenizer, where: str = "model") -> None:
    """The tokenizer's ids must all be rows of the model's embedding."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise SafetylabError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}; "
            "expected the tokenizer saved with this model"
        )
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise SafetylabError(f"{where}: the tokenizer needs a pad and an eos token")
