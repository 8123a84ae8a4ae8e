"""DPO-family training on any HF causal LM: losses fall, weights move, references are used right."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from safetylab.align.data import preferences_from_records
from safetylab.align.dpo import LABEL_SMOOTHED, LOSSES, DPOConfig, reference_logps, sequence_logps, train_dpo
from safetylab.align.evaluate import EvalConfig, gold_tracker
from safetylab.core import ConfigError, RunDir, SafetylabError
from safetylab.models import logprobs
from safetylab.models.train import TrainConfig

TRAIN = TrainConfig(steps=12, batch_size=8, lr=5e-3, warmup_steps=1, max_length=64, log_every=4,
                    checkpoint_every=4, device="cpu")


@pytest.fixture(scope="module")
def rows(world):
    return preferences_from_records(world.preferences(32, "ideal")).rows


def test_sequence_logps_sum_the_response_tokens(tiny_lm, tok, rows):
    model = tiny_lm("gpt2").eval()
    with torch.no_grad():
        got = sequence_logps(model, tok, rows[:4])
        lp, mask = logprobs(model, tok, [r.prompt for r in rows[:4]], [r.chosen for r in rows[:4]])
    torch.testing.assert_close(got.chosen, lp.sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.chosen_lengths, mask.sum(-1))


def test_reference_logps_are_the_same_in_any_batching(tiny_lm, tok, rows):
    model = tiny_lm("gpt2").eval()
    whole = reference_logps(model, tok, rows[:10], batch_size=64)
    pieces = reference_logps(model, tok, rows[:10], batch_size=3)
    torch.testing.assert_close(whole.rejected, pieces.rejected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_every_layout_gives_the_same_log_probs(tiny_lm, tok, rows, name):
    model = tiny_lm(name).eval()
    with torch.no_grad():
        padded, shared, packed = (sequence_logps(model, tok, rows[:12], layout=layout)
                                  for layout in ("padded", "shared-prompt", "packed"))
    for got in (shared, packed):
        torch.testing.assert_close(got.chosen, padded.chosen, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got.rejected, padded.rejected, atol=1e-4, rtol=1e-5)
        assert torch.equal(got.chosen_lengths, padded.chosen_lengths)


def test_an_unknown_layout_is_an_error_when_the_config_is_built():
    with pytest.raises(ConfigError, match="layout: expected one of padded, shared-prompt, packed, got 'rows'"):
        DPOConfig(train=TRAIN, layout="rows")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_trains_every_model(tiny_lm, tmp_path, tok, rows, name, loss):
    policy, reference = tiny_lm(name), tiny_lm(name).eval()
    before = [p.clone() for p in policy.parameters()]
    config = DPOConfig(train=TRAIN, loss=loss, beta=2.0 if loss == "simpo" else 0.5,
                       label_smoothing=0.1 if loss in LABEL_SMOOTHED else 0.0)
    run = RunDir(tmp_path / "dpo", {})
    train_dpo(policy, tok, rows, config, run, None if loss == "simpo" else reference)
    metrics = run.metrics()
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[-1]["rewards/margins"] > metrics[0]["rewards/margins"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(
        metrics[-1])
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_at_the_start_the_implicit_rewards_are_zero(tiny_lm, tmp_path, tok, rows):
    policy, reference = tiny_lm("gpt2"), tiny_lm("gpt2").eval()
    config = DPOConfig(train=replace(TRAIN, steps=1, log_every=1, lr=1e-12, warmup_steps=0), loss="sigmoid")
    run = RunDir(tmp_path / "dpo", {})
    train_dpo(policy, tok, rows, config, run, reference)
    first = run.metrics()[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-5)  # log 2: policy equals reference


def test_rpo_adds_alpha_times_the_chosen_nll(tiny_lm, tmp_path, tok, rows):
    from safetylab.align.dpo import chosen_nll

    policy, reference = tiny_lm("gpt2"), tiny_lm("gpt2").eval()
    config = DPOConfig(train=replace(TRAIN, steps=1, log_every=1, lr=1e-12, warmup_steps=0, batch_size=len(rows)),
                       rpo_alpha=0.5)  # one step over every row, at the reference: the DPO term is log 2
    run = RunDir(tmp_path / "rpo", {})
    train_dpo(policy, tok, rows, config, run, reference)
    with torch.no_grad():
        nll = chosen_nll(sequence_logps(reference, tok, rows)).item()
    first = run.metrics()[0]
    assert first["nll_loss"] == pytest.approx(nll, rel=1e-4) and nll > 0
    assert first["loss"] == pytest.approx(0.6931472 + 0.5 * nll, rel=1e-4)


def test_gold_tracking_joins_the_records_at_evaluation_steps(tiny_lm, tmp_path, tok, rows, world):
    policy, reference = tiny_lm("gpt2"), tiny_lm("gpt2").eval()
    requests = world.evaluation_set(2, 1)
    tracker = gold_tracker(tok, world.judge, requests, reference, EvalConfig(max_new_tokens=8))
    config = DPOConfig(train=replace(TRAIN, eval_every=8), loss="sigmoid")
    run = RunDir(tmp_path / "dpo", {})
    train_dpo(policy, tok, rows, config, run, reference, evaluate=tracker)
    evaluated = [m["step"] for m in run.metrics() if "gold/utility" in m]
    assert evaluated == [0, 8, 12]  # before the first step, every eval_every steps and at the end
    assert run.metrics()[0]["gold/kl"] == pytest.approx(0.0, abs=1e-5)  # step 0: the policy is the reference
    last = run.metrics()[-1]
    assert last["gold/kl"] > 0 and "gold/utility/harmful" in last and "gold/harmful_compliance" in last


def test_resumed_dpo_repeats_the_uninterrupted_run(tiny_lm, tmp_path, tok, rows, world):
    requests = world.evaluation_set(1, 1)

    def run_dpo(path):
        policy, reference = tiny_lm("gpt2"), tiny_lm("gpt2").eval()
        tracker = gold_tracker(tok, world.judge, requests, reference, EvalConfig(max_new_tokens=6))
        config = DPOConfig(train=replace(TRAIN, eval_every=4), loss="sigmoid")
        train_dpo(policy, tok, rows, config, RunDir(path, {}), reference, evaluate=tracker)
        return (path / "metrics.jsonl").read_text(), [p.detach().clone() for p in policy.parameters()]

    whole, weights = run_dpo(tmp_path / "run")
    # an interruption after step 5: the checkpoint at step 8 was never written
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000008")
    resumed, resumed_weights = run_dpo(tmp_path / "run")
    assert resumed == whole
    assert all(torch.equal(a, b) for a, b in zip(weights, resumed_weights))


def test_bad_settings_are_clear_errors(tiny_lm, tmp_path, tok, rows):
    policy = tiny_lm("gpt2")
    with pytest.raises(ConfigError, match="loss: expected one of sigmoid, robust, ipo, hinge, simpo, got 'kto'"):
        DPOConfig(train=TRAIN, loss="kto")
    with pytest.raises(SafetylabError, match="needs a reference model"):
        train_dpo(policy, tok, rows, DPOConfig(train=TRAIN), RunDir(tmp_path / "b", {}))


def test_train_dpo_command_trains_saves_and_compares(tmp_path, tok, world):
    import json
    import subprocess
    import sys

    from typer.testing import CliRunner

    from safetylab import cli
    from safetylab.core import write_jsonl
    from safetylab.models import ModelConfig, build_model, save_model

    torch.manual_seed(0)
    base = save_model(build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tok), tok, tmp_path / "sft")
    write_jsonl(tmp_path / "prefs.jsonl", world.preferences(24, "ideal"))
    args = ["train", "dpo", "--base", str(base), "--preferences", str(tmp_path / "prefs.jsonl"), "--loss", "simpo",
            "--steps", "2", "--out", str(tmp_path / "dpo"), "--device", "cpu"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "dpo" / "config.json").read_text())["dpo"]["beta"] == 2.0  # SimPO's own β
    report = json.loads((tmp_path / "dpo" / "eval.json").read_text())
    assert set(report) == {"start", "dpo"}
    assert report["start"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert (tmp_path / "dpo" / "artifacts" / "model" / "model.safetensors").exists()
    bad = subprocess.run([sys.executable, "-m", "safetylab", *args[:-4], "--loss", "kto", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--loss: expected one of sigmoid" in bad.stderr and "Traceback" not in bad.stderr


def test_policy_preferences_compare_the_policys_own_finished_samples(monkeypatch, tok, world):
    from safetylab.align import dpo
    from safetylab.models.sampling import Samples

    requests = world.requests("arithmetic", "train", 3)
    right, wrong = ([world.respond(r, style, world.rng("t", i)) for i, r in enumerate(requests)]
                    for style in ("correct", "confident_wrong"))
    draws = iter([([right[0], wrong[1], right[2]], [True, True, False]), (wrong, [True, True, True])])

    def fake_sample(model, tokenizer, prompts, max_new_tokens):
        texts, finished = next(draws)
        assert prompts == [r.prompt for r in requests]
        empty = torch.zeros(3, 1)
        return Samples(list(prompts), texts, empty.long(), empty, empty, torch.tensor(finished))

    monkeypatch.setattr(dpo, "sample", fake_sample)
    records = dpo.policy_preferences(None, tok, world, requests, "ideal")
    # request 0: compared; request 1: both wrong alike (a gold tie); request 2: a sample without its eos
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == [(requests[0].prompt, right[0], wrong[0])]


def test_policy_preferences_compare_every_two_of_k_samples(monkeypatch, tok, world):
    from safetylab.align import dpo
    from safetylab.models.sampling import Samples

    request = world.requests("arithmetic", "train", 1)
    texts = [world.respond(request[0], style, world.rng("k", style))
             for style in ("correct", "hedged_correct", "confident_wrong")]
    draws = iter(texts)

    def fake_sample(model, tokenizer, prompts, max_new_tokens):
        empty = torch.zeros(1, 1)
        return Samples(list(prompts), [next(draws)], empty.long(), empty, empty, torch.tensor([True]))

    monkeypatch.setattr(dpo, "sample", fake_sample)
    records = dpo.policy_preferences(None, tok, world, request, "ideal", k=3)
    assert [(r["chosen"], r["rejected"]) for r in records] == [(texts[0], texts[1]), (texts[0], texts[2]),
                                                              (texts[1], texts[2])]  # gold: 1 > 0.6 > -1
    with pytest.raises(SafetylabError, match="k must be at least 2"):
        dpo.policy_preferences(None, tok, world, request, "ideal", k=1)


def _with_dropout(tok, p: float = 0.1):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=128,
                                      resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dropout_is_off_while_the_policy_is_compared_with_its_reference(tmp_path, tok, rows, loss):
    """A policy equal to its reference (and not moved: lr 1e-30) has log-ratio h = 0 at step 1, so the
    sigmoid loss is ln 2 and the margin 0, as TRL's disable_dropout gives, though the model was built
    with dropout 0.1: the reference log-probs are taken without dropout, and so are the policy's. The
    caller's modules keep their own dropout probabilities."""
    import math

    train = replace(TRAIN, steps=1, lr=1e-30, warmup_steps=0, log_every=1, checkpoint_every=1)
    policy, reference = _with_dropout(tok), _with_dropout(tok).eval()
    trained = train_dpo(policy, tok, rows, DPOConfig(train=train, loss=loss), RunDir(tmp_path / "off", {}), reference)
    first = RunDir(tmp_path / "off", {}).metrics()[0]
    assert first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2) if loss == "sigmoid" else (1 / (2 * 0.1)) ** 2, rel=1e-6)
    assert {m.p for m in trained.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}

    on = DPOConfig(train=train, loss=loss, disable_dropout=False)
    train_dpo(_with_dropout(tok), tok, rows, on, RunDir(tmp_path / "on", {}), reference)
    assert RunDir(tmp_path / "on", {}).metrics()[0]["rewards/margins"] != 0.0  # what dropout did before


def test_simpo_takes_the_beta_of_its_paper_unless_told_otherwise():
    assert DPOConfig(loss="simpo").loss_beta == 2.0 and DPOConfig().loss_beta == 0.1
    assert replace(DPOConfig(), loss="simpo").loss_beta == 2.0  # a default follows the loss it belongs to
    assert DPOConfig(loss="simpo", beta=2.5).loss_beta == 2.5


@pytest.mark.parametrize(("change", "message"), [
    ({"beta": 0.0}, "beta: expected a finite number > 0"),
    ({"beta": -0.1}, "beta: expected a finite number > 0"),
    ({"label_smoothing": 0.5}, r"label_smoothing: expected a probability in \[0, 0.5\)"),
    ({"loss": "hinge", "label_smoothing": 0.1}, "label_smoothing: expected 0 for the hinge loss"),
    ({"rpo_alpha": -1.0}, "rpo_alpha: expected a finite number >= 0"),
    ({"gamma": float("inf")}, "gamma"),
])
def test_dpo_settings_are_checked_when_the_config_is_built(change, message):
    with pytest.raises(ConfigError, match=message):
        DPOConfig(**change)
