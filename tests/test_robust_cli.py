"""``safetylab robust …``: each command writes a run directory with tables and plots; bad options fail clearly."""

from __future__ import annotations

import json

import pytest
from test_cli import run_main

from safetylab import cli
from safetylab.robust.data import load_classifier


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
    assert (out / "plots" / "robust_accuracy.png").is_file()
    assert "| model | eps | clean | fgsm | pgd | ensemble |" in (out / "tables.md").read_text()
    assert "tables:" in stdout
