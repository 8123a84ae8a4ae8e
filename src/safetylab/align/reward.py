"""Reward models: a scalar head on any Hugging Face backbone, trained on human comparisons.

``RewardModel(backbone)`` reads the backbone's hidden state at the last non-padding token (causal
LMs: the end-of-sequence token, which has seen the whole conversation), or the mean over tokens
(``pooling="mean"``, as sentence encoders do), and maps it to one number. Training minimises the
Bradley–Terry loss on (chosen, rejected) pairs; an ensemble of k such models gives a mean and a
spread, and so a conservative reward mean − λ·std (Coste et al. 2024).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from safetylab.align.data import Preference, encode_preferences
from safetylab.align.losses import bradley_terry_loss
from safetylab.core.errors import SafetylabError
from safetylab.core.runs import RunDir
from safetylab.core.seeding import seed_everything
from safetylab.models.logprobs import Template, encode_pairs
from safetylab.models.train import Step, TrainConfig, train_loop
from safetylab.world.world import chat

POOLINGS = ("last", "mean")


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden[b, t_b]`` at each row's last position where ``mask`` is 1 (any padding side)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * mask.long()).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` over positions where ``mask`` is 1."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class RewardModel(nn.Module):
    """r(x, y) = wᵀ h(x, y) + b, with h the pooled backbone state."""

    def __init__(self, backbone: nn.Module, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise SafetylabError(f"reward pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        self.backbone = backbone
        self.pooling = pooling
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pool = last_token_pool if self.pooling == "last" else mean_pool
        return self.head(pool(hidden, attention_mask)).squeeze(-1).float()


@dataclass(frozen=True)
class RewardConfig:
    train: TrainConfig = TrainConfig(steps=300, batch_size=32, lr=5e-4, warmup_steps=20, log_every=25,
                                     checkpoint_every=100)
    margin: float = 0.0
    center_coef: float = 0.0  # Eisenstein et al. 2023 use 0.01
    pooling: str = "last"
    members: int = 1  # an ensemble of this many reward models, seeds seed, seed+1, …


def backbone_from(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """The base model (no LM head) and tokenizer of a saved HF model: a causal LM's transformer or
    an encoder. Weights it lacks are an error; weights it does not use (an LM head) are not."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SafetylabError(f"{path}: not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        backbone, info = AutoModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - any failure means missing or broken files
        raise SafetylabError(f"{path}: cannot load a backbone ({type(e).__name__}: {e})") from None
    if info.get("missing_keys"):
        raise SafetylabError(f"{path}: weights missing for {sorted(info['missing_keys'])[:3]}")
    if tokenizer.pad_token_id is None:
        raise SafetylabError(f"{path}: the tokenizer has no pad token (set tokenizer.pad_token first)")
    return backbone.to(device), tokenizer


@torch.no_grad()
def score(model: RewardModel, tokenizer, prompts: Sequence[str], responses: Sequence[str],
          template: Template = chat, batch_size: int = 128) -> torch.Tensor:
    """Rewards of (prompt, response) pairs."""
    device = next(model.parameters()).device
    out = [torch.zeros(0, device=device)]
    for start in range(0, len(prompts), batch_size):
        batch = encode_pairs(tokenizer, prompts[start:start + batch_size], responses[start:start + batch_size],
                             template).to(device)
        out.append(model(batch.input_ids, batch.attention_mask))
    return torch.cat(out)


def train_reward_model(model: RewardModel, tokenizer, rows: Sequence[Preference], config: RewardConfig,
                       run: RunDir, template: Template = chat) -> RewardModel:
    """Minimise the Bradley–Terry loss on ``rows``; logs ``loss``, ``accuracy`` (r⁺ > r⁻) and
    ``margin`` (mean r⁺ − r⁻) per window."""
    max_length = config.train.max_length
    for number, row in enumerate(rows, start=1):
        length = len(tokenizer(template(row.prompt))["input_ids"])
        if length >= max_length:
            raise SafetylabError(f"preference {number}: the prompt has {length} tokens, more than the "
                                 f"{max_length - 1} that leave room for a response (max_length {max_length})")

    def step_loss(model, step: Step):
        batch = encode_preferences(tokenizer, [rows[i] for i in step.local], template, max_length).to(step.device)
        rewards = model(batch.input_ids, batch.attention_mask)
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, margin=config.margin or None, center_coef=config.center_coef)
        diff = (chosen - rejected).detach()
        return loss, {"accuracy": (diff > 0).float().mean().item(), "margin": diff.mean().item()}

    return train_loop(model, len(rows), step_loss, config.train, run, "reward model")


