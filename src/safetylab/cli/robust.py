"""``safetylab robust …``: the robustness study on the built-in digits, one question per command.

Every command writes a run directory (``config.json``, ``sections.json``, ``tables.md``, ``plots/``,
and the trained classifiers under ``artifacts/models``). Commands other than ``train`` study the
classifier of ``--model`` (a ``robust train`` run) or train a standard one in their run directory.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import numbers, options, run_study

robust_app = typer.Typer(help="Robustness of a classifier on the built-in digits: attacks, adversarial training, "
                              "calibration, OOD detection, distribution shift, abstention.", no_args_is_help=True)

Out = Annotated[Path, typer.Option("--out", "-o", help="Run directory.")]
Seed = Annotated[int, typer.Option(help="Random seed (data split, training and attacks).")]
Model = Annotated[Path | None, typer.Option(help="A `robust train` run directory (default: train a standard "
                                                "classifier here).")]
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
Quick = Annotated[bool, typer.Option(help="Fewer epochs, radii, steps, queries and ensemble members.")]


def _run(out: Path, seed: int, sections: tuple[str, ...], model: Path | None = None, quick: bool = False,
         **changes) -> None:
    from safetylab.robust import suite

    names = {"eps": "--eps", "attack_steps": "--steps", "square_queries": "--queries"}
    run_study(suite, out, seed, sections, model, quick, names, **changes)


@robust_app.command("train")
def train(
    out: Out = Path("runs/robust-train"),
    method: Annotated[str, typer.Option(help="standard, pgd or trades.")] = "standard",
    eps: Annotated[float, typer.Option(help="L∞ radius of the adversary (pgd, trades).")] = 0.15,
    epochs: Epochs = 30,
    arch: Annotated[str, typer.Option(help="cnn or mlp.")] = "cnn",
    seed: Seed = 0,
) -> None:
    """Train a digits classifier (standard, PGD or TRADES) and report its clean test accuracy."""
    from safetylab.core.config import require_choice
    from safetylab.core.runs import RunDir
    from safetylab.robust.data import ARCHS, load_digits
    from safetylab.robust.suite import accuracy, train_or_load
    from safetylab.robust.training import RobustTrainConfig

    with options("method", "eps", "epochs", "arch", "seed"):
        config = RobustTrainConfig(method=method, eps=eps, epochs=epochs, seed=seed)
        require_choice(arch, "arch", ARCHS)
    run = RunDir(out, {"arch": arch, **asdict(config)})
    digits = load_digits(seed)
    model = train_or_load(config, arch, digits, run.path, run=run)
    print(f"clean test accuracy {accuracy(model, digits.x_test, digits.y_test):.4f}; model: {run.path}")


@robust_app.command("attack")
def attack(out: Out = Path("runs/robust-attack"), model: Model = None,
           eps: Annotated[str | None, typer.Option(help="Comma-separated L∞ radii, inputs in [0, 1] "
                                                        "(default 0,0.05,…,0.25).")] = None,
           steps: Annotated[int | None, typer.Option(help="APGD steps (default 100).")] = None,
           queries: Annotated[int | None, typer.Option(help="Square attack queries (default 1000).")] = None,
           seed: Seed = 0, quick: Quick = False) -> None:
    """Robust accuracy against ε under FGSM, PGD and the AutoAttack-style ensemble (APGD-CE, APGD-DLR,
    Square), for the standard model and a PGD-trained one."""
    given = {"eps": None if eps is None else numbers(eps, "--eps", "radii"), "attack_steps": steps,
             "square_queries": queries}
    _run(out, seed, ("attack",), model, quick, **{k: v for k, v in given.items() if v is not None})


@robust_app.command("calibrate")
def calibrate(out: Out = Path("runs/robust-calibrate"), model: Model = None, seed: Seed = 0,
              quick: Quick = False) -> None:
    """ECE, NLL and Brier before and after temperature scaling, with MC dropout and a deep ensemble;
    a reliability diagram."""
    _run(out, seed, ("calibrate",), model, quick)


@robust_app.command("ood")
def ood(out: Out = Path("runs/robust-ood"), model: Model = None, seed: Seed = 0, quick: Quick = False) -> None:
    """Every OOD detector on held-out digits, corrupted digits and synthetic noise (higher score = more
    anomalous): AUROC, AUPR-In, AUPR-Out, FPR@95%TPR and score histograms."""
    _run(out, seed, ("ood",), model, quick)


@robust_app.command("shift")
def shift(out: Out = Path("runs/robust-shift"), model: Model = None, seed: Seed = 0, quick: Quick = False) -> None:
    """Accuracy, calibration and OOD score under each corruption family at severities 1–5."""
    _run(out, seed, ("shift",), model, quick)


@robust_app.command("report")
def report(out: Out = Path("runs/robust"), model: Model = None, seed: Seed = 0, quick: Quick = False) -> None:
    """All of the above and selective prediction (risk–coverage, the abstaining classifier) in one run."""
    from safetylab.robust.suite import SECTIONS

    _run(out, seed, SECTIONS, model, quick)
