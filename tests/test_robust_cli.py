"""``safetylab robust …``: each command writes a run directory with tables and plots; ``report --seeds``
summarises seeds as mean ± sd; a resumed study gives the numbers of a straight one; bad options fail clearly."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import pytest
from test_cli import run_main

from safetylab import cli
from safetylab.models.classifier import ClassifierTrainConfig, load_classifier
from safetylab.robust import study

TINY = replace(study.QUICK, standard=ClassifierTrainConfig(epochs=2),
               adversarial=(ClassifierTrainConfig(method="pgd", epochs=1, eps=0.15, steps=2),), eps=(0.0, 0.1),
               attack_steps=3, square_queries=5, ensemble_members=2, mc_samples=2)


@pytest.fixture
def tiny(monkeypatch):
    """``--quick`` means :data:`TINY`: seconds, not minutes."""
    monkeypatch.setattr(study, "QUICK", TINY)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A `robust train` run: 3 epochs of the digits CNN."""
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("robust") / "train"
    result = CliRunner().invoke(cli.app, ["robust", "train", "--epochs", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_saves_a_loadable_classifier(trained):
    out, output = trained
    model, spec = load_classifier(out)
    assert spec == {"arch": "cnn", "num_classes": 8} and not model.training
    accuracy = float(output.split("clean test accuracy ")[1].split(";")[0])
    assert accuracy > 0.8
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # one record per epoch


@pytest.mark.slow
def test_attack_writes_tables_and_plots(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "attack"
    code, stdout, err = run_main(monkeypatch, capsys, "robust", "attack", "--model", str(trained[0]), "--quick",
                                 "--eps", "0,0.1", "--steps", "5", "--queries", "20", "--out", str(out))
    assert code == 0, err
    sections = json.loads((out / "sections.json").read_text())
    rows = sections["attack"]["data"]["rows"]
    assert [(r["model"], r["eps"]) for r in rows] == [("given model", 0.0), ("given model", 0.1),
                                                      ("pgd (eps 0.15)", 0.0), ("pgd (eps 0.15)", 0.1)]
    assert rows[0]["clean"] == rows[0]["ensemble"] > rows[1]["ensemble"]
    assert sections["attack"]["plots"] == ["attack/robust_accuracy.png"]
    assert (out / "attack" / "robust_accuracy.png").is_file()
    assert json.loads((out / "attack" / "section.json").read_text()) == sections["attack"]
    assert "| model | eps | clean | fgsm | pgd | ensemble |" in (out / "tables.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert "model" in config["inputs"] and config["attack_steps"] == 5 and config["eps"] == [0.0, 0.1]
    assert "tables:" in stdout


@pytest.mark.slow
def test_report_over_seeds_writes_mean_and_sd(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "seeds"
    code, stdout, err = run_main(monkeypatch, capsys, "robust", "report", "--quick", "--seeds", "0,1",
                                 "--trainings", "pgd,trades", "--out", str(out))
    assert code == 0, err
    assert "summary over seeds 0,1" in stdout
    runs = {s: json.loads((out / f"seed-{s}" / "sections.json").read_text()) for s in (0, 1)}
    assert list(runs[0]) == [s.name for s in study.STAGES]
    assert json.loads((out / "seed-1" / "config.json").read_text())["seed"] == 1
    summary = json.loads((out / "summary.json").read_text())
    attack = summary["attack"]["tables"][0]
    assert {row[0] for row in attack["rows"]} == {"standard", "pgd (eps 0.15)", "trades (eps 0.15)"}
    for r, row in enumerate(attack["rows"]):
        assert row[1] in (0.0, 0.1)  # eps: the same in both seeds, kept plain
        for c, cell in enumerate(row[2:], start=2):
            values = [runs[s]["attack"]["tables"][0]["rows"][r][c] for s in (0, 1)]
            if values[0] == values[1]:
                assert cell == values[0]
            else:
                mean, sd = (sum(values) / 2, abs(values[0] - values[1]) / 2 ** 0.5)
                assert cell == f"{mean:.3f} ± {sd:.3f}", (r, c)
    shown = (out / "summary.md").read_text()
    assert re.search(r"\| standard \| 0\.100 \| \d\.\d{3} ± \d\.\d{3} \|", shown)  # label and radius plain
    assert "mean ± sd over seeds 0, 1" in shown


@pytest.mark.slow
def test_a_resumed_study_gives_the_numbers_of_a_straight_one(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    code, _, err = run_main(monkeypatch, capsys, "robust", "report", "--quick", "--out", str(out))
    assert code == 0, err
    straight = json.loads((out / "sections.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # interrupted after calibrate: the later stages' sections are gone, the models and the ensemble on disk
    for name in ("ood", "shift", "selective"):
        (copy / name / "section.json").unlink()
    code, stdout, err = run_main(monkeypatch, capsys, "robust", "report", "--quick", "--out", str(copy))
    assert code == 0, err
    assert "attack: done earlier, skipped" in stdout and "calibrate: done earlier, skipped" in stdout
    assert json.loads((copy / "sections.json").read_text()) == straight
    # and a stage run alone, in a fresh directory, gives the numbers it gives in the whole study
    alone = tmp_path / "alone"
    code, _, err = run_main(monkeypatch, capsys, "robust", "ood", "--quick", "--out", str(alone))
    assert code == 0, err
    assert json.loads((alone / "sections.json").read_text())["ood"] == straight["ood"]


@pytest.mark.parametrize("args, message", [
    (["attack", "--eps", "0,-0.1"], "--eps: expected one or more finite radii >= 0"),
    (["attack", "--steps", "0"], "--steps: expected an integer >= 1"),
    (["report", "--trainings", "pgd,ibp"], "--trainings: expected one or more of pgd, trades"),
    (["report", "--seeds", "0,0"], "--seeds: expected one or more distinct integers >= 0"),
    (["report", "--model", "nowhere", "--seeds", "0,1"], "--model with --seeds"),
    (["ood", "--model", "nowhere"], "nowhere: not a saved classifier"),
    (["train", "--method", "ibp"], "--method: expected one of standard, pgd, trades"),
])
def test_bad_options_fail_before_any_run_directory(args, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, "robust", *args, "--out", str(out))
    assert code == 2 and message in err, err
    assert not out.exists()
