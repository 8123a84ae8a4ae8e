"""``safetylab agents run|suite``: the run directory, the table, and clear errors for bad names."""

from __future__ import annotations

import json

import pytest
from test_cli import run_main


def test_agents_run_writes_records_table_curves_and_strips(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_main(monkeypatch, capsys, "agents", "run", "--env", "IslandNavigation", "--mitigation",
                                 "shield", "--episodes", "300", "--seeds", "0,1", "--out", str(out))
    assert code == 0, err
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 1]
    assert all(r["mitigation"] == "shield" and r["unsafe"] == 0 for r in records)  # never in the water
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["seeds"] == 2 and summary[0]["eval_return"] == pytest.approx(46)
    assert "| IslandNavigation | q-learning | shield |" in (out / "table.md").read_text() in stdout
    for name in ("IslandNavigation-curves.png", "IslandNavigation-q-learning-shield.png",
                 "IslandNavigation-q-learning-shield.gif"):
        assert (out / "plots" / name).stat().st_size > 0


def test_agents_suite_covers_every_agent_and_mitigation(tmp_path, monkeypatch, capsys):
    out = tmp_path / "suite"
    code, _, err = run_main(monkeypatch, capsys, "agents", "suite", "--env", "GoalMisgeneralization", "--env",
                            "WhiskyGold", "--episodes", "200", "--seeds", "0", "--out", str(out))
    assert code == 0, err
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["environment"], r["agent"], r["mitigation"]) for r in rows] == [
        ("GoalMisgeneralization", "q-learning", "none"), ("GoalMisgeneralization", "q-learning", "goal-diversity"),
        ("GoalMisgeneralization", "sarsa", "none"), ("GoalMisgeneralization", "sarsa", "goal-diversity"),
        ("WhiskyGold", "q-learning", "none"), ("WhiskyGold", "sarsa", "none")]


@pytest.mark.parametrize("args,message", [
    (["--env", "Pong"], "environment must be one of SafeInterruptibility"),
    (["--env", "BoatRace", "--agent", "a2c"], "--agent: expected one of q-learning, sarsa, ppo, dqn, got 'a2c'"),
    (["--env", "BoatRace", "--mitigation", "shield"], "applies to IslandNavigation, not to BoatRace"),
    (["--env", "BoatRace", "--agent", "ppo", "--mitigation", "preferences"], "works with the tabular agents"),
    (["--env", "BoatRace", "--seeds", "a"], "--seeds: expected comma-separated integers"),
    (["--env", "BoatRace", "--seeds", "0,-1"], "--seeds: expected one or more distinct integers >= 0"),
    (["--env", "BoatRace", "--episodes", "0"], "--episodes: expected an integer >= 1"),
    (["--env", "BoatRace", "--agent", "ppo", "--timesteps", "0"], "--timesteps: expected an integer >= 1"),
])
def test_bad_options_fail_clearly_before_any_file_is_written(tmp_path, monkeypatch, capsys, args, message):
    code, _, err = run_main(monkeypatch, capsys, "agents", "run", *args, "--out", str(tmp_path / "run"))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_learning_curves_average_seeds_of_different_lengths(tmp_path):
    from PIL import Image

    from safetylab.agents.experiment import plot_learning_curves

    runs = [[{"return": float(i), "performance": 0.0} for i in range(n)] for n in (120, 95)]  # deep agents' seeds
    path = plot_learning_curves({"ppo": runs}, tmp_path / "curves.png", "BoatRace", window=10)
    assert Image.open(path).size[0] > 100


def test_the_suite_gives_the_same_records_in_worker_processes(tmp_path):
    from safetylab.agents.experiment import run_suite, suite_runs
    from safetylab.core.runs import RunDir

    runs = suite_runs()[:3]
    for workers in (1, 2):
        run_suite(RunDir(tmp_path / str(workers), {"workers": workers}), runs, [0, 1], 30, workers=workers)
    one, two = ((tmp_path / w / "records.jsonl").read_text() for w in ("1", "2"))
    assert one == two and len(one.splitlines()) == 6
    assert sorted(p.name for p in (tmp_path / "2" / "plots").glob("*.gif")) == \
        sorted(p.name for p in (tmp_path / "1" / "plots").glob("*.gif"))