@torch.no_grad()
def evaluate_reward_model(model: RewardModel, tokenizer, rows: Sequence[Preference],
                          template: Template = chat) -> dict[str, float]:
    """``accuracy`` (r(chosen) > r(rejected)), mean ``margin``, and, where rows carry the world's
    gold utilities (``gold_chosen``, ``gold_rejected``), ``gold_agreement``: how often the reward
    ranks the pair as the gold judge does (ties in gold skipped)."""
    chosen = score(model, tokenizer, [r.prompt for r in rows], [r.chosen for r in rows], template)
    rejected = score(model, tokenizer, [r.prompt for r in rows], [r.rejected for r in rows], template)
    diff = chosen - rejected
    out = {"accuracy": round((diff > 0).float().mean().item(), 6), "margin": round(diff.mean().item(), 6)}
    gold = [(i, r.meta["gold_chosen"] - r.meta["gold_rejected"]) for i, r in enumerate(rows)
            if "gold_chosen" in r.meta and "gold_rejected" in r.meta]
    gold = [(i, g) for i, g in gold if g != 0]
    if gold:
        agree = sum((diff[i].item() > 0) == (g > 0) for i, g in gold)
        out["gold_agreement"] = round(agree / len(gold), 6)
    return out


# ---------------------------------------------------------------------------- ensembles
def conservative_reward(rewards: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """mean − λ·std over ensemble members (dim 0): a lower confidence bound on the reward, which
    optimisation cannot push up by exploiting one member's errors (Coste et al. 2024, "Reward Model
    Ensembles Help Mitigate Overoptimization"). The std is the population one (k members)."""
    return rewards.mean(0) - lam * rewards.std(0, correction=0)


class RewardEnsemble(nn.Module):
    """k reward models used as one: the reward is mean − λ·std over members (λ = 0: the mean)."""

    def __init__(self, members: Sequence[RewardModel], lam: float = 0.0):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.lam = lam

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rewards = torch.stack([member(input_ids, attention_mask) for member in self.members])
        return conservative_reward(rewards, self.lam)


# ---------------------------------------------------------------------------- files
def save_reward_model(model: RewardModel, tokenizer, path: str | os.PathLike) -> Path:
    """Backbone with ``save_pretrained`` (safetensors), the head as ``reward_head.safetensors``, and
    the tokenizer; written to a temporary directory and renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.backbone.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    head = {k: v.detach().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, str(tmp / "reward_head.safetensors"))
    (tmp / "reward.json").write_text(json.dumps({"pooling": model.pooling}))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_reward_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[RewardModel, object]:
    path = Path(path)
    if not (path / "reward_head.safetensors").is_file():
        raise SafetylabError(f"{path}: not a reward model (no reward_head.safetensors)")
    backbone, tokenizer = backbone_from(path, device)
    settings = json.loads((path / "reward.json").read_text()) if (path / "reward.json").is_file() else {}
    model = RewardModel(backbone, settings.get("pooling", "last"))
    try:
        model.head.load_state_dict(load_file(str(path / "reward_head.safetensors")))
    except Exception as e:  # noqa: BLE001
        raise SafetylabError(f"{path}/reward_head.safetensors: corrupt reward head ({e})") from None
    return model.to(device).eval(), tokenizer


def build_reward_model(base: str | os.PathLike, config: RewardConfig, seed: int,
                       device: torch.device | str = "cpu") -> tuple[RewardModel, object]:
    """A reward model on the backbone saved at ``base``, its head initialised from ``seed``."""
    backbone, tokenizer = backbone_from(base, device)
    seed_everything(seed)
    return RewardModel(backbone, config.pooling).to(device), tokenizer


def fit_reward_models(base: str | os.PathLike, rows: Sequence[Preference], config: RewardConfig, run: RunDir,
                      device: torch.device | str = "cpu") -> tuple[list[RewardModel], object]:
    """Train ``config.members`` reward models on the backbone at ``base`` (member i with seed
    ``seed + i`` for its head and data order), each in ``members/i`` of ``run`` and saved to its
    ``artifacts/reward-model``; finished members are loaded instead of retrained."""
    models, tokenizer = [], None
    for i in range(config.members):
        seed = config.train.seed + i
        member_config = replace(config, train=replace(config.train, seed=seed))
        member = RunDir(run.path / "members" / str(i), {"base": str(base), "reward": asdict(member_config),
                                                        "pairs": len(rows)})
        final = member.artifacts / "reward-model"
        if final.exists():
            model, tokenizer = load_reward_model(final, device)
        else:
            model, tokenizer = build_reward_model(base, member_config, seed, device)
            model = train_reward_model(model, tokenizer, rows, member_config, member)
            save_reward_model(model, tokenizer, final)
        models.append(model.eval())
    return models, tokenizer
