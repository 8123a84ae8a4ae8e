"""``safetylab verify …``: the verification study on the built-in digits, one question per command.

``train`` trains one network. The other commands run stages of :mod:`safetylab.verify.study` into a run
directory (``config.json``, ``sections.json``, ``tables.md``, each stage's ``section.json`` and plots
under ``STAGE/``, the trained networks under ``artifacts/models``). ``bounds`` and ``certify`` study the
classifier of ``--model`` (a ``verify train`` run) or train the study's four networks in their run
directory. ``report --seeds 0,1,2`` runs the whole study once per seed (``OUT/seed-N``) and writes
``OUT/summary.md`` (mean ± sd).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import RunOut as Out
from safetylab.cli.common import Seeds, given_model, numbers, options, study_report

verify_app = typer.Typer(help="Verification of a classifier on the built-in digits: IBP, CROWN, α-CROWN and exact "
                              "bounds, randomized smoothing, certified training.", no_args_is_help=True)

Seed = Annotated[int, typer.Option(help="Random seed (data split, training, attacks and noise).")]
Model = Annotated[Path | None, typer.Option(help="A `verify train` run directory (default: train the study's "
                                                "standard, PGD, IBP and CROWN-IBP networks here).")]
Quick = Annotated[bool, typer.Option(help="Fewer epochs, radii, examples and noise samples.")]
NAMES = {"eps": "--eps", "bounds_eps": "--eps", "exact_time_limit": "--time-limit", "sigmas": "--sigma",
         "smooth_n": "--samples"}


def _study(out: Path, seed: int, only: tuple[str, ...] | None, model: Path | None = None, quick: bool = False,
           seeds: str | None = None, **changes) -> None:
    """Run the ``only`` stages (all when None) of the verification study with ``changes`` to its config."""
    from safetylab.verify.study import STAGES, study_config

    inputs = given_model(model, seed, seeds)
    study_report(STAGES, lambda s: replace(study_config(quick, s), **changes), out, seed, seeds, only,
                 inputs, NAMES)


@verify_app.command("train")
def train(
    out: Out = Path("runs/verify-train"),
    method: Annotated[str, typer.Option(help="standard, pgd, trades, ibp, crown-ibp or noise (a smoothing "
                                             "base).")] = "ibp",
    eps: Annotated[float, typer.Option(help="L∞ radius (pgd, trades, ibp, crown-ibp).")] = 0.1,
    sigma: Annotated[float, typer.Option(help="Noise standard deviation (noise).")] = 0.25,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 40,
    hidden: Annotated[int, typer.Option(help="Width of the MLP's two hidden layers.")] = 64,
    seed: Seed = 0,
) -> None:
    """Train a digits MLP, plainly, adversarially, certifiably (IBP, CROWN-IBP) or under Gaussian noise, and
    report its clean and IBP/CROWN-certified test accuracy at ``--eps``."""
    from safetylab.core.config import require
    from safetylab.core.runs import RunDir
    from safetylab.models.classifier import accuracy
    from safetylab.models.digits import load_digits
    from safetylab.verify.study import network_config, train_network
    from safetylab.verify.training import certified_accuracy

    with options("method", "eps", "sigma", "epochs", "hidden", "seed"):
        config = network_config(method, eps, sigma, epochs, seed)
        require(isinstance(hidden, int) and hidden >= 1, "hidden", "an integer >= 1", hidden)
    run = RunDir(out, {"hidden": hidden, **asdict(config)})
    digits = load_digits(seed)
    model = train_network(run.path, config, hidden, digits, run)
    x, y = digits.x_test, digits.y_test
    print(f"clean test accuracy {accuracy(model, x, y):.4f}; certified at eps {eps:g}: "
          f"IBP {certified_accuracy(model, x, y, eps, 'ibp'):.4f}, "
          f"CROWN {certified_accuracy(model, x, y, eps, 'crown'):.4f}; model: {run.path}")


@verify_app.command("bounds")
def bounds(out: Out = Path("runs/verify-bounds"), model: Model = None,
           eps: Annotated[float, typer.Option(help="L∞ radius.")] = 0.02, seed: Seed = 0, quick: Quick = False) -> None:
    """Bounds on the margins of test digits at one ε by IBP, CROWN and α-CROWN: their width, the share
    verified and the time each took."""
    _study(out, seed, ("bounds",), model, quick, bounds_eps=eps)


@verify_app.command("certify")
def certify(out: Out = Path("runs/verify-certify"), model: Model = None,
            eps: Annotated[str | None, typer.Option(help="Comma-separated L∞ radii (default 0,0.01,…,0.15).")] = None,
            time_limit: Annotated[float | None, typer.Option(help="Seconds per example, exact verification.")] = None,
            seed: Seed = 0, quick: Quick = False) -> None:
    """Certified accuracy against ε under IBP, CROWN, α-CROWN and exact verification (a MILP), beside PGD's
    robust accuracy, for standard, PGD, IBP and CROWN-IBP training."""
    changes = {} if eps is None else {"eps": numbers(eps, "--eps")}
    if time_limit is not None:
        changes["exact_time_limit"] = time_limit
    _study(out, seed, ("certify",), model, quick, **changes)


@verify_app.command("smooth")
def smooth(out: Out = Path("runs/verify-smooth"),
           sigma: Annotated[str | None, typer.Option(help="Comma-separated noise levels (default 0.12,0.25,0.5).")
                            ] = None,
           samples: Annotated[int | None, typer.Option(help="Noise samples per certificate (default 10,000).")] = None,
           seed: Seed = 0, quick: Quick = False) -> None:
    """Randomized smoothing (Cohen et al. 2019): certified accuracy against the L2 radius for each σ, with a
    base classifier trained under that noise, beside CROWN's L2 certificates of a standard network."""
    changes = {} if sigma is None else {"sigmas": numbers(sigma, "--sigma")}
    if samples is not None:
        changes["smooth_n"] = samples
    _study(out, seed, ("smooth",), None, quick, **changes)


@verify_app.command("report")
def report(out: Out = Path("runs/verify"), model: Model = None, seed: Seed = 0, quick: Quick = False,
           seeds: Seeds = None) -> None:
    """Every stage: bounds, certified accuracy against ε, and randomized smoothing."""
    _study(out, seed, None, model, quick, seeds)
