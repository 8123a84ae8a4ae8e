"""``safetylab interp …``: interpretability of a language model on the world, one question per command.

``cache`` writes activations at named hook points to a safetensors file. The other commands run stages of
:mod:`safetylab.interp.study` into a run directory (``config.json``, ``sections.json``, ``tables.md``, each
stage's ``section.json`` and plots under ``STAGE/``) on the model of ``--model`` (any HF causal LM trained on
the world, an audit's ``align/sft/artifacts/model`` say) or on a world assistant they train first.
``report --seeds 0,1,2`` runs the whole study once per seed and writes ``OUT/summary.md`` (mean ± sd).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import Device, Seed, Seeds, options, study_report
from safetylab.cli.common import RunOut as Out
from safetylab.core.errors import SafetylabError

interp_app = typer.Typer(help="Interpretability on any HF causal LM: hook caches, logit lens, probes, sparse "
                              "autoencoders, steering, activation patching, monitors.", no_args_is_help=True)

Model = Annotated[Path | None, typer.Option(help="A model directory (HF save_pretrained, trained on the world; "
                                                "default: train a world assistant in the run directory).")]
Quick = Annotated[bool, typer.Option(help="A smaller model, fewer prompts and steps.")]


def _study(out: Path, seed: int, only: tuple[str, ...] | None, model: Path | None, quick: bool, device: str,
           seeds: str | None = None, **changes) -> None:
    """Run the ``only`` stages (all when None; ``model`` first) of the interpretability study."""
    from safetylab.interp.study import STAGES, study_config

    if model is not None and seeds is not None:
        raise SafetylabError("--model with --seeds: a given model is one seed's; drop one of them")
    _check_model(model, changes.get("sae_hook"), quick)
    stages = None if only is None else ("model", *only)
    study_report(STAGES, lambda s: study_config(quick, s, device, **changes), out, seed, seeds, stages,
                 None if model is None else {"model": str(model)}, {"device": "--device"})


def _check_model(model: Path | None, hook: str | None, quick: bool) -> None:
    """Before any directory is made: the model loads, and ``hook`` is one of its hook points (without a model,
    one of the points of the GPT-2 the study trains, built from its config with random weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from safetylab.interp.hooks import Hooks
    from safetylab.interp.study import study_config
    from safetylab.models.lm import load_model

    if model is not None:
        studied = load_model(model)[0]
    elif hook is not None:
        shape = study_config(quick).assistant.model
        studied = GPT2LMHeadModel(GPT2Config(vocab_size=8, n_layer=shape.n_layer, n_head=shape.n_head,
                                             n_embd=shape.n_embd, n_positions=shape.n_positions))
    if hook is not None:
        Hooks(studied).check_name(hook)


@interp_app.command("report")
def report(out: Out = Path("runs/interp"), model: Model = None, quick: Quick = False, seed: Seed = 0,
           seeds: Seeds = None, device: Device = "auto") -> None:
    """The whole study: logit lens, probes by layer, sparse autoencoders, the refusal direction, activation
    patching of fact recall and the probe monitor; tables.md and plots in the run directory."""
    _study(out, seed, None, model, quick, device, seeds)


@interp_app.command("lens")
def lens(out: Out = Path("runs/interp-lens"), model: Model = None, quick: Quick = False, seed: Seed = 0,
         device: Device = "auto",
         questions: Annotated[int | None, typer.Option(help="Held-out questions per kind.")] = None) -> None:
    """The logit lens: the answer to held-out fact and arithmetic questions read from every layer's stream."""
    with options(lens_questions="--questions"):
        _study(out, seed, ("lens",), model, quick, device, **_given(lens_questions=questions))


def _names(text: str | None, option: str) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple (None when not given; the config checks the names)."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise SafetylabError(f"{option}: expected one or more comma-separated names, got {text!r}")
    return names


@interp_app.command("probe")
def probe(out: Out = Path("runs/interp-probe"), model: Model = None, quick: Quick = False, seed: Seed = 0,
          device: Device = "auto",
          concepts: Annotated[str | None, typer.Option(help="Comma-separated: request_kind, harmful_intent, "
                                                            "jailbreak, will_comply, will_be_wrong (default all).")
                              ] = None) -> None:
    """Linear probes for world concepts at every layer, with control tasks (selectivity)."""
    with options("concepts"):
        _study(out, seed, ("probes",), model, quick, device, **_given(concepts=_names(concepts, "--concepts")))


@interp_app.command("sae")
def sae(out: Out = Path("runs/interp-sae"), model: Model = None, quick: Quick = False, seed: Seed = 0,
        device: Device = "auto",
        kinds: Annotated[str | None, typer.Option(help="Comma-separated SAE kinds: relu, topk, jumprelu "
                                                       "(default all).")] = None,
        hook: Annotated[str | None, typer.Option(help="Hook point (default: the middle block's resid_post).")
                        ] = None) -> None:
    """Sparse autoencoders on a residual stream: L0, explained variance, CE loss recovered, dead and dense
    latents, and a feature dashboard (sae/dashboard.html)."""
    with options(sae_kinds="--kinds", sae_hook="--hook"):
        _study(out, seed, ("sae",), model, quick, device, **_given(sae_kinds=_names(kinds, "--kinds"), sae_hook=hook))


@interp_app.command("steer")
def steer(out: Out = Path("runs/interp-steer"), model: Model = None, quick: Quick = False, seed: Seed = 0,
          device: Device = "auto") -> None:
    """The refusal direction: ablated from every write to the residual stream and added at one layer; harmful
    compliance, over-refusal and the KL cost, by the gold judge."""
    _study(out, seed, ("steer",), model, quick, device)


@interp_app.command("patch")
def patch(out: Out = Path("runs/interp-patch"), model: Model = None, quick: Quick = False, seed: Seed = 0,
          device: Device = "auto",
          relations: Annotated[str | None, typer.Option(help="Comma-separated: capital, river, animal, language "
                                                             "(default all).")] = None) -> None:
    """Activation patching of fact recall: where the model recalls a country's facts, by layer × position."""
    with options(patch_relations="--relations"):
        _study(out, seed, ("patch",), model, quick, device,
               **_given(patch_relations=_names(relations, "--relations")))


@interp_app.command("monitor")
def monitor(out: Out = Path("runs/interp-monitor"), model: Model = None, quick: Quick = False, seed: Seed = 0,
            device: Device = "auto") -> None:
    """The harmful-intent probe monitor, calibrated on benign prompts and rated on held-out jailbreaks; saved in
    monitor/harmful-intent for the control runtime. When OUT holds an earlier run's sae stage (interp sae or
    report), its best SAE's most telling latent becomes a second monitor, monitor/harmful-intent-feature."""
    _study(out, seed, ("monitor",), model, quick, device)


@interp_app.command("cache")
def cache(
    model: Annotated[Path, typer.Option(help="A model directory (HF save_pretrained).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The safetensors file to write.")],
    names: Annotated[str, typer.Option(help="Comma-separated hook points (blocks.1.resid_post, …), or a suffix "
                                            "every block has (resid_post).")] = "resid_post",
    kinds: Annotated[str, typer.Option(help="Comma-separated world request kinds whose prompts are run.")
                     ] = "arithmetic,facts,advice,harmful,dual_use,false_premise",
    n: Annotated[int, typer.Option(help="Prompts per kind (the world's test split).")] = 50,
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    """Activations at the last prompt token of world prompts, one tensor per hook point (prompts, d), written
    to a safetensors file with the prompts, kinds and the model's signature in its metadata."""
    from safetylab.core.devices import select_device
    from safetylab.interp.data import save_activations
    from safetylab.interp.hooks import Hooks
    from safetylab.models.lm import load_model
    from safetylab.world import KINDS, World, WorldConfig

    chosen = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in KINDS]
    if unknown or not chosen:
        raise SafetylabError(f"--kinds: expected one or more of {', '.join(KINDS)}, got {kinds!r}")
    if n < 1:
        raise SafetylabError(f"--n: expected an integer >= 1, got {n}")
    model_, tokenizer = load_model(model, select_device(device))
    hooks = Hooks(model_)
    points = [p.strip() for p in names.split(",") if p.strip()]
    suffix = len(points) == 1 and points[0] not in hooks.points and not points[0].startswith("blocks.")
    points = hooks.names_like(points[0]) if suffix else hooks.select(points)
    world = World(WorldConfig(seed))
    requests = [r for kind in chosen for r in world.requests(kind, "test", n, seed)]
    path = save_activations(hooks, tokenizer, [r.prompt for r in requests], points, out,
                            {"kinds": [r.kind for r in requests]})
    print(f"wrote {len(points)} × {len(requests)} activations to {path}")


def _given(**values):
    return {k: v for k, v in values.items() if v is not None}

