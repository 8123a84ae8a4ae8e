"""The ``safetylab`` command: every subsystem's commands under one app, and error reporting."""

from __future__ import annotations

import sys
import traceback
from typing import Annotated

import typer

from safetylab.cli.agents import agents_app
from safetylab.cli.align import align_app, sample_app
from safetylab.cli.audit import audit
from safetylab.cli.control import control_app, serve
from safetylab.cli.evals import evals_app, evaluate
from safetylab.cli.interp import interp_app
from safetylab.cli.robust import robust_app
from safetylab.cli.train import train_app
from safetylab.cli.verify import verify_app
from safetylab.cli.world import world_app
from safetylab.core.errors import SafetylabError

app = typer.Typer(help="safetylab: measure and manage the safety of ML models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.command()(audit)
app.command("eval")(evaluate)
app.command()(serve)
for name, sub in (("world", world_app), ("train", train_app), ("sample", sample_app), ("align", align_app),
                  ("interp", interp_app), ("robust", robust_app), ("agents", agents_app), ("verify", verify_app),
                  ("control", control_app), ("evals", evals_app)):
    app.add_typer(sub, name=name)


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    """Options for every command (``--debug`` is read by :func:`main`, which reports errors)."""


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, tied-weight notes) would drown the audit's own log."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def main() -> None:
    """Run the command line: a bad option or value (typer's usage errors too) is one line on standard
    error and exit code 2; ``--debug`` adds the traceback."""
    _quiet_libraries()
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # usage: an unknown option, a value of the wrong type
        if message := e.format_message():  # (empty when help was asked for and shown)
            print(f"error: {message}", file=sys.stderr)
        sys.exit(e.exit_code)
    except SafetylabError as e:
        if "--debug" in sys.argv[1:]:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if code == 130:  # typer turns Ctrl-C into exit code 130
        print("interrupted: finished checkpoints and stages are kept; rerun the same command to resume",
              file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
