"""The verification study and ``safetylab verify …``: the sections' numbers keep the order soundness
demands (a certificate never beats an attack, exact verification never trails CROWN), the commands
write run directories, and bad options fail clearly."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_cli import run_main

from safetylab.core.study import run_study
from safetylab.models.classifier import ClassifierTrainConfig, load_classifier
from safetylab.verify.study import QUICK, STAGES
from safetylab.verify.training import certified_config

TINY = replace(
    QUICK,
    trainings=("standard", "ibp"), standard=ClassifierTrainConfig(epochs=3),
    ibp=certified_config("ibp", eps=0.05, epochs=10, warmup_epochs=1, ramp_epochs=5),
    eps=(0.0, 0.03, 0.08), examples=16, exact_time_limit=0.2, attack_steps=10, alpha_iterations=5,
    sigmas=(0.25,), smooth_epochs=3, smooth_examples=8, smooth_n=300, radii=(0.0, 0.25, 0.5),
)


def ordered(*shares: float) -> bool:
    return all(a <= b + 1e-6 for a, b in zip(shares, shares[1:]))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "study"
    sections = run_study(STAGES, TINY, out, log=lambda line: None)
    return out, {name: section.to_dict() for name, section in sections.items()}


def test_certified_accuracy_respects_soundness(study):
    out, sections = study
    rows = sections["certify"]["data"]["rows"]
    assert [(r["model"], r["eps"]) for r in rows] == [(m, e) for m in ("standard", "ibp") for e in TINY.eps]
    for r in rows:
        # every certificate is an under-estimate of robust accuracy, which PGD over-estimates
        assert ordered(r["crown"], r["alpha-crown"], r["exact"] + r["exact unknown"], r["pgd"], r["clean"]), r
        assert ordered(r["ibp"], r["exact"]) and ordered(r["crown"], r["exact"])  # exact tries CROWN's bound first
        if r["exact unknown"] == 0:  # no digit ran out of time: exact verification is complete
            assert ordered(r["alpha-crown"], r["exact"]), r
        if r["eps"] == 0:  # at ε = 0 every correct digit is certified
            assert r["ibp"] == r["crown"] == pytest.approx(r["exact"]) == pytest.approx(r["clean"])
    standard, ibp = ([r for r in rows if r["model"] == m and r["eps"] == 0.03][0] for m in ("standard", "ibp"))
    assert ibp["ibp"] > 0.5 > standard["ibp"]  # IBP training makes IBP certificates possible
    assert sections["certify"]["plots"] == ["certify/certified_accuracy.png"]
    assert (out / sections["certify"]["plots"][0]).stat().st_size > 0


def test_bounds_and_smoothing_sections(study):
    out, sections = study
    bounds = sections["bounds"]["data"]["rows"]
    for model in ("standard", "ibp"):
        width = {r["method"]: r["width"] for r in bounds if r["model"] == model}
        assert width["alpha-crown"] <= width["crown"] + 1e-6
    curves = sections["smooth"]["data"]["curves"]
    assert set(curves) == {"smoothing σ=0.25", "CROWN (standard network)"}
    for values in curves.values():
        assert values == sorted(values, reverse=True) and 0 <= values[-1] <= values[0] <= 1
    assert json.loads((out / "sections.json").read_text()) == sections
    for name in ("bounds", "certify", "smooth"):
        assert json.loads((out / name / "section.json").read_text()) == sections[name]
    assert {p.name for p in (out / "artifacts" / "models").iterdir()} == {"standard", "ibp", "noise-0.25"}
    assert json.loads((out / "config.json").read_text())["ibp"]["method"] == "ibp"


def test_verify_commands(tmp_path, monkeypatch, capsys):
    out = tmp_path / "train"
    code, stdout, err = run_main(monkeypatch, capsys, "verify", "train", "--method", "ibp", "--epochs", "3",
                                 "--eps", "0.05", "--out", str(out))
    assert code == 0, err
    assert "clean test accuracy" in stdout and "certified at eps 0.05: IBP" in stdout
    model, spec = load_classifier(out)
    assert spec == {"arch": "mlp", "num_classes": 8, "hidden": 64} and not model.training
    bounds = tmp_path / "bounds"
    code, stdout, err = run_main(monkeypatch, capsys, "verify", "bounds", "--model", str(out), "--eps", "0.02",
                                 "--out", str(bounds))
    assert code == 0, err
    rows = json.loads((bounds / "sections.json").read_text())["bounds"]["data"]["rows"]
    assert [r["method"] for r in rows] == ["ibp", "crown", "alpha-crown"]
    assert "| given model | crown |" in (bounds / "tables.md").read_text()


def test_the_study_config_round_trips_through_a_file_and_checks_names():
    from safetylab.core.config import config_from_dict, config_to_dict
    from safetylab.core.errors import SafetylabError
    from safetylab.verify.study import VerifyStudyConfig

    assert config_from_dict(VerifyStudyConfig, config_to_dict(QUICK)) == QUICK  # as the audit's --config reads it
    with pytest.raises(SafetylabError, match="trainings: expected one or more of standard, pgd, ibp, crown-ibp"):
        VerifyStudyConfig(trainings=("trades",))
    with pytest.raises(SafetylabError, match="crown_ibp: expected a config with method crown-ibp"):
        VerifyStudyConfig(crown_ibp=certified_config("ibp"))
