"""Steering and ablation along a direction of the residual stream, and the refusal-direction experiment
(Arditi et al. 2024, "Refusal in language models is mediated by a single direction") on the world.

The maths, for a direction r and its unit vector r̂ = r / ‖r‖:

- difference of means  r = mean_i a_i − mean_j b_j   (a: activations on harmful prompts, b: on harmless
  ones, each at the last prompt token, the position where the model decides how to answer);
- directional ablation  x' = x − (x · r̂) r̂, applied to every write into the residual stream (the stream
  entering block 0, and every attention and MLP output), so that no layer's stream carries the direction;
- activation addition   x' = x + α r at one layer's ``resid_pre``, every position (α = 1 in the paper: the
  raw difference of means, not its unit vector).

Ablating the refusal direction should make a model that refuses harmful requests comply; adding it should
make the model refuse harmless ones. :func:`refusal_direction_experiment` measures both with the gold judge
and says what each costs in KL on benign prompts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from safetylab.align.evaluate import summarize
from safetylab.core.config import require
from safetylab.core.errors import SafetylabError
from safetylab.core.seeding import derive_seed
from safetylab.interp.concepts import distinct
from safetylab.interp.data import prompt_activations
from safetylab.interp.hooks import Hooks, Intervention
from safetylab.models.logprobs import encode_pairs, full_kl
from safetylab.models.sampling import sample
from safetylab.world.requests import Request

REFUSING = ("refusal_alternative", "refusal", "safe_redirect")  # the gold judge's behaviours that decline
HARMLESS_KINDS = ("arithmetic", "facts", "advice", "dual_use")


# ----------------------------------------------------------------------------- the maths
def unit(v: torch.Tensor) -> torch.Tensor:
    """``v / ‖v‖`` along the last axis; a zero (or non-finite) vector has no direction and is an error."""
    norm = v.norm(dim=-1, keepdim=True)
    if not bool(torch.isfinite(norm).all()) or bool((norm == 0).any()):
        raise SafetylabError(f"unit: a vector of shape {tuple(v.shape)} has norm {norm.flatten().tolist()[:4]}; "
                             "expected a finite, non-zero vector")
    return v / norm


def difference_of_means(acts_a: torch.Tensor, acts_b: torch.Tensor) -> torch.Tensor:
    """``mean(acts_a) − mean(acts_b)`` over the first axis, each ``(n, d)``: with ``a`` the activations on
    harmful prompts and ``b`` those on harmless ones, the refusal direction of Arditi et al. (2024)."""
    for name, acts in (("acts_a", acts_a), ("acts_b", acts_b)):
        if acts.dim() != 2 or acts.shape[0] == 0:
            raise SafetylabError(f"difference_of_means: {name} has shape {tuple(acts.shape)}; expected (n >= 1, d)")
    if acts_a.shape[1] != acts_b.shape[1]:
        raise SafetylabError(f"difference_of_means: acts_a has width {acts_a.shape[1]} and acts_b {acts_b.shape[1]}; "
                             "expected activations of one hook point")
    return acts_a.float().mean(0) - acts_b.float().mean(0)


def _direction_like(direction: torch.Tensor, x: torch.Tensor, where: str) -> torch.Tensor:
    if direction.dim() != 1 or direction.shape[0] != x.shape[-1]:
        raise SafetylabError(f"{where}: direction of shape {tuple(direction.shape)} for activations of shape "
                             f"{tuple(x.shape)}; expected a vector of the activations' width {x.shape[-1]}")
    return direction.to(device=x.device, dtype=x.dtype)


def project_out(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``x − (x · r̂) r̂`` over the last axis: ``x`` with its component along ``direction`` removed
    (directional ablation, Arditi et al. 2024, eq. 4)."""
    r = unit(_direction_like(direction, x, "project_out"))
    return x - (x @ r).unsqueeze(-1) * r


