"""safetylab.models.train: batches, collation, schedule, the training loop, checkpoints and resume."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import safetylab.models.train as train_module
from safetylab.core.errors import ConfigError, SafetylabError
from safetylab.core.runs import RunDir
from safetylab.core.seeding import seed_everything
from safetylab.models import ModelConfig, build_model, load_model, train_tokenizer
from safetylab.models.train import (
    Example,
    TrainConfig,
    batch_indices,
    chat_examples,
    collate,
    finetune,
    lr_at,
    pretrain,
    text_examples,
    train_lm,
)
from safetylab.world import chat

TINY = ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64)
CONFIG = TrainConfig(steps=24, batch_size=8, lr=5e-3, warmup_steps=4, max_length=48, log_every=4,
                     checkpoint_every=8, seed=0, device="cpu")


@pytest.fixture(scope="module")
def lines(world) -> list[str]:
    return world.corpus(150)


@pytest.fixture(scope="module")
def tok(lines):
    return train_tokenizer(lines)


@pytest.fixture(scope="module")
def examples(tok, lines):
    return text_examples(tok, lines, CONFIG.max_length)


def fresh_model(tok, seed: int = 0):
    seed_everything(seed)
    return build_model(TINY, tok)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------- batches
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), batch_size=st.integers(1, 25), seed=st.integers(0, 10_000))
def test_batch_indices_cover_each_epoch_once(n, batch_size, seed):
    epochs = 3
    steps = math.ceil(epochs * n / batch_size)
    flat = []
    for step in range(steps):
        batch = batch_indices(n, batch_size, seed, step)
        assert len(batch) == batch_size
        flat.extend(batch)
    for epoch in range(epochs):
        assert sorted(flat[epoch * n:(epoch + 1) * n]) == list(range(n))


def test_batch_indices_pure_function_of_seed_and_step():
    first = [batch_indices(50, 7, seed=3, step=s) for s in range(20)]
    torch.manual_seed(999)  # the global RNG must not matter
    torch.rand(10)
    again = [batch_indices(50, 7, seed=3, step=s) for s in reversed(range(20))][::-1]
    assert first == again
    assert batch_indices(50, 7, seed=4, step=0) != first[0]
    # successive epochs are shuffled differently
    epoch0 = [i for s in range(10) for i in batch_indices(50, 5, 3, s)]
    epoch1 = [i for s in range(10, 20) for i in batch_indices(50, 5, 3, s)]
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)


def test_collate_labels_and_padding():
    examples = [
        Example([5, 6, 7, 8], [0, 0, 1, 1]),
        Example([9, 10], [1, 1]),
        Example([11, 12, 13], [1, 0, 1]),
    ]
    out = collate(examples, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [11, 12, 13, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert out["labels"].tolist() == [[-100, -100, 7, 8], [9, 10, -100, -100], [11, -100, 13, -100]]


def test_collate_with_nonzero_pad_id():
    out = collate([Example([1], [1]), Example([2, 3, 4], [0, 1, 0])], pad_id=4)
    assert out["input_ids"].tolist() == [[1, 4, 4], [2, 3, 4]]
    assert out["labels"].tolist() == [[1, -100, -100], [-100, 3, -100]]
    assert out["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]


def test_text_examples_loss_everywhere_and_truncated(tok, lines):
    examples = text_examples(tok, lines[:10], max_length=12)
    for line, e in zip(lines, examples):
        full = tok(line, add_special_tokens=False)["input_ids"]
        assert e.ids == full[:12]
        assert e.loss_mask == [1] * len(e.ids)


def test_chat_examples_mask_the_prompt(tok, world):
    pairs = [(d["prompt"], d["response"]) for d in world.demonstrations(12)]
    examples = chat_examples(tok, pairs, max_length=200)
    for (prompt, response), e in zip(pairs, examples):
        p = tok(chat(prompt), add_special_tokens=False)["input_ids"]
        assert len(e.ids) == len(e.loss_mask)
        assert e.ids[: len(p)] == p
        assert e.loss_mask[: len(p)] == [0] * len(p)
        assert e.loss_mask[len(p):] == [1] * (len(e.ids) - len(p))
        trained = [i for i, m in zip(e.ids, e.loss_mask) if m]
        assert trained[-1] == tok.eos_token_id
        assert trained == tok(f"{response} <eos>", add_special_tokens=False)["input_ids"]
        assert tok.eos_token_id not in e.ids[: len(p)]


def test_chat_examples_truncate_ids_and_mask_together(tok, world):
    pairs = [(d["prompt"], d["response"]) for d in world.demonstrations(6)]
    for e in chat_examples(tok, pairs, max_length=10):
        assert len(e.ids) == len(e.loss_mask) <= 10


def test_collate_of_chat_examples_ignores_prompt(tok, world):
    pairs = [(d["prompt"], d["response"]) for d in world.demonstrations(4)]
    examples = chat_examples(tok, pairs, max_length=200)
    batch = collate(examples, tok.pad_token_id)
    for row, e in enumerate(examples):
        labels = batch["labels"][row]
        for j, (i, m) in enumerate(zip(e.ids, e.loss_mask)):
            assert labels[j] == (i if m else -100)
        assert (labels[len(e.ids):] == -100).all()


# ---------------------------------------------------------------------------- schedule
def test_lr_warmup_and_cosine_end():
    config = TrainConfig(steps=100, lr=1e-2, warmup_steps=10)
    assert lr_at(0, config) == pytest.approx(1e-3)
    assert lr_at(4, config) == pytest.approx(5e-3)
    assert lr_at(9, config) == pytest.approx(1e-2)
    assert lr_at(10, config) == pytest.approx(1e-2)
    assert lr_at(55, config) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))  # half-way down the cosine
    assert lr_at(100, config) == pytest.approx(1e-3)  # 10% at the end
    assert lr_at(500, config) == pytest.approx(1e-3)  # and it stays there
    after = [lr_at(s, config) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    warm = [lr_at(s, config) for s in range(10)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert min(lr_at(s, config) for s in range(200)) >= 1e-3 - 1e-12


def test_lr_without_warmup_room():
    config = TrainConfig(steps=5, lr=1.0, warmup_steps=5)
    assert [round(lr_at(s, config), 6) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert lr_at(5, config) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- the loop
def test_train_lm_lowers_the_loss(tmp_path, tok, examples):
    run = RunDir(tmp_path / "run", {"test": "loss"})
    model = train_lm(fresh_model(tok), tok, examples, replace(CONFIG, steps=32, checkpoint_every=1000), run)
    assert not model.training
    metrics = run.metrics()
    assert [m["step"] for m in metrics] == list(range(4, 33, 4))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    assert math.log(len(tok)) == pytest.approx(metrics[0]["loss"], abs=1.0)  # starts near uniform
    for m in metrics:
        assert set(m) == {"step", "loss", "lr", "tokens"}
        assert m["lr"] == pytest.approx(lr_at(m["step"] - 1, replace(CONFIG, steps=32)), abs=1e-8)
        assert m["tokens"] > 0
    assert not list((run.path / "checkpoints").glob("step-*"))


@pytest.mark.parametrize(("change", "message"), [
    ({"checkpoint_every": 6, "log_every": 4}, r"checkpoint_every: expected a multiple of log_every \(4\)"),
    ({"eval_every": 3, "log_every": 2}, "eval_every: expected 0 or a multiple of log_every"),
    ({"lr": -1.0}, "lr: expected a finite number > 0, got -1.0"),
    ({"lr": float("nan")}, "lr: expected a finite number > 0"),
    ({"steps": 0}, "steps: expected an integer >= 1, got 0"),
    ({"batch_size": 0}, "batch_size"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"device": "tpu"}, "device: expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ({"device": "cpu:0"}, "device"),
])
def test_train_settings_are_checked_when_the_config_is_built(change, message):
    with pytest.raises(ConfigError, match=message):
        replace(CONFIG, **change)


def test_train_lm_without_examples(tmp_path, tok):
    with pytest.raises(SafetylabError, match="no training examples"):
        train_lm(fresh_model(tok), tok, [], CONFIG, RunDir(tmp_path / "run", {}))


def test_train_lm_logs_the_tokens_it_trains_on(tmp_path, tok, world):
    pairs = [(d["prompt"], d["response"]) for d in world.demonstrations(20)]
    examples = chat_examples(tok, pairs, CONFIG.max_length)
    config = replace(CONFIG, steps=2, log_every=1, batch_size=20)
    run = RunDir(tmp_path / "run", {})
    train_lm(fresh_model(tok), tok, examples, config, run)
    # batch 20 of 20 examples: each once; a token is predicted from the one before, so the
    # first token of an example is never a target
    expected = sum(sum(e.loss_mask[1:]) for e in examples)
    responses = sum(len(tok(f"{response} <eos>", add_special_tokens=False)["input_ids"]) for _, response in pairs)
    assert expected == responses  # the prompts are not trained on
    assert [m["tokens"] for m in run.metrics()] == [expected, expected]


def test_checkpoints_keep_the_last_two(tmp_path, tok, examples):
    run = RunDir(tmp_path / "run", {})
    train_lm(fresh_model(tok), tok, examples, replace(CONFIG, steps=20, checkpoint_every=4), run)
    names = sorted(p.name for p in (run.path / "checkpoints").iterdir())
    assert names == ["step-000012", "step-000016"]  # none at the final step 20; older ones pruned
    step = json.loads((run.path / "checkpoints" / "step-000016" / "step.json").read_text())
    assert step == {"step": 16}
    assert list((run.path / "checkpoints" / "step-000016").glob("*.safetensors"))


def test_pretrain_same_seed_same_metrics_bytes(tmp_path, lines):
    runs = []
    for name in ("a", "b"):
        run = RunDir(tmp_path / name, {"same": "config"})
        pretrain(lines, TINY, CONFIG, run)
        runs.append(run)
    a, b = ((r.path / "metrics.jsonl").read_bytes() for r in runs)
    assert a == b
    assert len(a.splitlines()) == CONFIG.steps // CONFIG.log_every
    ma, _ = load_model(runs[0].artifacts / "model")
    mb, _ = load_model(runs[1].artifacts / "model")
    assert same_weights(ma, mb)
    # a different seed gives a different run (so the equality above is not vacuous)
    other = RunDir(tmp_path / "c", {"other": "seed"})
    pretrain(lines, TINY, replace(CONFIG, seed=1, steps=CONFIG.log_every), other)
    assert (other.path / "metrics.jsonl").read_bytes().splitlines()[0] != a.splitlines()[0]


class Interrupt(Exception):
    """A simulated kill of the training process."""


def interrupt_after(model, calls: int):
    """Make the model's forward raise on call ``calls + 1``: a run killed mid-training."""
    count = [0]

    def hook(module, args, kwargs):
        count[0] += 1
        if count[0] > calls:
            raise Interrupt(f"killed at forward {count[0]}")

    return model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.slow
