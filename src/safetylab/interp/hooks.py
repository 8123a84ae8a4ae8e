"""Hook points on any Hugging Face causal LM: flat names, caches and interventions that never outlive
their ``with``.

Names follow TransformerLens's scheme without the ``hook_`` prefix, so they can be guessed:

=========================  ===============================================  ==========================
name                       what it is                                       shape
=========================  ===============================================  ==========================
``embed``                  token embeddings                                 (batch, pos, d_model)
``blocks.L.resid_pre``     the residual stream entering block L             (batch, pos, d_model)
``blocks.L.attn.z``        each head's output before the output projection  (batch, pos, head, d_head)
``blocks.L.attn.out``      what attention adds to the residual stream       (batch, pos, d_model)
``blocks.L.resid_mid``     the stream between attention and MLP (read only) (batch, pos, d_model)
``blocks.L.mlp.post``      the MLP's hidden activations (its neurons)       (batch, pos, d_mlp)
``blocks.L.mlp.out``       what the MLP adds to the residual stream         (batch, pos, d_model)
``blocks.L.resid_post``    the residual stream leaving block L              (batch, pos, d_model)
``ln_final.out``           the final norm's output, the unembedding's input (batch, pos, d_model)
=========================  ===============================================  ==========================

The points are found from the model's modules (GPT-2, Llama, Mistral, Qwen, GPT-NeoX and the world's
model without conversion): the decoder blocks are the ``ModuleList`` with one entry per layer, and
attention, MLP, their output projections and the norms are found by their usual attribute names.
``resid_mid`` is read from the second norm's input; editing it would change the MLP's input but not the
stream the block passes on, so it can be cached but not edited (edit ``attn.out`` instead).

PyTorch hooks are registered only inside :meth:`Hooks.cache` and :meth:`Hooks.intervene` and removed when
the ``with`` ends, even on an error: no hook outlives its block (TransformerLens's own docstring calls
persistent hooks its main footgun).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from safetylab.core.errors import SafetylabError

Intervention = Callable[[torch.Tensor], torch.Tensor | None]  # the activation in, a replacement (or None) out

ATTENTION = ("attn", "self_attn", "attention", "self_attention")
MLP = ("mlp", "feed_forward", "ffn")
ATTENTION_OUT = ("c_proj", "o_proj", "out_proj", "dense")
MLP_OUT = ("c_proj", "down_proj", "fc2", "dense_4h_to_h", "fc_out", "w2")
SECOND_NORM = ("ln_2", "post_attention_layernorm", "ffn_norm")
FINAL_NORM = ("ln_f", "norm", "final_layer_norm", "final_layernorm")
BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class HookPoint:
    """One place to read or edit: ``module``'s input (``pre``) or output, with the heads of ``attn.z``
    split out (``heads``), and whether an edit there changes the rest of the forward pass."""

    name: str
    module: nn.Module
    pre: bool
    editable: bool = True
    heads: int = 0

    @property
    def layer(self) -> int | None:
        match = BLOCK_NAME.match(self.name)
        return int(match.group(1)) if match else None


class _Stop(Exception):  # noqa: N818 - control flow, never seen by a caller
    """Raised by the last hook a cache needs, to skip the rest of the forward pass."""


class Cache(dict):
    """Activations by hook name (detached). A missing name is an error that lists what was cached."""

    def __missing__(self, name: str):
        raise SafetylabError(f"activation cache: nothing cached at {name!r}; cached: {', '.join(self) or 'nothing'}")

    def stack(self, names: Iterable[str]) -> torch.Tensor:
        """The activations at ``names`` stacked on a new first axis (say, every layer's ``resid_post``)."""
        return torch.stack([self[name] for name in names])


class Hooks:
    """The hook points of ``model`` (any HF causal LM), and caches and interventions on them.

    >>> hooks = Hooks(model)
    >>> logits, cache = hooks.run_with_cache(input_ids, names=hooks.names_like("resid_post"))
    >>> with hooks.intervene({"blocks.1.resid_post": lambda x: x - (x @ r)[..., None] * r}):
    ...     model.generate(...)
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.points: dict[str, HookPoint] = {p.name: p for p in find_points(model)}
        self.names: tuple[str, ...] = tuple(self.points)
        self.n_layers = len(decoder_blocks(model))

    # ------------------------------------------------------------------------- names
    def select(self, names: Iterable[str] | str | None = None,
               where: Callable[[str], bool] | None = None) -> list[str]:
        """The hook names asked for (all when ``names`` is None), filtered by ``where``, in forward order;
        an unknown name is an error that lists the valid ones."""
        names = [names] if isinstance(names, str) else self.names if names is None else list(names)
        for name in names:
            self.check_name(name)
        return [n for n in self.names if n in set(names) and (where is None or where(n))]

    def names_like(self, suffix: str) -> list[str]:
        """Every block's hook point ending in ``suffix`` (``"resid_post"``, ``"attn.out"``), layer by layer."""
        chosen = [n for n in self.names if n.startswith("blocks.") and n.endswith(f".{suffix}")]
        if not chosen:
            suffixes = sorted({n.split(".", 2)[2] for n in self.names if n.startswith("blocks.")})
            raise SafetylabError(f"hook points: no block has {suffix!r}; expected one of {', '.join(suffixes)}")
        return chosen

    def check_name(self, name: str) -> HookPoint:
        if name not in self.points:
            close = difflib.get_close_matches(name, self.names, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise SafetylabError(f"unknown hook point {name!r}; {hint}valid names: {describe_names(self.names)}")
        return self.points[name]

    # ------------------------------------------------------------------------- caching
    @contextmanager
    def cache(self, names: Iterable[str] | str | None = None, where: Callable[[str], bool] | None = None,
              device: torch.device | str | None = None, stop: bool = False) -> Iterator[Cache]:
        """Within the ``with``, every forward pass stores the activations at the chosen points (detached,
        moved to ``device`` if given) in the yielded :class:`Cache`; a later pass overwrites an earlier.
        With ``stop`` the forward pass ends after the last chosen point (use :meth:`run_with_cache`)."""
        chosen = self.select(names, where)
        cache, last = Cache(), chosen[-1] if chosen else None

        def store(name: str, act: torch.Tensor) -> None:
            act = act.detach()
            cache[name] = act if device is None else act.to(device)
            if stop and name == last:
                raise _Stop

        with ExitStack() as handles:
            for name in chosen:
                handles.enter_context(self._hook(self.points[name], lambda act, name=name: store(name, act)))
            yield cache

    def run_with_cache(self, *args: Any, names: Iterable[str] | str | None = None,
                       where: Callable[[str], bool] | None = None, device: torch.device | str | None = None,
                       stop_early: bool = False, **kwargs: Any) -> tuple[Any, Cache]:
        """``(model(*args, **kwargs), cache)``; with ``stop_early`` the forward pass stops after the last
        cached point and the output is None (probes and SAEs on early layers need no logits)."""
        with torch.no_grad(), self.cache(names, where, device, stop=stop_early) as cache:
            try:
                output = self.model(*args, **kwargs)
            except _Stop:
                output = None
        return output, cache

    # ------------------------------------------------------------------------- interventions
    @contextmanager
    def intervene(self, interventions: Mapping[str, Intervention]) -> Iterator[None]:
        """Within the ``with``, each forward pass calls ``interventions[name](activation)`` at its point and
        uses what it returns instead (None keeps the activation, edited in place or not). The replacement
        must have the activation's shape."""
        points = []
        for name in interventions:
            point = self.check_name(name)
            if not point.editable:
                raise SafetylabError(f"{name}: can be cached but not edited on a Hugging Face model (the block "
                                     "keeps its own copy of the stream); edit the attn.out or resid_pre point")
            points.append(point)
        with ExitStack() as handles:
            for point in points:
                handles.enter_context(self._hook(point, _checked(point.name, interventions[point.name])))
            yield

    def run_with_interventions(self, interventions: Mapping[str, Intervention], *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with ``interventions`` in place."""
        with self.intervene(interventions):
            return self.model(*args, **kwargs)

    # ------------------------------------------------------------------------- reading out
    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits read from a residual stream ``(..., d_model)``: final norm, then the unembedding — the logit
        lens (nostalgebraist 2020) when applied to an intermediate layer's stream."""
        return self.model.get_output_embeddings()(final_norm(self.model)(resid))

    # ------------------------------------------------------------------------- one hook
    @contextmanager
    def _hook(self, point: HookPoint, fn: Intervention) -> Iterator[None]:
        if point.pre:
            handle = point.module.register_forward_pre_hook(_pre_hook(fn, point.heads), with_kwargs=True)
        else:
            handle = point.module.register_forward_hook(_post_hook(fn))
        try:
            yield
        finally:
            handle.remove()


def _checked(name: str, fn: Intervention) -> Intervention:
    def run(act: torch.Tensor) -> torch.Tensor | None:
        new = fn(act)
        if new is not None and new.shape != act.shape:
            raise SafetylabError(f"{name}: the intervention returned shape {tuple(new.shape)} for an activation of "
                                 f"shape {tuple(act.shape)}; expected the same shape")
        return new
    return run


def _pre_hook(fn: Intervention, heads: int):
    """A forward pre-hook calling ``fn`` on the module's first input (positional or ``hidden_states``)."""
    def hook(module, args, kwargs):
        positional = len(args) > 0
        act = args[0] if positional else kwargs["hidden_states"]
        view = act.unflatten(-1, (heads, -1)) if heads else act
        new = fn(view)
        if new is None:
            return None
        new = new.flatten(-2) if heads else new
        return ((new, *args[1:]), kwargs) if positional else (args, {**kwargs, "hidden_states": new})
    return hook


def _post_hook(fn: Intervention):
    """A forward hook calling ``fn`` on the module's output (the first element when it is a tuple)."""
    def hook(module, args, output):
        act = output[0] if isinstance(output, tuple) else output
        new = fn(act)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook


# ----------------------------------------------------------------------------- finding the points
def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks: the ``ModuleList`` with one entry per hidden layer."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise SafetylabError(f"{type(model).__name__}: no list of {n_layers} decoder blocks found; expected a Hugging "
                         "Face causal LM (GPT-2, Llama, Mistral, Qwen, GPT-NeoX, …)")


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(module, n) for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block and the unembedding."""
    norm = _child(model.base_model, FINAL_NORM)
    if norm is None:
        raise SafetylabError(f"{type(model).__name__}: no final norm found (looked for {', '.join(FINAL_NORM)})")
    return norm


def find_points(model: nn.Module) -> list[HookPoint]:
    """Every hook point of ``model``, in the order a forward pass reaches them."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
    points = [HookPoint("embed", model.get_input_embeddings(), pre=False)]
    for i, block in enumerate(decoder_blocks(model)):
        attn, mlp = _child(block, ATTENTION), _child(block, MLP)
        if attn is None or mlp is None:
            raise SafetylabError(f"{type(model).__name__}, block {i}: no attention ({', '.join(ATTENTION)}) or MLP "
                                 f"({', '.join(MLP)}) submodule found")
        points.append(HookPoint(f"blocks.{i}.resid_pre", block, pre=True))
        if (out := _child(attn, ATTENTION_OUT)) is not None:
            points.append(HookPoint(f"blocks.{i}.attn.z", out, pre=True, heads=heads))
        points.append(HookPoint(f"blocks.{i}.attn.out", attn, pre=False))
        if (norm := _child(block, SECOND_NORM)) is not None:
            points.append(HookPoint(f"blocks.{i}.resid_mid", norm, pre=True, editable=False))
        if (down := _child(mlp, MLP_OUT)) is not None:
            points.append(HookPoint(f"blocks.{i}.mlp.post", down, pre=True))
        points.append(HookPoint(f"blocks.{i}.mlp.out", mlp, pre=False))
        points.append(HookPoint(f"blocks.{i}.resid_post", block, pre=False))
    if _child(model.base_model, FINAL_NORM) is not None:
        points.append(HookPoint("ln_final.out", final_norm(model), pre=False))
    return points


def describe_names(names: Iterable[str]) -> str:
    """Hook names in short: ``embed, blocks.{0..3}.{resid_pre, attn.out, …}, ln_final.out``."""
    names = list(names)
    layers = sorted({int(m.group(1)) for n in names if (m := BLOCK_NAME.match(n))})
    suffixes = list(dict.fromkeys(n.split(".", 2)[2] for n in names if BLOCK_NAME.match(n)))
    other = [n for n in names if not BLOCK_NAME.match(n)]
    blocks = f"blocks.{{{layers[0]}..{layers[-1]}}}.{{{', '.join(suffixes)}}}" if layers else ""
    return ", ".join([*other[:1], *([blocks] if blocks else []), *other[1:]])


def model_signature(model: nn.Module) -> dict[str, Any]:
    """What a probe, SAE or monitor records about the model it was made on, to refuse another one."""
    config = model.config
    return {"model_type": getattr(config, "model_type", type(model).__name__),
            "d_model": int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)),
            "n_layers": int(getattr(config, "num_hidden_layers", 0)),
            "vocab_size": int(getattr(config, "vocab_size", 0))}


def check_signature(expected: Mapping[str, Any], model: nn.Module, what: str) -> None:
    """``what`` (a probe, an SAE, a monitor) was made on a model with ``expected``'s shape; ``model`` must match."""
    actual = model_signature(model)
    differ = [f"{k} {expected[k]} (this model: {actual.get(k)})" for k in expected if expected[k] != actual.get(k)]
    if differ:
        raise SafetylabError(f"{what} was made for another model: {'; '.join(differ)}")
