"""``safetylab robust …``: the robustness study on the built-in digits, one question per command.

``train`` trains one classifier. The other commands run stages of :mod:`safetylab.robust.study` into a
run directory (``config.json``, ``sections.json``, ``tables.md``, each stage's ``section.json`` and plots
under ``STAGE/``, the trained classifiers under ``artifacts/models``); they study the classifier of
``--model`` (a ``robust train`` run) or train a standard one in their run directory. ``report --seeds
0,1,2`` runs the whole study once per seed (``OUT/seed-N``) and writes ``OUT/summary.md`` (mean ± sd).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import RunOut as Out
from safetylab.cli.common import Seeds, given_model, numbers, options, study_report

robust_app = typer.Typer(help="Robustness of a classifier on the built-in digits: attacks, adversarial training, "
                              "calibration, OOD detection, distribution shift, abstention.", no_args_is_help=True)

Seed = Annotated[int, typer.Option(help="Random seed (data split, training and attacks).")]
Model = Annotated[Path | None, typer.Option(help="A `robust train` run directory (default: train a standard "
                                                "classifier here).")]
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
Quick = Annotated[bool, typer.Option(help="Fewer epochs, radii, steps, queries and ensemble members.")]
Trainings = Annotated[str | None, typer.Option(help="Comma-separated adversarial trainings compared with the "
                                                    "standard one: pgd, trades (default pgd).")]
NAMES = {"eps": "--eps", "attack_steps": "--steps", "square_queries": "--queries", "trainings": "--trainings"}


def _study(out: Path, seed: int, only: tuple[str, ...] | None, model: Path | None = None, quick: bool = False,
           seeds: str | None = None, trainings: str | None = None, **changes) -> None:
    """Run the ``only`` stages (all when None) of the robustness study with ``changes`` to its config."""
    from safetylab.robust.study import STAGES, study_config, with_trainings

    methods = None if trainings is None else [m.strip() for m in trainings.split(",") if m.strip()]

    def make_config(s: int):
        config = replace(study_config(quick, s), **changes)
        return config if methods is None else with_trainings(config, methods)

    inputs = given_model(model, seed, seeds)
    study_report(STAGES, make_config, out, seed, seeds, only, inputs, NAMES)


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
    from safetylab.models.classifier import ARCHS, ClassifierTrainConfig, accuracy, train_or_load
    from safetylab.models.digits import load_digits
    from safetylab.robust.training import LOSSES

    with options("method", "eps", "epochs", "arch", "seed"):
        config = ClassifierTrainConfig(method=method, eps=eps, epochs=epochs, seed=seed)
        require_choice(method, "method", LOSSES)
        require_choice(arch, "arch", ARCHS)
    run = RunDir(out, {"arch": arch, **asdict(config)})
    digits = load_digits(seed)
    model = train_or_load(run.path, {"arch": arch, "num_classes": digits.num_classes},
                          (digits.x_train, digits.y_train), config, LOSSES, run=run)
    print(f"clean test accuracy {accuracy(model, digits.x_test, digits.y_test):.4f}; model: {run.path}")


@robust_app.command("attack")
def attack(out: Out = Path("runs/robust-attack"), model: Model = None,
           eps: Annotated[str | None, typer.Option(help="Comma-separated L∞ radii, inputs in [0, 1] "
                                                        "(default 0,0.05,…,0.25).")] = None,
           steps: Annotated[int | None, typer.Option(help="APGD steps (default 100).")] = None,
           queries: Annotated[int | None, typer.Option(help="Square attack queries (default 1000).")] = None,
           trainings: Trainings = None, seed: Seed = 0, quick: Quick = False) -> None:
    """Robust accuracy against ε under FGSM, PGD and the AutoAttack-style ensemble (APGD-CE, APGD-DLR,
    Square), for the standard model and each adversarially trained one (PGD by default)."""
    given = {"eps": None if eps is None else numbers(eps, "--eps", "radii"), "attack_steps": steps,
             "square_queries": queries}
    _study(out, seed, ("attack",), model, quick, trainings=trainings,
           **{k: v for k, v in given.items() if v is not None})


@robust_app.command("calibrate")
def calibrate(out: Out = Path("runs/robust-calibrate"), model: Model = None, seed: Seed = 0,
              quick: Quick = False) -> None:
    """ECE, NLL and Brier before and after temperature scaling, with MC dropout and a deep ensemble;
    a reliability diagram."""
    _study(out, seed, ("calibrate",), model, quick)


@robust_app.command("ood")
def ood(out: Out = Path("runs/robust-ood"), model: Model = None, seed: Seed = 0, quick: Quick = False) -> None:
    """Every OOD detector on held-out digits, corrupted digits and synthetic noise (higher score = more
    anomalous): AUROC, AUPR-In, AUPR-Out, FPR@95%TPR and score histograms."""
    _study(out, seed, ("ood",), model, quick)


@robust_app.command("shift")
def shift(out: Out = Path("runs/robust-shift"), model: Model = None, seed: Seed = 0, quick: Quick = False) -> None:
    """Accuracy, calibration and OOD score under each corruption family at severities 1–5."""
    _study(out, seed, ("shift",), model, quick)


@robust_app.command("report")
def report(out: Out = Path("runs/robust"), model: Model = None, seed: Seed = 0, quick: Quick = False,
           seeds: Seeds = None,
           trainings: Trainings = None) -> None:
    """All of the above and selective prediction (risk–coverage, the abstaining classifier) in one run.
    The published tables: ``--seeds 0,1,2 --trainings pgd,trades``."""
    _study(out, seed, None, model, quick, seeds, trainings)
