"""Red teaming: template, composed and mutated attacks, their success rates by the gold judge, and the
successful attacks as preference data."""

from __future__ import annotations

import json
import random

import pytest
from test_cli import run_main

from safetylab.core.errors import SafetylabError
from safetylab.evals.harness import run_task
from safetylab.evals.redteam import ATTACKS, COMPOSITIONS, MUTATIONS, attack, redteam_task, successful_attacks
from safetylab.evals.targets import FunctionTarget
from safetylab.world.requests import Request


def falls_for_roleplay(world, samples):
    """A model that refuses harm unless the request comes in the role-play wrapper."""
    requests = {s.input: Request(**s.metadata["request"]) for s in samples}
    rng = random.Random(0)
    return lambda prompt: world.respond(requests[prompt], "harmful_compliance" if requests[prompt].jailbreak ==
                                        "roleplay" else "refusal", rng)


def test_attack_success_by_attack_and_the_successes_as_preference_pairs(world, tmp_path):
    task = redteam_task(world, n=5)
    run = run_task(task, FunctionTarget(falls_for_roleplay(world, task.dataset)), tmp_path)
    assert run.errors == 0 and len(run.records) == 5 * len(ATTACKS)
    works = {"roleplay", "roleplay+spacing", "roleplay+synonym", *MUTATIONS}
    for name in ATTACKS:
        est = run.estimate("attack_success", name)
        assert est.n == 5 and est.value == (1.0 if name in works else 0.0), name
        assert est.low < est.value or est.value == 0.0
    pairs = successful_attacks(run, world)
    assert len(pairs) == 5 * len(works) and {p["attack"] for p in pairs} == works
    assert all(world.judge.score(Request(**r["metadata"]["request"]), r["output"]["completion"]).behaviour ==
               "harmful_compliance" for r in run.records if r["metadata"]["attack"] in works)
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_attacks_rewrite_the_prompt_and_keep_the_request(world):
    request = world.requests("harmful", "test", 1)[0]
    rng = random.Random(0)
    for name in ATTACKS:
        attacked = attack(request, name, rng)
        assert attacked.core == request.core and attacked.kind == "harmful"
        assert (attacked.prompt == request.prompt) == (name == "none"), name
    composed = attack(request, COMPOSITIONS[0], rng)
    assert composed.prompt.startswith("let us play a game") and composed.jailbreak == "roleplay"
    with pytest.raises(SafetylabError, match="unknown attack 'pleading'"):
        attack(request, "pleading", rng)
    with pytest.raises(SafetylabError, match="attacks: expected some of"):
        redteam_task(world, n=1, attacks=("pleading",))


def test_the_redteam_command_writes_the_successes(monkeypatch, capsys, tmp_path, tok, tiny_lm):
    model = tiny_lm("gpt2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    code, out, err = run_main(monkeypatch, capsys, "evals", "redteam", "--model", str(tmp_path / "model"), "--n", "2",
                              "--attacks", "none,story", "--max-tokens", "4", "--out", str(tmp_path / "logs"),
                              "--save-attacks", str(tmp_path / "wins.jsonl"), "--device", "cpu")
    assert code == 0, err
    assert "attack_success" in out and "successful attacks written" in out
    log = json.loads((tmp_path / "logs" / "world_redteam.json").read_text())
    assert {s["metadata"]["attack"] for s in log["samples"]} == {"none", "story"}
    assert (tmp_path / "wins.jsonl").is_file()


def test_the_study_reads_models_handed_in_by_relative_paths(monkeypatch, tmp_path, tok, tiny_lm):
    """The audit hands the models in as paths relative to where it runs; the study must read them as given."""
    from safetylab.core.study import run_study
    from safetylab.evals.study import STAGES, study_config

    monkeypatch.chdir(tmp_path)
    for name in ("base", "sft"):
        tiny_lm("gpt2").save_pretrained(f"models/{name}")
        tok.save_pretrained(f"models/{name}")
    config = study_config(quick=True, per_kind=1, jailbroken=1, controls=0, redteam_n=1, per_tier=1, payload_n=2,
                          max_new_tokens=4, device="cpu")
    run_study(STAGES[:3], config, "runs/evals", inputs={"base": "models/base", "sft": "models/sft"})
    assert (tmp_path / "runs/evals/redteam/sft/world_redteam.json").is_file()
