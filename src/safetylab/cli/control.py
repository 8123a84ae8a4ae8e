"""``safetylab control …`` and ``safetylab serve``: deploy a model under control.

``build-guard`` trains and calibrates a guard for a world model and writes its guard file; ``serve`` puts a
model behind a guard file as an OpenAI-compatible server with an audit log, tripwires, a kill switch and a
review page; ``keys`` manages its API keys; ``verify-log`` checks an audit log's hash chain and names the first
altered, removed or reordered record; ``export-reviews`` writes reviewers' decisions as labelled JSONL and
``retrain`` refits a guard classifier with them; ``report`` runs the control study (the model alone against
the model behind its guard, by the gold judge).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import Device, Seed, Seeds, options, print_table, study_report
from safetylab.cli.common import RunOut as Out
from safetylab.core.errors import SafetylabError

control_app = typer.Typer(help="Deploy a model under control: guards, an OpenAI-compatible server, keys, the "
                               "audit log, reviews.", no_args_is_help=True)
keys_app = typer.Typer(help="The server's API keys (stored hashed, with roles user, reviewer, admin).",
                       no_args_is_help=True)
control_app.add_typer(keys_app, name="keys")

State = Annotated[Path, typer.Option(help="The server's state file (keys, kill switch, reviews).")]
Model = Annotated[Path | None, typer.Option(help="A model directory (HF save_pretrained, trained on the world; "
                                                "default: train a world assistant in the run directory).")]
Monitor = Annotated[Path | None, typer.Option(help="A safetylab.interp monitor directory of that model to add as a "
                                                  "guard layer (`safetylab interp monitor`).")]
STATE = Path("runs/serve/state.db")


@control_app.command("report")
def report(out: Out = Path("runs/control"), model: Model = None, monitor: Monitor = None,
           base: Annotated[Path | None, typer.Option(help="The pre-trained model --model was fine-tuned from: also "
                                                           "evaluated, behind the guard's text layers.")] = None,
           quick: Annotated[bool, typer.Option(help="A smaller model, fewer prompts.")] = False, seed: Seed = 0,
           seeds: Seeds = None, device: Device = "auto") -> None:
    """The control study: a guard built for the model, calibrated on validation prompts, and the model alone
    against the model behind the guard on held-out prompts, by the gold judge."""
    from safetylab.control.study import STAGES, study_config

    if (model is not None or monitor is not None or base is not None) and seeds is not None:
        raise SafetylabError("--model, --monitor or --base with --seeds: they belong to one seed's model; drop one")
    if (monitor is not None or base is not None) and model is None:
        raise SafetylabError(f"{'--monitor' if monitor is not None else '--base'}: give the --model it goes with")
    inputs = {k: str(v) for k, v in (("model", model), ("monitor", monitor), ("base", base)) if v is not None} or None
    for path in (model, base):
        if path is not None:
            _check_model(path)
    study_report(STAGES, lambda s: study_config(quick, s, device), out, seed, seeds, None, inputs,
                 {"device": "--device"})


def _check_model(model: Path):
    from safetylab.models.lm import load_model

    return load_model(model)


@control_app.command("build-guard")
def build_guard(
    out: Annotated[Path, typer.Option("--out", "-o", help="The guard's directory (guard.yaml and its layers).")]
    = Path("runs/guard"),
    model: Annotated[Path | None, typer.Option(help="The model the guard will serve: adds the OOD gate on its "
                                                    "states (without it: text layers only).")] = None,
    monitor: Monitor = None,
    fpr_block: Annotated[float, typer.Option(help="Target false-positive rate of the block thresholds.")] = 0.01,
    fpr_escalate: Annotated[float, typer.Option(help="Target false-positive rate of the escalate thresholds.")]
    = 0.05,
    seed: Seed = 0,
) -> None:
    """Train the guard's classifiers on world data, calibrate every threshold on held-out prompts and write
    OUT/guard.yaml with the rates measured."""
    from safetylab.control.build import GuardBuildConfig
    from safetylab.control.build import build_guard as build
    from safetylab.world import World, WorldConfig

    with options("fpr_block", "fpr_escalate", "seed"):
        config = GuardBuildConfig(fpr_block=fpr_block, fpr_escalate=fpr_escalate, seed=seed)
    if monitor is not None and model is None:
        raise SafetylabError("--monitor: give the --model it was made for")
    hooks = tokenizer = None
    if model is not None:
        from safetylab.interp.hooks import Hooks

        loaded, tokenizer = _check_model(model)
        hooks = Hooks(loaded.eval())
        if monitor is not None:
            from safetylab.interp.monitors import load_monitor

            load_monitor(monitor, hooks, tokenizer)
    result = build(World(WorldConfig(seed)), out, config, hooks, tokenizer, monitor)
    rows = [[layer, action, r[f"fpr_{action}"], r[action]["fpr"], r[action]["tpr"]]
            for layer, r in result.items() if layer != "ood" for action in ("escalate", "block")]
    print_table(["layer", "action", "target FPR", "validation FPR", "validation TPR"], rows, "guard calibration")
    print(f"guard: {out / 'guard.yaml'}")


@control_app.command("verify-log")
def verify_log(
    target: Annotated[str, typer.Argument(help="An audit log: an SQLite file, or a PostgreSQL DSN "
                                               "(postgresql://… or host=…).")],
    table: Annotated[str, typer.Option(help="The PostgreSQL table.")] = "audit_log",
    head: Annotated[str | None, typer.Option(help="The head SEQ:HASH kept elsewhere, to catch a cut-off tail.")]
    = None,
) -> None:
    """Check the hash chain record by record; name the first altered, removed or reordered record. Exit 1 when
    the log does not verify."""
    from safetylab.control.auditlog import open_audit_log

    expected = None
    if head is not None:
        seq, _, digest = head.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise SafetylabError(f"--head: expected SEQ:HASH (a record number and 64 hex digits), got {head!r}")
        expected = (int(seq), digest)
    if not os.path.exists(target) and "=" not in target and "://" not in target:
        raise SafetylabError(f"{target}: no such audit log file")
    with open_audit_log(target, table=table, create=False) as log:
        result = log.verify(expected)
    print(result)
    if not result.ok:
        raise typer.Exit(1)


@keys_app.command("add")
def keys_add(name: Annotated[str, typer.Argument(help="A name for the key (who holds it).")],
             role: Annotated[str, typer.Option(help="user, reviewer or admin.")] = "user",
             rate: Annotated[float, typer.Option(help="Requests a minute.")] = 60.0, state: State = STATE) -> None:
    """Create a key; it is printed once and only its hash is kept."""
    from safetylab.control.state import ROLES
    from safetylab.control.state import State as Store
    from safetylab.core.config import require, require_choice

    with options(rate_per_minute="--rate", role="--role", name="NAME"):  # checked before the file is made
        require_choice(role, "role", ROLES)
        require(rate > 0, "rate_per_minute", "a number > 0", rate)
        require(0 < len(name) <= 64, "name", "a name of 1 to 64 characters", name)
    print(Store(state).add_key(name, role, rate))


@keys_app.command("list")
def keys_list(state: State = STATE) -> None:
    """The keys: name, role, rate limit, locked."""
    from safetylab.control.state import State as Store

    print_table(["name", "role", "requests a minute", "locked"],
                [[k.name, k.role, k.rate_per_minute, k.locked_reason or ""] for k in _state(state, Store).keys()],
                f"keys in {state}")


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")], state: State = STATE) -> None:
    """Delete a key."""
    from safetylab.control.state import State as Store

    _state(state, Store).revoke_key(name)
    print(f"revoked {name}")


def _state(path: Path, store):
    if not path.is_file():
        raise SafetylabError(f"{path}: no such state file (safetylab serve makes it; --state names it)")
    return store(path)


@control_app.command("export-reviews")
def export_reviews(out: Annotated[Path, typer.Option("--out", "-o", help="The JSONL file to write.")],
                   state: State = STATE) -> None:
    """Write the decided reviews as labelled JSONL (label 1: rejected; 0: approved or edited)."""
    from safetylab.control.state import State as Store

    n = _state(state, Store).export_reviews(out)
    print(f"wrote {n} reviews to {out}")


@control_app.command("retrain")
def retrain(guard: Annotated[Path, typer.Option(help="The guard file.")],
            reviews: Annotated[Path, typer.Option(help="Reviews exported by export-reviews.")],
            layer: Annotated[str, typer.Option(help="The classifier layer to refit.")] = "input-classifier") -> None:
    """Refit a guard classifier on its training texts plus the reviews, calibrate it again on its validation
    texts, and rewrite it and the guard file."""
    from safetylab.control.build import retrain as refit

    if not guard.is_file():
        raise SafetylabError(f"--guard: {guard}: no such file")
    calibration = refit(guard, layer, reviews)
    print(f"{layer}: {calibration['reviews_added']} reviews added; block at validation FPR "
          f"{calibration['block']['fpr']:.3f}, TPR {calibration['block']['tpr']:.3f}")


def serve(
    guard: Annotated[Path, typer.Option(help="The guard file (safetylab control build-guard writes one).")],
    model: Annotated[Path | None, typer.Option(help="The model directory (any HF causal LM with a chat "
                                                    "template; the world's models carry one).")] = None,
    echo: Annotated[bool, typer.Option(help="Serve a no-op model that echoes the prompt (tests, benchmarks).")]
    = False,
    log: Annotated[str, typer.Option(help="The audit log: an SQLite file, or a PostgreSQL DSN for several "
                                          "server processes.")] = "runs/serve/audit.db",
    state: State = STATE,
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The port.")] = 8000,
    model_name: Annotated[str, typer.Option(help="The model's name in the API.")] = "safetylab-world",
    escalation: Annotated[str, typer.Option(help="hold escalated answers for review, or pass them on.")] = "hold",
    max_body_bytes: Annotated[int, typer.Option(help="The largest request body.")] = 64 * 1024,
    device: Device = "auto",
) -> None:
    """Serve a model behind a guard: an OpenAI-compatible API (/v1/chat/completions, /v1/models), every
    decision in a hash-chained audit log, tripwires, a kill switch (/admin) and a review page (/review)."""
    import uvicorn

    from safetylab.control.auditlog import open_audit_log
    from safetylab.control.config import load_guard, read_guard
    from safetylab.control.server import Server, ServerConfig, create_app, echo_generator, model_generator
    from safetylab.control.state import State as Store

    with options("model_name", "escalation", "max_body_bytes"):
        config = ServerConfig(model_name=model_name, escalation=escalation, max_body_bytes=max_body_bytes)
    if (model is None) == (not echo):
        raise SafetylabError("give --model DIR, or --echo for a no-op model (not both)")
    if not 0 < port < 65536:
        raise SafetylabError(f"--port: expected 1 to 65535, got {port}")
    spec = read_guard(guard)
    hooks = tokenizer = None
    generate = echo_generator
    if model is not None:
        from safetylab.core.devices import select_device
        from safetylab.interp.hooks import Hooks
        from safetylab.models.lm import load_model

        served, tokenizer = load_model(model, select_device(device))
        hooks = Hooks(served.eval())
        generate = model_generator(served, tokenizer)
    elif spec.needs_model:
        raise SafetylabError(f"{guard}: its ood and monitor layers read the served model; serve a --model")
    built = load_guard(guard, hooks, tokenizer)
    store = Store(state)
    if not store.keys():
        token = store.add_key("admin", "admin", 600)
        path = state.parent / "admin.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        print(f"no keys yet: created the admin key in {path} (readable by you only); add others with "
              f"`safetylab control keys add NAME --role user --state {state}`")
    with open_audit_log(log, writer=False) as audit:  # the server commits on its event loop (LoopCommitter)
        server = Server(generate, built, audit, store, config)
        app = create_app(server)
        # What is loaded now (torch, the model, the guard) lives as long as the server: move it out of the
        # garbage collector's sight, or each full collection walks millions of objects between two requests.
        gc.collect()
        gc.freeze()
        print(f"serving {model_name} on http://{host}:{port}/v1 (review page: /review; audit log: {log})")
        uvicorn.run(app, host=host, port=port, log_level="warning")
