"""Activation patching (causal tracing; Meng et al. 2022, "Locating and editing factual associations in GPT"),
with the conventions of Heimersheim & Nanda (2024, "How to use and interpret activation patching").

Two prompts of equal token length differ in one place (symmetric token replacement: the subject country
replaced by another), so the clean prompt's answer differs from the corrupted prompt's. The metric is the
logit difference at the last position,

    LD = logit(answer_clean) − logit(answer_corrupt),

and a patch is scored by how much of the gap between the runs it moves:

    score = (LD_patched − LD_corrupt) / (LD_clean − LD_corrupt)

over means across prompt pairs (the mean metric is normalised, not each pair, whose gap can be near 0).

- **denoising** (the default): run the corrupted prompt with one clean activation patched in. A score near 1
  means that activation alone restores the clean answer: it is *sufficient*.
- **noising**: run the clean prompt with one corrupted activation patched in, scored the same way. A score
  near 0 means the clean answer is lost without it: it is *necessary*.

Patches at many (hook point, position) cells run as one batch: the target prompts repeated once per cell,
each copy patched at its own cell.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError
from safetylab.core.seeding import derive_seed
from safetylab.interp.hooks import Cache, Hooks
from safetylab.models.conversation import encode_conversation
from safetylab.world.requests import QUESTION_TEMPLATES, RELATIONS

Metric = Callable[[torch.Tensor], torch.Tensor]  # last-position logits (batch, vocab) -> (batch,)
MODES = ("denoise", "noise")


# ----------------------------------------------------------------------------- the maths
def logit_difference(logits: torch.Tensor, answer_clean: torch.Tensor, answer_corrupt: torch.Tensor) -> torch.Tensor:
    """``logit[answer_clean] − logit[answer_corrupt]`` per row, at the last position when ``logits`` is
    ``(batch, pos, vocab)`` (or ``(batch, vocab)`` already at it); answers are ``(batch,)`` token ids."""
    last = logits[:, -1] if logits.dim() == 3 else logits
    if last.dim() != 2 or answer_clean.shape != (last.shape[0],) or answer_corrupt.shape != (last.shape[0],):
        raise SafetylabError(f"logit_difference: logits of shape {tuple(logits.shape)} with answers of shapes "
                             f"{tuple(answer_clean.shape)} and {tuple(answer_corrupt.shape)}; expected (batch, [pos,] "
                             "vocab) and (batch,) token ids")
    last = last.float()
    answers = torch.stack([answer_clean, answer_corrupt], 1).to(last.device)
    picked = last.gather(1, answers)
    return picked[:, 0] - picked[:, 1]


def logit_difference_metric(answer_clean: torch.Tensor, answer_corrupt: torch.Tensor) -> Metric:
    """:func:`logit_difference` with the pairs' answers fixed, as a patching metric."""
    return lambda logits: logit_difference(logits, answer_clean, answer_corrupt)


def normalised_score(patched: torch.Tensor | float, clean: torch.Tensor | float,
                     corrupt: torch.Tensor | float) -> torch.Tensor:
    """``(patched − corrupt) / (clean − corrupt)``: 0 is the corrupted run's metric, 1 the clean run's
    (Heimersheim & Nanda 2024). Equal clean and corrupted metrics leave nothing to restore: an error."""
    patched, clean, corrupt = (torch.as_tensor(v, dtype=torch.float32) for v in (patched, clean, corrupt))
    gap = clean - corrupt
    if bool((gap.abs() < 1e-6).any()):
        raise SafetylabError(f"normalised_score: the clean metric {clean.tolist()} equals the corrupted one "
                             f"{corrupt.tolist()}; expected prompts whose answers differ")
    return (patched - corrupt) / gap


# ----------------------------------------------------------------------------- patching
@dataclass(frozen=True)
class Patch:
    """One patch: at hook point ``name``, the ``positions`` (None: all) and, for ``attn.z``, the ``heads``
    (None: all) take the source run's activations."""

    name: str
    positions: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None