def test_resumed_run_repeats_the_uninterrupted_one(tmp_path, lines):
    config = replace(CONFIG, steps=24, checkpoint_every=8, log_every=4)
    reference = RunDir(tmp_path / "whole", {"run": 1})
    whole, _ = pretrain(lines, TINY, config, reference)

    # the same run, killed at step 15: after the checkpoint at step 8 and the metrics of steps 9-12
    broken = RunDir(tmp_path / "broken", {"run": 1})
    tok = train_tokenizer(lines)
    model = fresh_model(tok, config.seed)
    interrupt_after(model, 14)
    with pytest.raises(Interrupt):
        train_lm(model, tok, text_examples(tok, lines, config.max_length), config, broken)
    assert [p.name for p in (broken.path / "checkpoints").glob("step-*")] == ["step-000008"]
    assert [m["step"] for m in broken.metrics()] == [4, 8, 12]
    assert not (broken.artifacts / "model").exists()

    # rerun the same job in the same directory: it resumes from step 8
    resumed, _ = pretrain(lines, TINY, config, RunDir(tmp_path / "broken", {"run": 1}))
    assert (broken.path / "metrics.jsonl").read_bytes() == (reference.path / "metrics.jsonl").read_bytes()
    assert same_weights(resumed, whole)
    saved_whole, _ = load_model(reference.artifacts / "model")
    saved_resumed, _ = load_model(broken.artifacts / "model")
    assert same_weights(saved_whole, saved_resumed)