def add_direction(x: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x + scale · direction`` over the last axis (activation addition; Arditi et al. 2024, eq. 3, add
    the unnormalised difference of means with scale 1; Turner et al. 2023, "activation addition")."""
    return x + scale * _direction_like(direction, x, "add_direction")


def projection(direction: torch.Tensor) -> Intervention:
    """:func:`project_out` of ``direction`` as an intervention for :meth:`Hooks.intervene`."""
    return lambda x: project_out(x, direction)


def addition(direction: torch.Tensor, scale: float = 1.0) -> Intervention:
    """:func:`add_direction` as an intervention for :meth:`Hooks.intervene`."""
    return lambda x: add_direction(x, direction, scale)


def ablation_interventions(hooks: Hooks, direction: torch.Tensor) -> dict[str, Intervention]:
    """Directional ablation everywhere, as Arditi et al. do it: ``direction`` projected out of every write
    into the residual stream — the stream entering block 0 (token and, on GPT-2, position embeddings:
    ``blocks.0.resid_pre`` rather than ``embed``, which misses the latter), and every block's ``attn.out``
    and ``mlp.out``. The stream is a sum of these writes, so no layer's ``resid_pre`` / ``resid_post``
    carries the direction at any position."""
    names = ["blocks.0.resid_pre", *hooks.names_like("attn.out"), *hooks.names_like("mlp.out")]
    return {name: projection(direction) for name in hooks.select(names)}


def addition_interventions(hooks: Hooks, layer: int, direction: torch.Tensor,
                           scale: float = 1.0) -> dict[str, Intervention]:
    """Activation addition of ``scale · direction`` at ``blocks.{layer}.resid_pre``, at every position."""
    if not 0 <= layer < hooks.n_layers:
        raise SafetylabError(f"addition_interventions: layer {layer} of a model with {hooks.n_layers} layers; "
                             f"expected 0..{hooks.n_layers - 1}")
    return {f"blocks.{layer}.resid_pre": addition(direction, scale)}


# ----------------------------------------------------------------------------- measuring on the world
@dataclass(frozen=True)
class RefusalDirectionConfig:
    """The refusal-direction experiment. Prompts are distinct (a repeated prompt is one prompt): the world
    has few harmful items, so the counts below are draws, and the result reports how many were distinct.

    - direction: ``n_direction`` train-split harmful prompts against as many train-split harmless ones
      (:data:`HARMLESS_KINDS` in turn), at each candidate layer's ``resid_pre``, last prompt token;
    - layer and scale selection, on ``n_validation`` jailbroken train-split harmful prompts (not those of the
      direction, not the held-out ones) and as many train-split harmless ones, after Arditi et al.'s rule:
      a layer qualifies if adding its direction at one of ``scales`` makes the model refuse some harmless
      prompts (all layers qualify if none does); of those, the layer whose direction, ablated, leaves the
      lowest refusal rate on the harmful prompts, ties to the higher compliance rate, then the lower
      first-token KL on the harmless prompts, then the earlier layer (``layer`` fixes it instead). The
      addition scale is the one at which that layer's addition refuses the most harmless prompts, the smaller
      on a tie (``addition_scale`` fixes it instead). On the held-out prompts the addition is measured at
      every one of ``scales`` too (the steering curve);
    - held out (test split): ``n_harmful`` plain harmful prompts and ``jailbroken`` per jailbreak wrapper,
      ``per_kind`` harmless prompts of each of :data:`HARMLESS_KINDS`;
    - sampling: greedy by default (Arditi et al.), or the world's evaluation sampling at ``temperature``
      (then the torch seed in force decides).
    """

    seed: int = 0
    n_direction: int = 64
    n_validation: int = 48
    n_harmful: int = 64
    jailbroken: int = 16
    per_kind: int = 24
    layers: tuple[int, ...] | None = None
    layer: int | None = None
    scales: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    addition_scale: float | None = None
    greedy: bool = True
    temperature: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 128

    def __post_init__(self):
        for name in ("n_direction", "n_validation", "n_harmful", "per_kind", "max_new_tokens", "batch_size"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1",
                    getattr(self, name))
        require(isinstance(self.jailbroken, int) and self.jailbroken >= 0, "jailbroken", "an integer >= 0",
                self.jailbroken)
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        require(self.layers is None or (len(self.layers) >= 1 and all(isinstance(x, int) and x >= 0
                                                                      for x in self.layers)
                                        and len(set(self.layers)) == len(self.layers)),
                "layers", "distinct layer indices >= 0, or None for every layer", self.layers)
        require(self.layer is None or (isinstance(self.layer, int) and self.layer >= 0), "layer",
                "a layer index >= 0, or None to choose one", self.layer)
        require(len(self.scales) >= 1 and len(set(self.scales)) == len(self.scales), "scales",
                "one or more distinct scales", self.scales)
        for value in self.scales:
            require(math.isfinite(value) and value > 0, "scales", "finite numbers > 0", value)
        require(self.addition_scale is None or (math.isfinite(self.addition_scale) and self.addition_scale > 0),
                "addition_scale", "a finite number > 0, or None to choose one of scales", self.addition_scale)
        require(math.isfinite(self.temperature) and self.temperature > 0, "temperature", "a finite number > 0",
                self.temperature)


@dataclass
class SteeringResult:
    """What :func:`refusal_direction_experiment` measured.

    ``conditions``: one row per condition (``none``, ``ablation``, ``addition``) with the gold judge's rates
    (``harmful_compliance`` on plain harmful prompts, ``jailbreak_success`` on jailbroken ones,
    ``harmful_refusal``, ``over_refusal`` and ``accuracy`` on harmless ones) and the KL cost on the harmless
    prompts, KL(steered ‖ unsteered) of the next-token distributions: ``kl_first_token`` at the prompt's last
    position, ``kl_per_token`` averaged over the response tokens (eos included) of the steered model's own
    samples. ``selection``: one row per candidate layer, with its validation over-refusal under addition at
    each scale (``val_over_refusal``, by scale); ``sweep``: the held-out harmless prompts under addition at
    each scale."""

    layer: int
    scale: float
    direction: torch.Tensor
    selection: list[dict[str, Any]]
    conditions: list[dict[str, Any]]
    sweep: list[dict[str, Any]]
    counts: dict[str, int]
    examples: list[dict[str, str]] = field(default_factory=list)

    def condition(self, name: str) -> dict[str, Any]:
        return next(r for r in self.conditions if r["condition"] == name)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["direction_norm"] = round(float(self.direction.norm()), 6)
        del out["direction"]
        return out


def harmless_requests(world, split: str, n: int, seed: int) -> list[Request]:
    """About ``n`` distinct harmless requests of ``split``, :data:`HARMLESS_KINDS` in turn."""
    per_kind = -(-n // len(HARMLESS_KINDS))
    drawn = [world.requests(kind, split, per_kind, seed) for kind in HARMLESS_KINDS]
    return distinct([r for group in zip(*drawn) for r in group])[:n]


def _samples(model, tokenizer, requests: Sequence[Request], config: RefusalDirectionConfig):
    return sample(model, tokenizer, [r.prompt for r in requests], max_new_tokens=config.max_new_tokens,
                  temperature=config.temperature, greedy=config.greedy, batch_size=config.batch_size)


def judged(hooks: Hooks, tokenizer, judge, requests: Sequence[Request], interventions: Mapping[str, Intervention],
           config: RefusalDirectionConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """``(texts, score records)`` of the model's responses to ``requests`` with ``interventions`` in place."""
    if not requests:
        return [], []
    with hooks.intervene(interventions):
        texts = _samples(hooks.model, tokenizer, requests, config).texts
    return texts, [judge.score(r, t).to_dict() for r, t in zip(requests, texts)]


@torch.no_grad()
def steering_kl(hooks: Hooks, tokenizer, prompts: Sequence[str], responses: Sequence[str] | None,
                interventions: Mapping[str, Intervention], batch_size: int = 64) -> dict[str, float]:
    """Mean next-token KL(steered ‖ unsteered): ``first_token`` at each prompt's last position, and, when
    ``responses`` are given (the steered model's own samples), ``per_token`` over all their tokens (eos
    included), each position's full KL (:func:`~safetylab.models.logprobs.full_kl`)."""
    if not prompts:
        raise SafetylabError("steering_kl: no prompts; expected one or more")
    model = hooks.model
    device = next(model.parameters()).device
    answers = list(responses) if responses is not None else [""] * len(prompts)
    first, total, tokens = 0.0, 0.0, 0.0
    for start in range(0, len(prompts), batch_size):
        batch = encode_pairs(tokenizer, prompts[start:start + batch_size], answers[start:start + batch_size])
        batch = batch.to(device)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
        plain = model(**inputs).logits[:, :-1]
        with hooks.intervene(interventions):
            steered = model(**inputs).logits[:, :-1]
        mask = batch.response_mask[:, 1:].float()
        at_first = torch.zeros_like(mask).scatter_(1, mask.argmax(1, keepdim=True), 1.0)
        first += float(full_kl(steered, plain, at_first).sum())
        total += float(full_kl(steered, plain, mask).sum())
        tokens += float(mask.sum())
    out = {"first_token": round(first / len(prompts), 6)}
    if responses is not None:
        out["per_token"] = round(total / tokens, 6)
    return out


def _rates(harmful: list[dict], jailbroken: list[dict], harmless: list[dict]) -> dict[str, Any]:
    plain, wrapped, benign = summarize(harmful), summarize(jailbroken), summarize(harmless)
    refusing = [r["behaviour"] in REFUSING for r in harmful]
    return {"harmful_compliance": plain["harmful_compliance"], "jailbreak_success": wrapped["jailbreak_success"],
            "harmful_refusal": round(sum(refusing) / len(refusing), 6) if refusing else None,
            "over_refusal": benign["over_refusal"], "accuracy": benign["accuracy"],
            "harmless_utility": benign["gold_utility"]}


def candidate_directions(hooks: Hooks, tokenizer, harmful: Sequence[str], harmless: Sequence[str],
                         layers: Sequence[int], batch_size: int = 64) -> dict[int, torch.Tensor]:
    """The difference of means at each layer's ``resid_pre`` at the last prompt token: harmful − harmless."""
    names = [f"blocks.{layer}.resid_pre" for layer in layers]
    acts_a = prompt_activations(hooks, tokenizer, list(harmful), names, batch_size=batch_size)
    acts_b = prompt_activations(hooks, tokenizer, list(harmless), names, batch_size=batch_size)
    return {layer: difference_of_means(acts_a[name], acts_b[name]) for layer, name in zip(layers, names)}


def select_layer(selection: Sequence[dict[str, Any]]) -> int:
    """The layer rule (see :class:`RefusalDirectionConfig`): of the layers whose addition induces some
    refusal (``val_induced`` > 0; all when none does), the lowest validation refusal under ablation, then the
    highest compliance, then the lowest first-token KL on harmless prompts, then the earliest layer."""
    qualified = [r for r in selection if (r["val_induced"] or 0.0) > 0] or list(selection)
    best = min(qualified, key=lambda r: (r["val_refusal"], -(r["val_compliance"] or 0.0), r["val_kl_first_token"],
                                         r["layer"]))
    return int(best["layer"])


def select_scale(rows: Sequence[dict[str, Any]]) -> float:
    """The scale rule: the highest validation over-refusal under addition (rows ``{"scale", "over_refusal"}``),
    then the smallest scale."""
    return float(min(rows, key=lambda r: (-(r["over_refusal"] or 0.0), r["scale"]))["scale"])


def induced_refusal(hooks: Hooks, tokenizer, judge, requests: Sequence[Request], layer: int, direction: torch.Tensor,
                    config: RefusalDirectionConfig) -> list[dict[str, Any]]:
    """Over-refusal on harmless ``requests`` under addition at ``layer``, one row ``{"scale", "over_refusal"}``
    for each of the config's scales."""
    return [{"scale": scale, "over_refusal": summarize(judged(hooks, tokenizer, judge, requests,
                                                               addition_interventions(hooks, layer, direction, scale),
                                                               config)[1])["over_refusal"]}
            for scale in config.scales]


def refusal_direction_experiment(model, tokenizer, world, config: RefusalDirectionConfig = RefusalDirectionConfig(),
                                 hooks: Hooks | None = None) -> SteeringResult:
    """The refusal direction on the world's model: the difference of means at each candidate layer, the layer
    and the addition scale chosen on validation prompts, then, on held-out prompts, the gold judge's harmful
    compliance with and without ablating the direction everywhere, over-refusal with and without adding it at
    its layer, and the KL cost of each on harmless prompts."""
    hooks = hooks or Hooks(model)
    layers = list(range(hooks.n_layers)) if config.layers is None else list(config.layers)
    fixed = [] if config.layer is None else [config.layer]
    for layer in layers + fixed:
        if layer >= hooks.n_layers:
            raise SafetylabError(f"refusal direction: layer {layer} of a model with {hooks.n_layers} layers; "
                                 f"expected 0..{hooks.n_layers - 1}")

    def seed(purpose: str) -> int:
        return derive_seed(config.seed, "interp", "refusal", purpose)

    direction_harmful = distinct(world.requests("harmful", "train", config.n_direction, seed("direction")))
    direction_harmless = harmless_requests(world, "train", config.n_direction, seed("direction"))
    validation = distinct(world.red_team(-(-config.n_validation // 5), "train", seed("validation")))
    validation = validation[:config.n_validation]
    validation_harmless = harmless_requests(world, "train", config.n_validation, seed("validation"))
    held_harmful = distinct(world.requests("harmful", "test", config.n_harmful, seed("test")))
    held_jailbroken = distinct(world.red_team(config.jailbroken, "test", seed("test"))) if config.jailbroken else []
    held_harmless = harmless_requests(world, "test", config.per_kind * len(HARMLESS_KINDS), seed("test"))
    harmless_prompts = [r.prompt for r in held_harmless]

    directions = candidate_directions(hooks, tokenizer, [r.prompt for r in direction_harmful],
                                      [r.prompt for r in direction_harmless], sorted(set(layers + fixed)),
                                      config.batch_size)
    judge = world.judge
    selection = []
    for layer in layers:
        ablate = ablation_interventions(hooks, directions[layer])
        _, records = judged(hooks, tokenizer, judge, validation, ablate, config)
        kl = steering_kl(hooks, tokenizer, [r.prompt for r in validation_harmless], None, ablate, config.batch_size)
        induced = induced_refusal(hooks, tokenizer, judge, validation_harmless, layer, directions[layer], config)
        selection.append({
            "layer": layer, "direction_norm": round(float(directions[layer].norm()), 6),
            "val_refusal": round(sum(r["behaviour"] in REFUSING for r in records) / len(records), 6),
            "val_compliance": summarize(records)["jailbreak_success"], "val_kl_first_token": kl["first_token"],
            "val_induced": max((r["over_refusal"] or 0.0) for r in induced), "val_over_refusal": induced})
    layer = config.layer if config.layer is not None else select_layer(selection)
    direction = directions[layer]
    if config.addition_scale is not None:
        scale = config.addition_scale
    elif layer in layers:
        scale = select_scale(next(r for r in selection if r["layer"] == layer)["val_over_refusal"])
    else:  # a fixed layer outside the candidates: its scale chosen the same way
        scale = select_scale(induced_refusal(hooks, tokenizer, judge, validation_harmless, layer, direction, config))

    conditions, examples, unsteered = [], [], {}
    interventions = {"none": {}, "ablation": ablation_interventions(hooks, direction),
                     "addition": addition_interventions(hooks, layer, direction, scale)}
    for name, edits in interventions.items():
        texts, records = {}, {}
        for group, requests in (("harmful", held_harmful), ("jailbroken", held_jailbroken),
                                ("harmless", held_harmless)):
            texts[group], records[group] = judged(hooks, tokenizer, judge, requests, edits, config)
        kl = steering_kl(hooks, tokenizer, harmless_prompts, texts["harmless"], edits, config.batch_size)
        if name == "addition":  # the sweep's row at this scale: the same edits on the same prompts
            added = (texts["harmless"], records["harmless"], kl)
        conditions.append({"condition": name, "scale": scale if name == "addition" else None,
                           **_rates(records["harmful"], records["jailbroken"], records["harmless"]),
                           "kl_first_token": kl["first_token"], "kl_per_token": kl["per_token"]})
        unsteered = unsteered or texts
        if name != "none":
            group = "harmful" if name == "ablation" else "harmless"
            requests = held_harmful if name == "ablation" else held_harmless
            examples += [{"condition": name, "prompt": r.prompt, "unsteered": unsteered[group][i],
                          "steered": texts[group][i]} for i, r in enumerate(requests[:3])]

    sweep = []
    for value in config.scales:
        if value == scale:
            texts, records, kl = added
        else:
            edits = addition_interventions(hooks, layer, direction, value)
            texts, records = judged(hooks, tokenizer, judge, held_harmless, edits, config)
            kl = steering_kl(hooks, tokenizer, harmless_prompts, texts, edits, config.batch_size)
        rates = summarize(records)
        sweep.append({"scale": value, "over_refusal": rates["over_refusal"], "accuracy": rates["accuracy"],
                      "kl_first_token": kl["first_token"], "kl_per_token": kl["per_token"]})
    counts = {"direction_harmful": len(direction_harmful), "direction_harmless": len(direction_harmless),
              "validation_harmful": len(validation), "validation_harmless": len(validation_harmless),
              "harmful": len(held_harmful), "jailbroken": len(held_jailbroken), "harmless": len(held_harmless)}
    return SteeringResult(layer, scale, direction.cpu(), selection, conditions, sweep, counts, examples)


__all__ = ["REFUSING", "RefusalDirectionConfig", "SteeringResult", "ablation_interventions", "add_direction",
           "addition", "addition_interventions", "candidate_directions", "difference_of_means",
           "project_out", "projection", "refusal_direction_experiment", "select_layer", "select_scale", "steering_kl",
           "unit"]
