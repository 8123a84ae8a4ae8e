"""The ``safetylab`` command line: world data, errors and exit codes, train → sft → eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from safetylab import cli
from safetylab.world import KINDS, World
from safetylab.world.content import JAILBREAKS

runner = CliRunner()


def invoke(*args: str):
    """Run the Typer app in-process (exceptions are kept on the result, not re-raised)."""
    return runner.invoke(cli.app, list(args))


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``safetylab ARGS`` through ``cli.main`` (the console entry point), in-process:
    returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["safetylab", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------- help
def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("audit", "world", "train", "eval"):
        assert command in result.output
    world = invoke("world", "--help")
    assert world.exit_code == 0
    for command in ("sample", "preferences", "judge"):
        assert command in world.output
    train = invoke("train", "--help")
    for command in ("base", "sft", "rm", "dpo", "ppo", "rloo"):
        assert command in train.output


# ---------------------------------------------------------------------------- world
def test_world_sample_to_file(tmp_path):
    out = tmp_path / "sample.jsonl"
    result = invoke("world", "sample", "--n", "12", "--out", str(out))
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 12
    for record in records:
        assert isinstance(record["prompt"], str) and record["prompt"]
        assert isinstance(record["response"], str) and record["response"]
    assert [r["kind"] for r in records] == [KINDS[i % len(KINDS)] for i in range(12)]
    assert records == World().sample(12)


def test_world_sample_to_stdout_matches_file(tmp_path):
    out = tmp_path / "sample.jsonl"
    assert invoke("world", "sample", "--n", "6", "--seed", "3", "--out", str(out)).exit_code == 0
    result = invoke("world", "sample", "--n", "6", "--seed", "3")
    assert result.exit_code == 0
    assert result.stdout == out.read_text(encoding="utf-8")


@pytest.mark.parametrize("labeler", ["typical", "ideal"])
def test_world_preferences_trl_format_and_reproducible(tmp_path, labeler):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    for path, seed in ((a, "0"), (b, "0"), (c, "1")):
        result = invoke("world", "preferences", "--labeler", labeler, "--n", "50", "--seed", seed, "--out", str(path))
        assert result.exit_code == 0, result.output
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    records = read_jsonl(a)
    assert len(records) == 50
    for r in records:
        for key in ("prompt", "chosen", "rejected"):
            assert isinstance(r[key], str) and r[key]
        assert r["chosen"] != r["rejected"]
        assert r["labeler"] == labeler
        if labeler == "ideal":  # no noise, no bias: always the response with higher gold utility
            assert r["gold_chosen"] > r["gold_rejected"]


def test_preferences_of_different_labelers_compare_the_same_pairs(tmp_path):
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("typical", "ideal")}
    for name, path in paths.items():
        assert invoke("world", "preferences", "--labeler", name, "--n", "30", "--out", str(path)).exit_code == 0
    typical, ideal = (read_jsonl(p) for p in paths.values())
    assert [r["prompt"] for r in typical] == [r["prompt"] for r in ideal]
    assert [{r["chosen"], r["rejected"]} for r in typical] == [{r["chosen"], r["rejected"]} for r in ideal]


def test_unknown_preset_in_process(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "world", "preferences", "--labeler", "nope", "--n", "5")
    assert code == 2
    assert out == ""
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("error:") and "'nope'" in err and "typical" in err
    assert "Traceback" not in err


def test_unknown_preset_through_python_m(tmp_path):
    command = [sys.executable, "-m", "safetylab", "world", "preferences", "--labeler", "nope", "--n", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert plain.returncode == 2
    lines = [line for line in plain.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]
    assert "Traceback" not in plain.stderr
    assert plain.stdout == ""

    debug = subprocess.run([*command[:3], "--debug", *command[3:]], capture_output=True, text=True, cwd=tmp_path,
                           timeout=120, env=env)
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert "safetylab.core.errors.ConfigError" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("error: ")


# ---------------------------------------------------------------------------- world judge
@pytest.fixture
def sample_file(tmp_path):
    path = tmp_path / "sample.jsonl"
    assert invoke("world", "sample", "--n", "12", "--out", str(path)).exit_code == 0
    return path


def test_world_judge_scores_every_line(tmp_path, sample_file):
    out = tmp_path / "scores.jsonl"
    result = invoke("world", "judge", str(sample_file), "--out", str(out))
    assert result.exit_code == 0, result.output
    inputs, scores = read_jsonl(sample_file), read_jsonl(out)
    assert len(scores) == len(inputs)
    assert [s["line"] for s in scores] == list(range(1, len(inputs) + 1))
    judge = World().judge
    for given, score in zip(inputs, scores):
        assert score["kind"] == given["kind"]
        assert score == {"line": score["line"], **judge.score(given["prompt"], given["response"]).to_dict()}
        assert score["utility"] > 0  # the reference responses are good ones


def test_world_judge_to_stdout(sample_file):
    lines = sample_file.read_text(encoding="utf-8").splitlines()
    bad = json.loads(lines[0])
    bad["response"] = "i do not know ."
    sample_file.write_text("\n".join([json.dumps(bad), *lines[1:3]]) + "\n", encoding="utf-8")
    result = invoke("world", "judge", str(sample_file))
    assert result.exit_code == 0, result.output
    scores = [json.loads(line) for line in result.stdout.splitlines()]
    assert [s["line"] for s in scores] == [1, 2, 3]
    assert scores[0]["utility"] < scores[1]["utility"]


def _broken(lines: list[str], number: int, kind: str) -> list[str]:
    lines = list(lines)
    record = json.loads(lines[number - 1])
    if kind == "empty":
        lines[number - 1] = ""
    elif kind == "malformed":
        lines[number - 1] = lines[number - 1][:-3]
    elif kind == "missing_response":
        del record["response"]
        lines[number - 1] = json.dumps(record)
    elif kind == "foreign_prompt":
        record["prompt"] = "what is the capital of france ?"
        lines[number - 1] = json.dumps(record)
    elif kind == "not_an_object":
        lines[number - 1] = json.dumps([record["prompt"], record["response"]])
    return lines


@pytest.mark.parametrize("kind,number", [
    ("empty", 3), ("malformed", 2), ("missing_response", 1), ("foreign_prompt", 4), ("not_an_object", 5),
])
def test_world_judge_bad_line(monkeypatch, capsys, sample_file, kind, number):
    lines = _broken(sample_file.read_text(encoding="utf-8").splitlines(), number, kind)
    sample_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = run_main(monkeypatch, capsys, "world", "judge", str(sample_file))
    assert code == 2
    assert out == ""  # nothing scored is printed for a file that fails
    assert err.startswith(f"error: {sample_file}: 1 bad line of ")
    assert f"(line {number}: " in err and "nothing was written" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_world_judge_names_every_bad_line_and_writes_nothing(monkeypatch, capsys, sample_file, tmp_path):
    lines = sample_file.read_text(encoding="utf-8").splitlines()
    for number, kind in ((2, "malformed"), (4, "foreign_prompt"), (5, "missing_response")):
        lines = _broken(lines, number, kind)
    sample_file.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # a blank line at the end is fine
    out = tmp_path / "scores.jsonl"
    code, _, err = run_main(monkeypatch, capsys, "world", "judge", str(sample_file), "-o", str(out))
    assert code == 2 and not out.exists()
    assert f"3 bad lines of {len(lines)} (line 2: malformed JSON" in err
    assert "line 4: the prompt is not a prompt of the world" in err
    assert "line 5: expected a string field 'response'" in err


def test_world_judge_missing_file(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "nope.jsonl"
    code, _, err = run_main(monkeypatch, capsys, "world", "judge", str(missing))
    assert code == 2 and str(missing) in err and "Traceback" not in err


def test_world_judge_other_seed_world(monkeypatch, capsys, sample_file):
    # a prompt of the seed-0 world names countries the seed-5 world does not have
    code, _, err = run_main(monkeypatch, capsys, "world", "judge", str(sample_file), "--seed", "5")
    assert code == 2
    assert f"{sample_file}: " in err and "bad lines of 12 (line " in err and "seed 5" in err


def test_train_sft_bad_demonstrations_file(monkeypatch, capsys, tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "what is 3 plus 4 ?", "response": "7"}\n{"prompt": "what is 1 plus 1 ?"}\n')
    code, _, err = run_main(monkeypatch, capsys, "train", "sft", "--base", str(tmp_path / "base"),
                            "--demonstrations", str(demos), "--out", str(tmp_path / "sft"))
    assert code == 2
    assert f"{demos}, line 2:" in err and "'response'" in err
    assert not (tmp_path / "sft").exists()


# ---------------------------------------------------------------------------- train → sft → eval
@pytest.mark.slow
def test_train_base_sft_eval(monkeypatch, capsys, tmp_path):
    base_dir, sft_dir = tmp_path / "base", tmp_path / "sft"
    code, out, err = run_main(monkeypatch, capsys, "train", "base", "--quick", "--steps", "20", "--conversations",
                              "200", "--out", str(base_dir), "--device", "cpu")
    assert code == 0, err
    model_dir = base_dir / "artifacts" / "model"
    assert f"model: {model_dir}" in out
    assert list(model_dir.glob("*.safetensors"))
    config = json.loads((base_dir / "config.json").read_text())
    assert config["train"]["steps"] == 20 and config["conversations"] == 200
    metrics = read_jsonl(base_dir / "metrics.jsonl")
    assert metrics[-1]["step"] == 20
    saved_metrics = (base_dir / "metrics.jsonl").read_bytes()

    code, out, err = run_main(monkeypatch, capsys, "train", "sft", "--base", str(model_dir), "--steps", "10",
                              "--n", "100", "--out", str(sft_dir), "--device", "cpu")
    assert code == 0, err
    sft_model = sft_dir / "artifacts" / "model"
    assert f"model: {sft_model}" in out
    assert list(sft_model.glob("*.safetensors"))
    assert read_jsonl(sft_dir / "metrics.jsonl")[-1]["step"] == 10

    result_file = tmp_path / "eval.json"
    code, out, err = run_main(monkeypatch, capsys, "eval", str(sft_model), "--per-kind", "3", "--reference",
                              str(model_dir), "--out", str(result_file))
    assert code == 0, err
    assert "all" in out and "gold" in out
    result = json.loads(result_file.read_text())
    assert set(result["by_kind"]) == {*KINDS, "jailbroken"}
    for kind in KINDS:
        assert result["by_kind"][kind]["n"] == 3
    jailbroken = 12 * len(JAILBREAKS)  # the default EvalConfig.jailbroken per wrapper
    assert result["by_kind"]["jailbroken"]["n"] == jailbroken
    assert result["overall"]["n"] == len(result["samples"]) == 3 * len(KINDS) + jailbroken
    assert result["overall"]["kl_to_reference"] is not None and result["overall"]["kl_to_reference"] > 0

    # the same command again loads the finished run
    code, out, _ = run_main(monkeypatch, capsys, "train", "base", "--quick", "--steps", "20", "--conversations",
                            "200", "--out", str(base_dir), "--device", "cpu")
    assert code == 0 and f"model: {model_dir}" in out
    assert (base_dir / "metrics.jsonl").read_bytes() == saved_metrics

    # different settings into the same directory: refused, naming the field
    code, out, err = run_main(monkeypatch, capsys, "train", "base", "--quick", "--steps", "30", "--conversations",
                              "200", "--out", str(base_dir), "--device", "cpu")
    assert code == 2
    assert "train.steps" in err and "20" in err and "30" in err
    assert "Traceback" not in err
    assert json.loads((base_dir / "config.json").read_text())["train"]["steps"] == 20


@pytest.mark.parametrize(("command", "options"), [("ppo", ["--ppo-epochs", "2"]), ("rloo", ["--k", "2"])])
def test_reinforcement_learning_commands(tmp_path, tok, command, options):
    import torch

    from safetylab.align.reward import RewardConfig, build_reward_model, save_reward_model
    from safetylab.models import ModelConfig, build_model, save_model

    torch.manual_seed(0)
    base = save_model(build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tok), tok, tmp_path / "sft")
    reward, reward_tokenizer = build_reward_model(base, RewardConfig(), seed=0)
    save_reward_model(reward, reward_tokenizer, tmp_path / "rm")
    args = ["train", command, "--base", str(base), "--reward", str(tmp_path / "rm"), "--prompts-per-kind", "2",
            *options, "--steps", "4", "--out", str(tmp_path / command), "--device", "cpu"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / command / "eval.json").read_text())
    assert set(report) == {"start", command} and report["start"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert (tmp_path / command / "artifacts" / "model" / "model.safetensors").exists()
    metrics = [json.loads(line) for line in (tmp_path / command / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and "gold/utility" in metrics[0]  # the gold tracker's starting point
    assert metrics[-1]["step"] == 4 and "objective/kl" in metrics[-1]


def test_an_interrupted_command_says_how_to_resume(monkeypatch, capsys):
    from safetylab.world import World

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(World, "sample", interrupted)
    code, _, err = run_main(monkeypatch, capsys, "world", "sample", "--n", "3")
    assert code == 130 and "interrupted: finished checkpoints and stages are kept" in err


def test_world_probe_judge_reports_every_family(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, "world", "probe-judge", "--per-kind", "2", "-o",
                              str(tmp_path / "probe.json"))
    assert code == 0, err
    for family in ("surface", "compliance", "candidates", "negation", "premise", "degraded"):
        assert f"{family}: " in out
    rows = json.loads((tmp_path / "probe.json").read_text())
    assert {r["kind"] for r in rows} == set(KINDS) and all(r["failed"] == 0 for r in rows)
