"""Core: atomic writes, strict JSONL, typed configs, run directories, seeding and devices."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from safetylab.core import (
    RunDir,
    SafetylabError,
    atomic_write_text,
    config_from_dict,
    config_to_dict,
    jsonl_lines,
    load_config,
    read_config_file,
    read_jsonl,
    seed_everything,
    select_device,
    write_jsonl,
)
from safetylab.core import io as core_io


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write_text_creates_parents_and_overwrites(tmp_path):
    target = tmp_path / "a" / "b" / "note.txt"
    atomic_write_text(target, "first ünïcode\n")
    assert target.read_text(encoding="utf-8") == "first ünïcode\n"
    atomic_write_text(target, "second")
    assert target.read_text(encoding="utf-8") == "second"
    # no temporary file is left next to the target
    assert sorted(p.name for p in target.parent.iterdir()) == ["note.txt"]


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.txt"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(core_io.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


# ----------------------------------------------------------------------------- JSONL
def test_jsonl_round_trip(tmp_path):
    records = [
        {"prompt": "what is 2 plus 2 ?", "n": 1, "x": 0.5, "nested": {"a": [1, 2]}, "none": None},
        {"prompt": "ünïcode and \"quotes\"\nnewline", "n": 2},
        {},
    ]
    path = tmp_path / "data.jsonl"
    assert write_jsonl(path, records) == 3
    assert list(read_jsonl(path)) == records
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3


def test_write_jsonl_empty_and_generator(tmp_path):
    path = tmp_path / "empty.jsonl"
    assert write_jsonl(path, iter([])) == 0
    assert path.read_text() == ""
    assert list(read_jsonl(path)) == []
    assert write_jsonl(path, ({"i": i} for i in range(4))) == 4
    assert [r["i"] for r in read_jsonl(path)] == [0, 1, 2, 3]


def test_write_jsonl_rejects_nan_without_touching_the_file(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"a": 1}])
    with pytest.raises(ValueError):
        write_jsonl(path, [{"a": 2}, {"a": float("nan")}])
    assert list(read_jsonl(path)) == [{"a": 1}]


def _bad_jsonl(tmp_path: Path, bad_line: str, name: str = "bad.jsonl") -> Path:
    path = tmp_path / name
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n' + bad_line + '\n{"prompt": "d"}\n', encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "bad_line, words",
    [
        ("", "empty line"),
        ("   ", "empty line"),
        ('{"prompt": "c"', "malformed JSON"),
        ("not json at all", "malformed JSON"),
        ("[1, 2, 3]", "expected a JSON object"),
        ('"just a string"', "expected a JSON object"),
        ("42", "expected a JSON object"),
    ],
)
def test_read_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, words):
    path = _bad_jsonl(tmp_path, bad_line)
    with pytest.raises(SafetylabError) as info:
        list(read_jsonl(path))
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message
    assert words in message


def test_blank_lines_at_the_end_of_a_jsonl_file_are_no_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n\n  \n', encoding="utf-8")
    assert list(read_jsonl(path)) == [{"a": 1}, {"a": 2}]


def test_jsonl_lines_names_every_bad_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a"}\n\n{oops\n{"prompt": 3}\n[1]\n{"prompt": "b"}\n', encoding="utf-8")
    lines = list(jsonl_lines(path, required=("prompt",)))
    assert [(line.number, line.problem is None) for line in lines] == [
        (1, True), (2, False), (3, False), (4, False), (5, False), (6, True)]
    assert "empty line" in lines[1].problem and "malformed JSON" in lines[2].problem
    assert "'prompt'" in lines[3].problem and "JSON object" in lines[4].problem


def test_read_jsonl_yields_good_lines_before_the_bad_one(tmp_path):
    path = _bad_jsonl(tmp_path, "{oops")
    seen = []
    with pytest.raises(SafetylabError):
        for record in read_jsonl(path):
            seen.append(record["prompt"])
    assert seen == ["a", "b"]


@pytest.mark.parametrize("bad_line", ['{"other": "c"}', '{"prompt": 3}', '{"prompt": null}'])
def test_read_jsonl_required_field(tmp_path, bad_line):
    path = _bad_jsonl(tmp_path, bad_line)
    # without the requirement the file reads fine
    assert len(list(read_jsonl(path))) == 4
    with pytest.raises(SafetylabError) as info:
        list(read_jsonl(path, required=["prompt"]))
    message = str(info.value)
    assert str(path) in message and "line 3" in message and "'prompt'" in message


def test_read_jsonl_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(SafetylabError, match="nope.jsonl"):
        list(read_jsonl(path))


# ----------------------------------------------------------------------------- configs
@dataclass
class Optim:
    lr: float = 0.001
    steps: int = 10


@dataclass
class Experiment:
    name: str = "run"
    mode: Literal["sft", "dpo"] = "sft"
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    seed: int | None = None
    verbose: bool = False


def test_config_from_dict_defaults_and_nested():
    config = config_from_dict(Experiment, {})
    assert config == Experiment()
    config = config_from_dict(
        Experiment,
        {"name": "x", "mode": "dpo", "optim": {"lr": 0.5}, "tags": ["a", "b"], "seed": 3, "verbose": True},
    )
    assert isinstance(config.optim, Optim)
    assert config.optim == Optim(lr=0.5, steps=10)
    assert (config.name, config.mode, config.tags, config.seed, config.verbose) == ("x", "dpo", ["a", "b"], 3, True)


def test_config_round_trip_through_dict():
    config = Experiment(name="y", mode="dpo", optim=Optim(0.1, 7), tags=["t"], seed=None)
    data = config_to_dict(config)
    assert data["optim"] == {"lr": 0.1, "steps": 7}
    assert json.loads(json.dumps(data)) == data
    assert config_from_dict(Experiment, data) == config


def test_config_int_is_accepted_for_float():
    config = config_from_dict(Experiment, {"optim": {"lr": 1}})
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)


def test_config_unknown_key_names_it_and_the_expected_ones():
    with pytest.raises(SafetylabError) as info:
        config_from_dict(Experiment, {"nmae": "x"})
    message = str(info.value)
    assert "'nmae'" in message
    for name in ("mode", "name", "optim", "seed", "tags", "verbose"):
        assert name in message


def test_config_unknown_nested_key_names_the_dotted_path():
    with pytest.raises(SafetylabError) as info:
        config_from_dict(Experiment, {"optim": {"lr": 0.1, "momentum": 0.9}})
    message = str(info.value)
    assert "config.optim" in message and "'momentum'" in message and "lr" in message and "steps" in message


@pytest.mark.parametrize(
    "data, where",
    [
        ({"optim": {"steps": "ten"}}, "config.optim.steps"),
        ({"optim": {"steps": 1.5}}, "config.optim.steps"),
        ({"optim": {"steps": True}}, "config.optim.steps"),
        ({"optim": {"lr": "fast"}}, "config.optim.lr"),
        ({"name": 3}, "config.name"),
        ({"verbose": "yes"}, "config.verbose"),
        ({"seed": "zero"}, "config.seed"),
        ({"tags": "abc"}, "config.tags"),
        ({"tags": ["a", 1]}, "config.tags[1]"),
        ({"optim": 5}, "config.optim"),
    ],
)
def test_config_wrong_type_names_the_dotted_field(data, where):
    with pytest.raises(SafetylabError) as info:
        config_from_dict(Experiment, data)
    assert str(info.value).startswith(where + ":")


def test_config_literal():
    assert config_from_dict(Experiment, {"mode": "dpo"}).mode == "dpo"
    with pytest.raises(SafetylabError) as info:
        config_from_dict(Experiment, {"mode": "ppo"})
    message = str(info.value)
    assert "config.mode" in message and "'ppo'" in message and "'sft'" in message and "'dpo'" in message


def test_config_optional_accepts_none():
    assert config_from_dict(Experiment, {"seed": None}).seed is None
    assert config_from_dict(Experiment, {"seed": 4}).seed == 4


def test_config_from_dict_rejects_a_non_mapping():
    with pytest.raises(SafetylabError, match="here: expected a mapping"):
        config_from_dict(Experiment, ["name"], where="here")


def test_read_config_file_yaml_json_and_empty(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("name: z\noptim:\n  lr: 0.2\n")
    assert read_config_file(yaml_file) == {"name": "z", "optim": {"lr": 0.2}}
    json_file = tmp_path / "c.json"
    json_file.write_text('{"name": "j", "tags": ["a"]}')
    assert read_config_file(json_file) == {"name": "j", "tags": ["a"]}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_config_file(empty) == {}


def test_read_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(SafetylabError, match="missing.yaml"):
        read_config_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(SafetylabError, match="broken.yaml"):
        read_config_file(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SafetylabError, match="list.yaml.*mapping"):
        read_config_file(listy)


def test_load_config_layers_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: from-file\nmode: dpo\noptim:\n  steps: 5\n")
    assert load_config(Experiment) == Experiment()
    config = load_config(Experiment, path, name="override", seed=None)
    assert config.name == "override"  # an override beats the file
    assert config.mode == "dpo"  # the file beats the default
    assert config.optim == Optim(lr=0.001, steps=5)
    assert config.seed is None  # a None override is skipped
    assert load_config(Experiment, None, seed=7).seed == 7


def test_load_config_errors_name_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  steps: many\n")
    with pytest.raises(SafetylabError) as info:
        load_config(Experiment, path)
    message = str(info.value)
    assert message.startswith(f"{path}.optim.steps:")
    path.write_text("colour: red\n")
    with pytest.raises(SafetylabError, match="'colour'"):
        load_config(Experiment, path)


# ----------------------------------------------------------------------------- run directories
CONFIG = {"seed": 1, "model": {"layers": 2, "width": 32}, "name": "demo"}


def test_run_dir_writes_config_and_layout(tmp_path):
    run = RunDir(tmp_path / "run", CONFIG)
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == CONFIG
    for sub in ("checkpoints", "artifacts", "plots"):
        assert (tmp_path / "run" / sub).is_dir()
    assert run.artifacts == tmp_path / "run" / "artifacts"
    assert run.plots == tmp_path / "run" / "plots"
    written = run.write_json("summary.json", {"a": 1})
    assert json.loads(written.read_text()) == {"a": 1}


def test_run_dir_reopens_with_same_config(tmp_path):
    run = RunDir(tmp_path / "run", CONFIG)
    run.log(1, loss=1.0)
    again = RunDir(tmp_path / "run", json.loads(json.dumps(CONFIG)))
    assert again.metrics() == [{"step": 1, "loss": 1.0}]


@pytest.mark.parametrize(
    "change, field_name",
    [
        ({"seed": 2}, "seed"),
        ({"model": {"layers": 3, "width": 32}}, "model.layers"),
        ({"model": {"layers": 2}}, "model.width"),
        ({"extra": True}, "extra"),
    ],
)
def test_run_dir_rejects_a_different_config(tmp_path, change, field_name):
    RunDir(tmp_path / "run", CONFIG).log(0, loss=1.0)
    with pytest.raises(SafetylabError) as info:
        RunDir(tmp_path / "run", {**CONFIG, **change})
    message = str(info.value)
    assert str(tmp_path / "run") in message
    assert field_name in message
    # the saved config is untouched
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == CONFIG


def test_a_run_dir_without_results_takes_a_new_config(tmp_path):
    """A run that failed before its first result (say, on a bad option) leaves only its config; the
    corrected rerun reuses the directory. A nested run's config alone is no result either."""
    RunDir(tmp_path / "run", CONFIG)
    RunDir(tmp_path / "run" / "members" / "0", CONFIG)
    again = RunDir(tmp_path / "run", {**CONFIG, "seed": 2})
    assert json.loads((again.path / "config.json").read_text())["seed"] == 2
    (again.path / "artifacts" / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(SafetylabError, match="different config"):
        RunDir(tmp_path / "run", CONFIG)


def test_run_dir_corrupt_config(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(SafetylabError, match="config.json"):
        RunDir(tmp_path / "run", CONFIG)


def test_run_dir_log_and_metrics(tmp_path):
    run = RunDir(tmp_path, CONFIG)
    assert run.metrics() == []
    record = run.log(0, loss=2.5, split="train")
    assert record == {"step": 0, "loss": 2.5, "split": "train"}
    run.log(10, loss=1.25, extra={"acc": 0.5})
    assert run.metrics() == [
        {"step": 0, "loss": 2.5, "split": "train"},
        {"step": 10, "loss": 1.25, "extra": {"acc": 0.5}},
    ]
    run.truncate_metrics(lambda r: r["step"] < 5)
    assert run.metrics() == [{"step": 0, "loss": 2.5, "split": "train"}]


def test_run_dir_log_rejects_nan(tmp_path):
    run = RunDir(tmp_path, CONFIG)
    with pytest.raises(ValueError):
        run.log(1, loss=float("nan"))


def test_metrics_torn_last_line_is_ignored(tmp_path):
    run = RunDir(tmp_path, CONFIG)
    run.log(1, loss=1.0)
    run.log(2, loss=0.5)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # an interrupted append
    assert run.metrics() == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_metrics_torn_middle_line_raises(tmp_path):
    run = RunDir(tmp_path, CONFIG)
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(SafetylabError) as info:
        run.metrics()
    assert str(path) in str(info.value) and "line 2" in str(info.value)


def _writer(text: str):
    def write(directory: Path) -> None:
        (directory / "state.txt").write_text(text)

    return write


def test_save_checkpoint_and_latest(tmp_path):
    run = RunDir(tmp_path, CONFIG)
    assert run.latest_checkpoint() is None
    final = run.save_checkpoint(5, _writer("five"))
    assert final == run.checkpoint_dir(5) and final.name == "step-000005"
    assert (final / "state.txt").read_text() == "five"
    assert run.latest_checkpoint() == (5, final)
    final = run.save_checkpoint(12, _writer("twelve"))
    assert run.latest_checkpoint() == (12, final)
    # saving a step again replaces it
    run.save_checkpoint(12, _writer("twelve again"))
    assert (run.checkpoint_dir(12) / "state.txt").read_text() == "twelve again"
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_interrupted_checkpoint_is_never_latest(tmp_path):
    run = RunDir(tmp_path, CONFIG)
    run.save_checkpoint(1, _writer("one"))

    def crash(directory: Path) -> None:
        (directory / "state.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(2, crash)
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert ".tmp-step-000002" in leftovers
    assert run.latest_checkpoint() == (1, run.checkpoint_dir(1))
    # a stray temporary directory with a larger step is ignored too
    (tmp_path / "checkpoints" / ".tmp-step-000099").mkdir()
    assert run.latest_checkpoint()[0] == 1
    # retrying the step clears the leftover and completes it
    run.save_checkpoint(2, _writer("two"))
    assert run.latest_checkpoint() == (2, run.checkpoint_dir(2))
    assert (run.checkpoint_dir(2) / "state.txt").read_text() == "two"
    assert ".tmp-step-000002" not in [p.name for p in (tmp_path / "checkpoints").iterdir()]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_old_checkpoints_are_pruned(tmp_path, keep):
    run = RunDir(tmp_path, CONFIG)
    for step in (10, 20, 30, 40, 50):
        run.save_checkpoint(step, _writer(str(step)), keep=keep)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    expected = [f"step-{s:06d}" for s in (10, 20, 30, 40, 50)][-keep:]
    assert names == expected
    assert run.latest_checkpoint()[0] == 50


# ----------------------------------------------------------------------------- seeding, devices
@pytest.fixture
def restore_determinism():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_seed_everything_repeats(restore_determinism):
    seed_everything(123)
    first = (torch.rand(5), random.random(), np.random.rand(3))
    seed_everything(123)
    second = (torch.rand(5), random.random(), np.random.rand(3))
    assert torch.equal(first[0], second[0])
    assert first[1] == second[1]
    assert np.array_equal(first[2], second[2])
    seed_everything(124)
    assert not torch.equal(torch.rand(5), first[0])


def test_seed_everything_returns_a_seeded_generator(restore_determinism):
    g1 = seed_everything(7)
    a = torch.rand(4, generator=g1)
    g2 = seed_everything(7)
    b = torch.rand(4, generator=g2)
    assert isinstance(g1, torch.Generator)
    assert torch.equal(a, b)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(SafetylabError) as info:
        select_device("tpu")
    message = str(info.value)
    assert "'tpu'" in message and "cpu" in message and "cuda" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_select_device_unavailable_cuda():
    with pytest.raises(SafetylabError, match="cuda:0"):
        select_device("cuda:0")


def test_atomic_write_does_not_depend_on_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic_write_text("relative.txt", "x")
    assert (tmp_path / "relative.txt").read_text() == "x"
    assert os.listdir(tmp_path) == ["relative.txt"]


def test_logging_after_a_torn_line_keeps_the_new_record(tmp_path):
    run = RunDir(tmp_path / "run", {"a": 1})
    run.log(1, loss=1.0)
    with (run.path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')  # an append cut short
    reopened = RunDir(tmp_path / "run", {"a": 1})
    reopened.log(2, loss=0.5)
    assert [r["step"] for r in reopened.metrics()] == [1, 2]