@dataclass
class PatchingResult:
    """The metric of each patched run: ``patched`` ``(rows, columns, pairs)``, rows the hook points
    (``names``), columns the positions (``axis="position"``) or the heads (``axis="head"``); ``clean`` and
    ``corrupt`` ``(pairs,)`` the unpatched runs' metrics. :attr:`scores` normalises the means over pairs."""

    names: list[str]
    axis: str
    patched: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    mode: str = "denoise"
    labels: list[str] = field(default_factory=list)

    @property
    def scores(self) -> torch.Tensor:
        """``(rows, columns)`` normalised scores of the mean metric over pairs."""
        return normalised_score(self.patched.mean(-1), self.clean.mean(), self.corrupt.mean())

    def top(self, k: int = 3) -> list[dict[str, Any]]:
        """The ``k`` cells that matter most, ``{"name", axis, "score"}``: of highest score when denoising (the
        patch restores the clean answer), of lowest when noising (the clean answer is lost without it)."""
        scores = self.scores
        order = scores.flatten().argsort(descending=self.mode == "denoise")[:k]
        return [{"name": self.names[int(i) // scores.shape[1]], self.axis: int(i) % scores.shape[1],
                 "score": round(float(scores.flatten()[i]), 6)} for i in order]

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "axis": self.axis, "mode": self.mode, "labels": self.labels,
                "scores": [[round(float(v), 6) for v in row] for row in self.scores],
                "clean": round(float(self.clean.mean()), 6), "corrupt": round(float(self.corrupt.mean()), 6),
                "pairs": int(self.clean.shape[0])}


def _check_pair(clean: torch.Tensor, corrupt: torch.Tensor) -> None:
    if clean.dim() != 2 or clean.shape != corrupt.shape:
        raise SafetylabError(f"activation patching: clean ids of shape {tuple(clean.shape)} and corrupted ids of "
                             f"shape {tuple(corrupt.shape)}; expected two (pairs, pos) batches of one shape (prompts "
                             "of equal token length, unpadded)")


def _forward_last(hooks: Hooks, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits at the last position ``(batch, vocab)``; only that position is unembedded where the
    model's forward takes ``logits_to_keep``."""
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(hooks.model).forward).parameters else {}
    return hooks.model(input_ids=input_ids, use_cache=False, **keep).logits[:, -1]


@torch.no_grad()
def run_patched(hooks: Hooks, target: torch.Tensor, source: Cache, patches: Sequence[Patch]) -> torch.Tensor:
    """Last-position logits ``(batch, vocab)`` of ``target`` ids with the ``patches`` taken from ``source``
    (a cache of a run on prompts of the same shape) — the plain, one-run form of patching."""
    edits: dict[str, list[Patch]] = {}
    for patch in patches:
        hooks.check_name(patch.name)
        edits.setdefault(patch.name, []).append(patch)

    def edit(name: str):
        def fn(act: torch.Tensor) -> torch.Tensor:
            new = act.clone()
            for patch in edits[name]:
                _assign(new, source[name].to(act.device, act.dtype), patch, slice(None))
            return new
        return fn

    with hooks.intervene({name: edit(name) for name in edits}):
        return _forward_last(hooks, target.to(next(hooks.model.parameters()).device))


def _assign(new: torch.Tensor, src: torch.Tensor, patch: Patch, rows: slice) -> None:
    """``new[rows]`` takes ``src`` (the pairs' source activations) at ``patch``'s positions and heads."""
    if src.shape != new[rows].shape:
        raise SafetylabError(f"{patch.name}: source activations of shape {tuple(src.shape)} for a target of shape "
                             f"{tuple(new[rows].shape)}; expected a source run on prompts of the target's shape")
    where = torch.zeros(new.shape[1], dtype=torch.bool, device=new.device)
    where[slice(None) if patch.positions is None else list(patch.positions)] = True
    if patch.heads is not None:
        if new.dim() != 4:
            raise SafetylabError(f"{patch.name}: heads patched at a point of shape {tuple(new.shape)}; expected an "
                                 "attn.z point (batch, pos, head, d_head)")
        heads = torch.zeros(new.shape[2], dtype=torch.bool, device=new.device)
        heads[list(patch.heads)] = True
        where = where[:, None] & heads[None, :]
    where = where.reshape(1, *where.shape, *[1] * (new.dim() - 1 - where.dim()))
    new[rows] = torch.where(where, src, new[rows])