def test_resume_truncates_metrics_logged_after_the_checkpoint(tmp_path, tok, examples):
    config = replace(CONFIG, steps=12, checkpoint_every=4, log_every=2)
    run = RunDir(tmp_path / "run", {})
    model = fresh_model(tok)
    interrupt_after(model, 7)
    with pytest.raises(Interrupt):
        train_lm(model, tok, examples, config, run)
    assert [m["step"] for m in run.metrics()] == [2, 4, 6]
    train_lm(fresh_model(tok, seed=5), tok, examples, config, run)  # the checkpoint overrides the init
    assert [m["step"] for m in run.metrics()] == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("damage", ["garbage_weights", "missing_optimizer"])
def test_corrupt_checkpoint_is_an_error(tmp_path, tok, examples, damage):
    config = replace(CONFIG, steps=6, checkpoint_every=3, log_every=3)
    run = RunDir(tmp_path / "run", {})
    train_lm(fresh_model(tok), tok, examples, config, run)
    checkpoint = run.path / "checkpoints" / "step-000003"
    assert checkpoint.is_dir()
    if damage == "garbage_weights":
        for weights in checkpoint.glob("*.safetensors"):
            weights.write_bytes(b"not a safetensors file")
    else:
        for optimizer in checkpoint.glob("optimizer*"):
            optimizer.unlink()
    before = (run.path / "metrics.jsonl").read_bytes()
    with pytest.raises(SafetylabError) as info:
        train_lm(fresh_model(tok), tok, examples, config, run)
    assert str(checkpoint) in str(info.value) and "corrupt checkpoint" in str(info.value)
    assert (run.path / "metrics.jsonl").read_bytes() == before  # nothing rewritten


