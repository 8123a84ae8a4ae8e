"""``safetylab verify …``: the verification study on the built-in digits, one question per command.

Every command writes a run directory (``config.json``, ``sections.json``, ``tables.md``, ``plots/`` and
the trained networks under ``artifacts/models``). ``bounds`` and ``certify`` study the classifier of
``--model`` (a ``verify train`` run) or train the study's four networks in their run directory.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import numbers, options, run_study

verify_app = typer.Typer(help="Verification of a classifier on the built-in digits: IBP, CROWN, α-CROWN and exact "
                              "bounds, randomized smoothing, certified training.", no_args_is_help=True)

Out = Annotated[Path, typer.Option("--out", "-o", help="Run directory.")]
Seed = Annotated[int, typer.Option(help="Random seed (data split, training, attacks and noise).")]
Model = Annotated[Path | None, typer.Option(help="A `verify train` run directory (default: train the study's "
                                                "standard, PGD, IBP and CROWN-IBP networks here).")]
Quick = Annotated[bool, typer.Option(help="Fewer epochs, radii, examples and noise samples.")]


def _run(out: Path, seed: int, sections: tuple[str, ...], model: Path | None = None, quick: bool = False,
         **changes) -> None:
    from safetylab.verify import suite

    names = {"eps": "--eps", "bounds_eps": "--eps", "exact_time_limit": "--time-limit", "sigmas": "--sigma",
             "smooth_n": "--samples"}
    run_study(suite, out, seed, sections, model, quick, names, **changes)


@verify_app.command("train")
def train(
    out: Out = Path("runs/verify-train"),
    method: Annotated[str, typer.Option(help="standard, pgd, ibp, crown-ibp or noise (a smoothing base).")] = "ibp",
    eps: Annotated[float, typer.Option(help="L∞ radius (pgd, ibp, crown-ibp).")] = 0.1,
    sigma: Annotated[float, typer.Option(help="Noise standard deviation (noise).")] = 0.25,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 40,
    hidden: Annotated[int, typer.Option(help="Width of the MLP's two hidden layers.")] = 64,
    seed: Seed = 0,
) -> None:
    """Train a digits MLP, plainly, adversarially, certifiably (IBP, CROWN-IBP) or under Gaussian noise, and
    report its clean and IBP/CROWN-certified test accuracy at ``--eps``."""
    from safetylab.core.config import require_choice
    from safetylab.core.runs import RunDir
    from safetylab.robust.data import load_digits
    from safetylab.robust.suite import accuracy
    from safetylab.robust.training import METHODS as ROBUST_METHODS
    from safetylab.robust.training import RobustTrainConfig
    from safetylab.verify.suite import VerifySuiteConfig, train_or_load
    from safetylab.verify.training import METHODS as CERTIFIED_METHODS
    from safetylab.verify.training import CertifiedTrainConfig, certified_accuracy

    with options("method", "eps", "sigma", "epochs", "hidden", "seed"):
        require_choice(method, "method", (*ROBUST_METHODS, *CERTIFIED_METHODS))
        if method in CERTIFIED_METHODS:
            config = CertifiedTrainConfig(method=method, eps=eps, epochs=epochs, ramp_epochs=epochs // 2, seed=seed)
        else:
            config = RobustTrainConfig(method=method, eps=eps, sigma=sigma, epochs=epochs, seed=seed)
        study = VerifySuiteConfig(seed=seed, hidden=hidden)
    run = RunDir(out, {"hidden": hidden, **asdict(config)})
    digits = load_digits(seed)
    model = train_or_load(method, config, study, digits, run.path)
    x, y = digits.x_test, digits.y_test
    print(f"clean test accuracy {accuracy(model, x, y):.4f}; certified at eps {eps:g}: "
          f"IBP {certified_accuracy(model, x, y, eps, 'ibp'):.4f}, "
          f"CROWN {certified_accuracy(model, x, y, eps, 'crown'):.4f}; model: {run.path}")


@verify_app.command("bounds")
def bounds(out: Out = Path("runs/verify-bounds"), model: Model = None,
           eps: Annotated[float, typer.Option(help="L∞ radius.")] = 0.02, seed: Seed = 0, quick: Quick = False) -> None:
    """Bounds on the margins of test digits at one ε by IBP, CROWN and α-CROWN: their width, the share
    verified and the time each took."""
    _run(out, seed, ("bounds",), model, quick, bounds_eps=eps)


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
    _run(out, seed, ("certify",), model, quick, **changes)


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
    _run(out, seed, ("smooth",), None, quick, **changes)


@verify_app.command("report")
def report(out: Out = Path("runs/verify"), model: Model = None, seed: Seed = 0, quick: Quick = False) -> None:
    """Every section: bounds, certified accuracy against ε, and randomized smoothing."""
    from safetylab.verify.suite import SECTIONS

    _run(out, seed, SECTIONS, model, quick)