@torch.no_grad()
def patch_runs(hooks: Hooks, clean: torch.Tensor, corrupt: torch.Tensor, patches: Sequence[Patch], metric: Metric,
               mode: str = "denoise", max_rows: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(patched (len(patches), pairs), clean (pairs,), corrupt (pairs,))`` metrics: each patch's run on the
    target prompts (corrupted when denoising, clean when noising) with the source's activations at its cells.
    Patches at one hook point run together, ``max_rows // pairs`` copies of the target batch a forward."""
    require_choice(mode, "mode", MODES)
    _check_pair(clean, corrupt)
    device = next(hooks.model.parameters()).device
    clean, corrupt = clean.to(device), corrupt.to(device)
    names = hooks.select({p.name for p in patches})
    caches, metrics = [], []
    for ids in (clean, corrupt):
        with hooks.cache(names) as cache:
            metrics.append(metric(_forward_last(hooks, ids)).float().cpu())
        caches.append(cache)
    source, target = (caches[0], corrupt) if mode == "denoise" else (caches[1], clean)
    pairs = clean.shape[0]
    per_run = max(1, max_rows // pairs)
    out = torch.empty(len(patches), pairs)
    by_name: dict[str, list[int]] = {}
    for i, patch in enumerate(patches):
        by_name.setdefault(patch.name, []).append(i)
    for name, indices in by_name.items():
        for start in range(0, len(indices), per_run):
            chunk = indices[start:start + per_run]
            out[chunk] = _patched_chunk(hooks, target, source[name], [patches[i] for i in chunk], metric)
    return out, metrics[0], metrics[1]


def _patched_chunk(hooks: Hooks, target: torch.Tensor, source: torch.Tensor, patches: Sequence[Patch],
                   metric: Metric) -> torch.Tensor:
    """The metric ``(len(patches), pairs)`` of one forward over ``len(patches)`` copies of ``target``, copy j
    patched with ``patches[j]`` (all at one hook point)."""
    pairs = target.shape[0]

    def fn(act: torch.Tensor) -> torch.Tensor:
        new = act.clone()
        src = source.to(act.device, act.dtype)
        for j, patch in enumerate(patches):
            _assign(new, src, patch, slice(j * pairs, (j + 1) * pairs))
        return new

    with hooks.intervene({patches[0].name: fn}):
        logits = _forward_last(hooks, target.repeat(len(patches), 1))
    return torch.stack([metric(block).float().cpu() for block in logits.split(pairs)])


def patch_by_position(hooks: Hooks, clean: torch.Tensor, corrupt: torch.Tensor, names: Sequence[str] | str,
                      metric: Metric, mode: str = "denoise", max_rows: int = 512) -> PatchingResult:
    """Patch each (hook point, position) cell alone: ``names`` (rows, in the order given) × every position of
    the ``(pairs, pos)`` prompts. Works at any point of shape (batch, pos, …): ``resid_pre``/``resid_post``
    (the stream), ``attn.out``/``mlp.out`` (a sublayer's write), ``attn.z`` (all heads at a position)."""
    names = list(dict.fromkeys([names] if isinstance(names, str) else names))  # the caller's order
    for name in names:
        hooks.check_name(name)
    _check_pair(clean, corrupt)
    cells = [Patch(name, (p,)) for name in names for p in range(clean.shape[1])]
    patched, clean_metric, corrupt_metric = patch_runs(hooks, clean, corrupt, cells, metric, mode, max_rows)
    return PatchingResult(names, "position", patched.unflatten(0, (len(names), clean.shape[1])), clean_metric,
                          corrupt_metric, mode)


def patch_heads(hooks: Hooks, clean: torch.Tensor, corrupt: torch.Tensor, metric: Metric,
                layers: Sequence[int] | None = None, positions: Sequence[int] | None = None, mode: str = "denoise",
                max_rows: int = 512) -> PatchingResult:
    """Patch each attention head alone (its ``attn.z``, before the output projection) at ``positions``
    (None: every position), layer by layer: a ``(layers, heads)`` result."""
    layers = range(hooks.n_layers) if layers is None else layers
    names = hooks.select([f"blocks.{layer}.attn.z" for layer in layers])
    heads = hooks.points[names[0]].heads
    where = None if positions is None else tuple(positions)
    cells = [Patch(name, where, (h,)) for name in names for h in range(heads)]
    patched, clean_metric, corrupt_metric = patch_runs(hooks, clean, corrupt, cells, metric, mode, max_rows)
    return PatchingResult(names, "head", patched.unflatten(0, (len(names), heads)), clean_metric, corrupt_metric,
                          mode, [f"h{h}" for h in range(heads)])


# ----------------------------------------------------------------------------- where the world's facts are recalled
@dataclass(frozen=True)
class FactPatchingConfig:
    """Fact-recall patching on the world's model: a question about ``relation`` (:data:`RELATIONS`) in the
    world's question template ``template`` (:data:`QUESTION_TEMPLATES` index), followed by the start of the
    SFT answer ("the capital of X is"), so the next token is the answer. ``n_pairs`` ordered pairs of
    distinct countries (clean subject, corrupting subject) whose answers differ, drawn from the countries
    whose fact the model gets right (argmax) when ``known_only``. ``heads``: also patch each head."""

    seed: int = 0
    relation: str = "capital"
    template: int = 0
    n_pairs: int = 64
    known_only: bool = True
    mode: str = "denoise"
    heads: bool = True
    max_rows: int = 512

    def __post_init__(self):
        require_choice(self.relation, "relation", RELATIONS)
        require(isinstance(self.template, int) and 0 <= self.template < len(QUESTION_TEMPLATES), "template",
                f"an index in 0..{len(QUESTION_TEMPLATES) - 1}", self.template)
        require(isinstance(self.n_pairs, int) and self.n_pairs >= 1, "n_pairs", "an integer >= 1", self.n_pairs)
        require(isinstance(self.max_rows, int) and self.max_rows >= 1, "max_rows", "an integer >= 1", self.max_rows)
        require_choice(self.mode, "mode", MODES)
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)


@dataclass
class FactPairs:
    """Clean and corrupted ids ``(pairs, pos)``, answers ``(pairs,)``, the subjects, the positions where
    the prompts differ (the country, in the question and in the answer's start), and the clean prompt's
    tokens (the country shown as ``<subject>``)."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    answer_clean: torch.Tensor
    answer_corrupt: torch.Tensor
    subjects: list[tuple[str, str]]
    subject_positions: list[int]
    tokens: list[str]


def fact_question(relation: str, country: str, template: int = 0) -> tuple[str, str]:
    """The world's question about ``relation`` of ``country`` and the start of its SFT answer, which restates
    the subject (``world.styles.render`` with ``restate``): ``("what is the capital of X ?", "the capital of X
    is")``."""
    subject = RELATIONS[relation].format(country)
    prefix, suffix = QUESTION_TEMPLATES[template]
    return f"{prefix}{subject}{suffix}", f"{subject} is"


def fact_prompt_ids(tokenizer, relation: str, country: str, template: int = 0) -> list[int]:
    """The ids of :func:`fact_question` and its answer start through the chat template,
    ``<user> what is the capital of X ? <assistant> the capital of X is`` (the answer's closing eos dropped)."""
    prompt, start = fact_question(relation, country, template)
    prompt_ids, response_ids = encode_conversation(tokenizer, prompt, start)
    return prompt_ids + response_ids[:-1]


def answer_id(tokenizer, relation: str, country: str, value: str, template: int = 0) -> int:
    """The token that starts ``value`` after :func:`fact_prompt_ids` (the SFT answer "… is {value} .")."""
    ids = fact_prompt_ids(tokenizer, relation, country, template)
    prompt, start = fact_question(relation, country, template)
    prompt_ids, response_ids = encode_conversation(tokenizer, prompt, f"{start} {value} .")
    whole = prompt_ids + response_ids
    if whole[:len(ids)] != ids or len(whole) == len(ids):
        raise SafetylabError(f"fact patching: the tokenizer writes {start!r} differently before {value!r}; expected "
                             "the answer to start a new token")
    return whole[len(ids)]


def fact_pairs(hooks: Hooks, tokenizer, world, relation: str = "capital", template: int = 0, n_pairs: int = 64,
               known_only: bool = True, seed: int = 0) -> tuple[FactPairs, dict[str, int]]:
    """Clean/corrupted fact prompts (symmetric token replacement of the country) and how many countries there
    were, were known, and had a one-token name (a country tokenized into several tokens would change the
    prompt's length, so it is left out)."""
    countries = list(world.countries)
    ids = {c.name: fact_prompt_ids(tokenizer, relation, c.name, template) for c in countries}
    lengths = [len(v) for v in ids.values()]
    common = max(set(lengths), key=lengths.count)
    usable = [c for c in countries if len(ids[c.name]) == common]
    answers = {c.name: answer_id(tokenizer, relation, c.name, getattr(c, relation), template) for c in usable}
    device = next(hooks.model.parameters()).device
    if known_only:
        batch = torch.tensor([ids[c.name] for c in usable], device=device)
        with torch.no_grad():
            guess = _forward_last(hooks, batch).argmax(-1).tolist()
        known = [c for c, g in zip(usable, guess) if g == answers[c.name]]
    else:
        known = usable
    candidates = [(a, b) for a in known for b in known if a.name != b.name and answers[a.name] != answers[b.name]]
    counts = {"countries": len(countries), "one_token": len(usable), "known": len(known)}
    if not candidates:
        raise SafetylabError(f"fact patching: {counts['known']} of {counts['countries']} countries usable for "
                             f"{relation!r} (known_only={known_only}); expected two or more with different answers")
    rng = random.Random(derive_seed(seed, "interp", "fact-pairs", relation, template))
    chosen = rng.sample(candidates, min(n_pairs, len(candidates)))
    clean = torch.tensor([ids[a.name] for a, _ in chosen])
    corrupt = torch.tensor([ids[b.name] for _, b in chosen])
    differ = (clean != corrupt).any(0).nonzero().flatten().tolist()
    if not bool((clean != corrupt)[:, differ].all()):
        raise SafetylabError(f"fact patching: the prompt pairs differ at positions {differ}, not all of them at "
                             "each; expected each pair to differ where the country is written")
    tokens = tokenizer.convert_ids_to_tokens(clean[0].tolist())
    for position in differ:
        tokens[position] = "<subject>"
    pairs = FactPairs(clean, corrupt, torch.tensor([answers[a.name] for a, _ in chosen]),
                      torch.tensor([answers[b.name] for _, b in chosen]), [(a.name, b.name) for a, b in chosen],
                      differ, tokens)
    return pairs, {**counts, "pairs": len(chosen)}


@dataclass
class FactRecallResult:
    """Where the fact is recalled: ``resid`` (every layer's ``resid_pre`` and the last ``resid_post``),
    ``attn`` and ``mlp`` (each layer's write) by position, ``heads`` (each head at every position) or None."""

    relation: str
    tokens: list[str]
    subject_positions: list[int]
    counts: dict[str, int]
    resid: PatchingResult
    attn: PatchingResult
    mlp: PatchingResult
    heads: PatchingResult | None = None

    def summary(self) -> dict[str, Any]:
        """The clean and corrupted logit differences, and the cells of highest normalised score."""
        def top(result: PatchingResult, k: int) -> list[dict[str, Any]]:
            rows = result.top(k)
            if result.axis == "position":
                for row in rows:
                    row["token"] = self.tokens[row["position"]]
            return rows
        return {"relation": self.relation, **self.counts, "mode": self.resid.mode,
                "ld_clean": round(float(self.resid.clean.mean()), 6),
                "ld_corrupt": round(float(self.resid.corrupt.mean()), 6),
                "subject_positions": self.subject_positions,
                "top_resid": top(self.resid, 3), "top_attn": top(self.attn, 3), "top_mlp": top(self.mlp, 3),
                "top_heads": top(self.heads, 3) if self.heads is not None else []}

    def to_dict(self) -> dict[str, Any]:
        parts = {k: getattr(self, k) for k in ("resid", "attn", "mlp", "heads")}
        return {"relation": self.relation, "tokens": self.tokens, "subject_positions": self.subject_positions,
                "counts": self.counts, **{k: v.to_dict() for k, v in parts.items() if v is not None}}


def fact_recall_patching(hooks: Hooks, tokenizer, world,
                         config: FactPatchingConfig = FactPatchingConfig()) -> FactRecallResult:
    """Causal tracing of the world's facts: patch each (layer, position) of the residual stream, and each
    layer's attention and MLP write, from clean fact prompts into corrupted ones (another country), averaged
    over country pairs, with the logit difference of the two answers as the metric."""
    pairs, counts = fact_pairs(hooks, tokenizer, world, config.relation, config.template, config.n_pairs,
                               config.known_only, config.seed)
    metric = logit_difference_metric(pairs.answer_clean, pairs.answer_corrupt)
    run = dict(metric=metric, mode=config.mode, max_rows=config.max_rows)
    resid = patch_by_position(hooks, pairs.clean, pairs.corrupt,
                              [*hooks.names_like("resid_pre"), hooks.names_like("resid_post")[-1]], **run)
    attn = patch_by_position(hooks, pairs.clean, pairs.corrupt, hooks.names_like("attn.out"), **run)
    mlp = patch_by_position(hooks, pairs.clean, pairs.corrupt, hooks.names_like("mlp.out"), **run)
    heads = patch_heads(hooks, pairs.clean, pairs.corrupt, **run) if config.heads else None
    for result in (resid, attn, mlp):
        result.labels = pairs.tokens
    return FactRecallResult(config.relation, pairs.tokens, pairs.subject_positions, counts, resid, attn, mlp, heads)


__all__ = ["MODES", "FactPairs", "FactPatchingConfig", "FactRecallResult", "Metric", "Patch", "PatchingResult",
           "answer_id", "fact_pairs", "fact_prompt_ids", "fact_question", "fact_recall_patching", "logit_difference",
           "logit_difference_metric", "normalised_score", "patch_by_position", "patch_heads", "patch_runs",
           "run_patched"]