def test_pretrain_saves_and_a_second_call_loads(tmp_path, lines, monkeypatch):
    config = replace(CONFIG, steps=8, checkpoint_every=100)
    run = RunDir(tmp_path / "run", {"x": 1})
    model, tok = pretrain(lines, TINY, config, run)
    final = run.artifacts / "model"
    assert list(final.glob("*.safetensors")) and (final / "config.json").is_file()
    metrics = (run.path / "metrics.jsonl").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must be loaded, not retrained")

    monkeypatch.setattr(train_module, "train_lm", no_training)
    monkeypatch.setattr(train_module, "train_tokenizer", no_training)
    again, tok2 = pretrain(lines, TINY, config, RunDir(tmp_path / "run", {"x": 1}))
    assert same_weights(again, model)
    assert tok2.get_vocab() == tok.get_vocab()
    assert (run.path / "metrics.jsonl").read_bytes() == metrics


def test_finetune_saves_and_a_second_call_loads(tmp_path, tok, world, monkeypatch):
    base = fresh_model(tok)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pairs = [(d["prompt"], d["response"]) for d in world.demonstrations(40)]
    config = replace(CONFIG, steps=6, checkpoint_every=300, log_every=3)
    run = RunDir(tmp_path / "sft", {"sft": 1})
    model, tok_out = finetune(base, tok, pairs, config, run)
    assert tok_out is tok
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    final = run.artifacts / "model"
    loaded, _ = load_model(final)
    assert same_weights(loaded, model)
    assert [m["step"] for m in run.metrics()] == [3, 6]

    monkeypatch.setattr(train_module, "train_lm", lambda *a, **k: pytest.fail("retrained a finished run"))
    again, _ = finetune(fresh_model(tok, seed=9), tok, pairs, config, RunDir(tmp_path / "sft", {"sft": 1}))
    assert same_weights(again, model)



def test_finetune_trains_on_replayed_text_with_the_loss_on_every_token(tmp_path, tok, world, lines):
    pairs = [(d["prompt"], d["response"]) for d in world.demonstrations(6)]
    replay = [line for line in lines if not line.startswith("<user>")][:4]
    config = replace(CONFIG, steps=1, log_every=1, batch_size=10)
    run = RunDir(tmp_path / "run", {})
    train_module.finetune(fresh_model(tok), tok, pairs, config, run, replay)
    demos = sum(sum(e.loss_mask[1:]) for e in chat_examples(tok, pairs, CONFIG.max_length))
    text = sum(len(tok(line)["input_ids"][: CONFIG.max_length]) - 1 for line in replay)
    assert run.metrics()[0]["tokens"] == demos + text


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_weights(tmp_path, tok, examples):
    from safetensors.torch import load_file

    from safetylab.models.train import Step, train_loop

    model = fresh_model(tok)
    calls: list[Step] = []

    def step_loss(model, step: Step):
        calls.append(step)
        loss = model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss
        return (loss * float("nan") if len(calls) == 4 else loss), {}

    run = RunDir(tmp_path / "run", {})
    with pytest.raises(SafetylabError, match=r"the loss is nan at step 4; stopped, with the weights of step 3"):
        train_loop(model, len(examples), step_loss, replace(CONFIG, steps=10), run)
    saved = run.latest_checkpoint()
    assert saved is not None and saved[0] == 3
    for name, tensor in load_file(str(next(saved[1].glob("model*.safetensors")))).items():
        assert torch.isfinite(tensor).all(), name
