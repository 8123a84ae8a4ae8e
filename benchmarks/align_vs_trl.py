"""Alignment training steps: safetylab against TRL and against the bare-PyTorch floor.

Reward modelling, DPO and RLOO (TRL no longer ships PPO), each trained three ways on the same tiny
model, the same data in the same order and the same batch size:

- *safetylab*: the real trainers with their defaults — ``train_reward_model`` and ``train_dpo`` (reference
  log-probs precomputed, as DPO always does; each pair's prompt computed once for its chosen and
  rejected responses and pairs packed, ``layout="packed"``: less work than TRL's) and ``train_rloo``
  (the sampler prefills each prompt once for its k samples; the policy, the reference and the reward
  model read the sampled token ids in the packed layout, the reward model chosen by ``policy_reward``
  as ``safetylab train rloo`` does). Per-step times are the
  intervals between successive ``Progress.advance`` calls of ``train_loop`` (a thin subclass patched
  into ``safetylab.models.train``, as in ``train_step.py``): one whole loop body each, tokenization,
  batch building, sampling and logging statistics included.
- *safetylab, padded*: the reward model and DPO with ``layout="padded"``: TRL's work, one right-padded
  row per sequence, each prompt twice. The speed ratios to TRL are printed for both: equal work and
  less work.
- *TRL*: ``RewardTrainer``, ``DPOTrainer`` with ``precompute_ref_log_probs`` on (the work safetylab
  does) and off (TRL's default: a reference forward every step), ``RLOOTrainer``, timed between
  successive ``on_step_end`` callbacks (one whole loop body of ``Trainer._inner_training_loop``). TRL's
  defaults that change the arithmetic are set to safetylab's: fp32 (TRL defaults to ``bf16=True``), no
  gradient checkpointing (TRL defaults it on), the same learning rate and ``max_grad_norm``; TRL keeps
  its own optimizer (fused AdamW), collators, fused log-prob head and metrics. The sampler is
  sequential over the rows in safetylab's batch order, so both train on the same batches (checked on
  the first batch: the padded token ids must be equal).
- *floor*: the work of safetylab's default step in plain PyTorch on the same model: pre-built batches
  (the very tensors safetylab builds: ``pack_batch``'s packed layout for the reward model and DPO),
  forward with ``use_cache=False`` (a key/value cache is no part of the work), loss, ``backward``,
  ``clip_grad_norm_``, fused ``AdamW.step`` (as safetylab's), ``zero_grad``. For RLOO the floor samples
  with a plain KV-cached loop (each prompt prefilled once, ``model(...)`` per token and
  ``torch.multinomial``) and scores the sampled ids with the policy, the reference and the reward model
  in the packed layout (built by safetylab's ``pack_batch``, the one piece that is not bare PyTorch),
  without decoding.

Rounds: each round runs every side for ``warmup + steps`` steps, the sides in a rotating order; the
first ``warmup`` steps of every round are dropped and medians are taken over the rest. After every
step of every side (outside its timed interval, from the step callback) the floor takes the same step
on the same batch, so each side also gets a *paired* ratio to the floor — the median over steps of its
step time over that of the floor step taken moments later — in which the shared machine's slow and
fast spells cancel. Speed ratios between safetylab and TRL are quotients of these paired ratios (the
ratio of the raw medians is printed next to them). RLOO's draws are made alike on every side: the
torch seed is reset to ``seed + step`` before every step, and the learning rate is tiny (1e-6, TRL's
default) so that the sampling distribution stays put; the generated tokens per step of each side are
printed so that the work can be compared.

Peak memory: each (algorithm, side) runs alone in a fresh subprocess; the growth of the peak RSS over
``--mem-steps`` training steps from a baseline taken right before the first step (after models, data,
TRL's preprocessing and safetylab's reference precompute, and after ``malloc_trim``) — ``VmHWM`` reset
through ``/proc/self/clear_refs`` (see ``train_step.py``), median over ``--mem-repeats`` subprocesses.

TRL is a benchmark-only dependency: install ``benchmarks/requirements-trl.txt`` into a separate
environment together with safetylab (see ``benchmarks/README.md``) and run this script with it.

    python benchmarks/align_vs_trl.py                      # all three, 1 thread, 3 rounds x 12 steps
    python benchmarks/align_vs_trl.py --only dpo --rounds 5
    python benchmarks/align_vs_trl.py --trl-option torch_compile=true   # a TRL setting, where its configs take it
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from peak_memory import peak_kib, reset_peak_rss, status_kib

TARGET_FLOOR_RATIO = {"rm": 1.1, "dpo": 1.15, "rloo": 1.15}  # safetylab step / floor step, the same work
# safetylab steps/s over TRL's fastest setting: (doing TRL's padded work, computing less)
TARGET_TRL_SPEEDUP = {"rm": (1.0, 1.3), "dpo": (1.0, 2.0), "rloo": (None, 1.3)}
ALGORITHMS = ("rm", "dpo", "rloo")
SIDES = {"rm": ("safetylab", "safetylab-padded", "trl", "floor"),
         "dpo": ("safetylab", "safetylab-padded", "trl", "trl-ref", "floor"),
         "rloo": ("safetylab", "trl", "floor")}
SIDE_NAMES = {"safetylab": "safetylab (packed: less work)", "safetylab-padded": "safetylab, padded (TRL's work)",
              "trl": "TRL", "trl-ref": "TRL, reference forward each step", "floor": "floor (bare PyTorch)"}
SEED = 0


# ----------------------------------------------------------------------------- setup
def build_setup(args, out: Path) -> None:
    """The world's tokenizer, a briefly fine-tuned policy (so that it ends its responses, at natural
    lengths), preference pairs and RLOO prompts, saved to ``out`` for this process and the memory
    subprocesses."""
    import torch

    from safetylab.core.runs import RunDir
    from safetylab.models.lm import ModelConfig, build_model, save_model
    from safetylab.models.tokenizer import train_tokenizer
    from safetylab.models.train import TrainConfig, chat_examples, train_lm
    from safetylab.world import KINDS, World

    world = World()
    tokenizer = train_tokenizer(world.corpus(args.conversations))
    demos = world.demonstrations(args.sft_demos)
    examples = chat_examples(tokenizer, [(d["prompt"], d["response"]) for d in demos], TrainConfig().max_length)
    torch.manual_seed(SEED)
    model = build_model(ModelConfig(), tokenizer)
    config = TrainConfig(steps=args.sft_steps, batch_size=32, lr=3e-3, warmup_steps=10, log_every=10**9,
                         checkpoint_every=10**9, device="cpu", seed=SEED)
    with contextlib.redirect_stderr(io.StringIO()):
        model = train_lm(model, tokenizer, examples, config, RunDir(out / "sft-run", {}), "sft")
    save_model(model, tokenizer, out / "policy")
    records = world.preferences(args.pairs, "typical", seed=SEED)
    prompts = [r.prompt for kind in KINDS for r in world.requests(kind, "train", args.prompts_per_kind, seed=SEED)]
    (out / "data.json").write_text(json.dumps({
        "preferences": [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records],
        "prompts": prompts}))


@dataclass
class Setup:
    tokenizer: object
    policy: object  # the fine-tuned GPT-2: starting policy and frozen reference
    policy_dir: Path
    rows: list  # safetylab Preference rows
    prompts: list[str]


def load_setup(data: Path) -> Setup:
    from safetylab.align.data import Preference
    from safetylab.models.lm import load_model

    policy, tokenizer = load_model(data / "policy")
    raw = json.loads((data / "data.json").read_text())
    rows = [Preference(r["prompt"], r["chosen"], r["rejected"]) for r in raw["preferences"]]
    return Setup(tokenizer, policy, data / "policy", rows, raw["prompts"])


def reward_models(policy):
    """safetylab's ``RewardModel`` on a copy of the policy's transformer, and TRL's reward model, a
    ``GPT2ForSequenceClassification`` (``num_labels=1``) holding the same weights (its ``score`` has no
    bias; safetylab's head bias starts at 0): the same function of the same token ids."""
    import torch
    from transformers import GPT2ForSequenceClassification, GPT2Model

    from safetylab.align.reward import RewardModel

    torch.manual_seed(SEED + 1)
    backbone = GPT2Model(copy.deepcopy(policy.config))
    backbone.load_state_dict(policy.transformer.state_dict())
    ours = RewardModel(backbone)
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    theirs = GPT2ForSequenceClassification(config)
    theirs.transformer.load_state_dict(policy.transformer.state_dict())
    with torch.no_grad():
        theirs.score.weight.copy_(ours.head.weight)
    return ours, theirs


def batch_order(n: int, batch_size: int, steps: int) -> list[list[int]]:
    """The rows of safetylab's global batches 0 .. steps-1 (``batch_indices`` with the run's seed)."""
    from safetylab.models.train import batch_indices

    return [batch_indices(n, batch_size, SEED, step) for step in range(steps)]


# ----------------------------------------------------------------------------- hooks and timing
@dataclass
class Hooks:
    """Called by every side's loop: ``start()`` right before the first step (the memory baseline),
    ``before(i)`` as step i begins, ``after(i)`` once step i is over (outside every timed interval)."""

    start: Callable[[], None] = lambda: None
    before: Callable[[int], None] = lambda i: None
    after: Callable[[int], None] = lambda i: None


@contextlib.contextmanager
def timed_train_loop(times: list[float], hooks: Hooks):
    """Patch ``safetylab.models.train.Progress`` so that each ``advance`` (the end of one
    ``train_loop`` step but for the log/checkpoint checks) closes one timed interval."""
    import safetylab.models.train as train_module

    original = train_module.Progress

    class TimedProgress(original):
        def __enter__(self):
            out = super().__enter__()
            hooks.start()
            hooks.before(0)
            self._last = time.perf_counter()
            return out

        def advance(self, n=1, **values):
            super().advance(n, **values)
            times.append(time.perf_counter() - self._last)
            hooks.after(len(times) - 1)
            hooks.before(len(times))
            self._last = time.perf_counter()

    train_module.Progress = TimedProgress
    try:
        # Progress prints a few plain lines to stderr off a terminal; keep the benchmark output clean.
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        train_module.Progress = original


def trl_timer(times: list[float], hooks: Hooks, on_step=None):
    """A ``TrainerCallback`` timing the intervals between successive ``on_step_end`` calls."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            hooks.start()
            self.first = state.global_step
            self.last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            hooks.before(state.global_step - self.first)

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.last)
            if on_step is not None:
                on_step()
            hooks.after(len(times) - 1)
            self.last = time.perf_counter()

    return StepTimer()


def reseed(step: int) -> None:
    import torch

    torch.manual_seed(SEED * 1_000 + step)


# ----------------------------------------------------------------------------- floors
class Floor:
    """A bare-PyTorch training step on pre-built inputs; subclasses define ``loss(i)``. Its own fused
    ``AdamW`` with safetylab's hyper-parameters."""

    reseed = False

    def __init__(self, params, lr: float):
        import torch

        self.torch = torch
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95), fused=True)
        self.times: list[float] = []
        self.tokens: list[int] = []

    def step(self, i: int) -> None:
        if self.reseed:
            reseed(i)
        start = time.perf_counter()
        self.loss(i).backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)

    def run(self, steps: int, hooks: Hooks) -> list[float]:
        hooks.start()
        start = len(self.times)
        for i in range(steps):
            self.step(i)
        return self.times[start:]


class RewardFloor(Floor):
    """``GPT2Model`` + linear head on safetylab's packed (chosen; rejected) batch (``pack_batch``, built
    before timing: each pair's prompt once, its chosen and rejected responses after it); the last token of
    each sequence is scored; Bradley–Terry loss."""

    def __init__(self, reward_model, batches, lr):
        from safetylab.models.packing import pack_batch

        self.backbone = copy.deepcopy(reward_model.backbone).train()
        self.head = copy.deepcopy(reward_model.head)
        super().__init__([*self.backbone.parameters(), *self.head.parameters()], lr)
        self.batches = [pack_batch(b) for b in batches]

    def loss(self, i):
        packed = self.batches[i]
        hidden = self.backbone(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                               position_ids=packed.position_ids, use_cache=False).last_hidden_state
        rewards = self.head(hidden.flatten(0, 1)[packed.last]).squeeze(-1)
        chosen, rejected = rewards.chunk(2)
        return -self.torch.nn.functional.logsigmoid(chosen - rejected).mean()


class DPOFloor(Floor):
    """``GPT2LMHeadModel`` on safetylab's packed (chosen; rejected) batch (``pack_batch``, built before
    timing): gather the log-probs of the response tokens, sum them per sequence; sigmoid DPO against
    reference sums computed once before training."""

    def __init__(self, policy, batches, lr, beta):
        from safetylab.models.packing import pack_batch

        self.model = copy.deepcopy(policy).train()
        super().__init__(self.model.parameters(), lr)
        self.batches = [(pack_batch(b), len(b.input_ids)) for b in batches]
        self.beta = beta
        with self.torch.no_grad():
            self.reference = [self.sums(*b) for b in self.batches]

    def sums(self, packed, n):
        logits = self.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                            position_ids=packed.position_ids, use_cache=False).logits.flatten(0, 1)[packed.source]
        logps = logits.gather(-1, packed.target[:, None]).squeeze(-1) - self.torch.logsumexp(logits, -1)
        return logps.new_zeros(n).index_add(0, packed.row, logps)

    def loss(self, i):
        chosen, rejected = (self.sums(*self.batches[i]) - self.reference[i]).chunk(2)
        return -self.torch.nn.functional.logsigmoid(self.beta * (chosen - rejected)).mean()


class RLOOFloor(Floor):
    """Sample k responses per prompt with a plain KV-cached loop (each prompt prefilled once), score
    the sampled ids with the policy (with grad), the reference and the reward model in the packed
    layout (no decoding, no re-tokenizing), and take a REINFORCE step with the leave-one-out baseline
    and a k1 KL penalty in the reward."""

    reseed = True

    def __init__(self, policy, reward_model, tokenizer, prompt_batches, lr, k, max_new_tokens, kl_coef,
                 eos_penalty):
        import torch

        self.model = copy.deepcopy(policy).train()
        super().__init__(self.model.parameters(), lr)
        self.reference = copy.deepcopy(policy).eval()
        self.reward_backbone = copy.deepcopy(reward_model.backbone).eval()
        self.reward_head = copy.deepcopy(reward_model.head)
        self.k, self.max_new_tokens, self.kl_coef, self.eos_penalty = k, max_new_tokens, kl_coef, eos_penalty
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.prompts = []  # per step: left-padded distinct prompts and mask (for sampling), each row's prompt ids
        for ids in prompt_batches:
            rows = [p for p in ids for _ in range(k)]  # prompt-major, as safetylab and TRL
            width = max(len(p) for p in ids)
            left = torch.tensor([[self.pad] * (width - len(p)) + p for p in ids])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
            self.prompts.append((left, mask, rows))

    def sample(self, ids, mask):
        torch = self.torch
        with torch.no_grad():
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
            index = torch.arange(len(ids)).repeat_interleave(self.k)
            out.cache.reorder_cache(index)
            logits, mask, position = out.logits[index], mask[index], positions[index, -1:]
            finished = torch.zeros(len(index), dtype=torch.bool)
            tokens = []
            for _ in range(self.max_new_tokens):
                token = torch.multinomial(torch.softmax(logits[:, -1].float(), -1), 1).squeeze(1)
                token = token.masked_fill(finished, self.pad)
                tokens.append(token)
                finished |= token == self.eos
                if finished.all():
                    break
                mask = torch.cat([mask, mask.new_ones(len(index), 1)], 1)
                position = position + 1
                out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                                 cache=out.cache, use_cache=True)
                logits = out.logits
        return torch.stack(tokens, 1), finished

    def loss(self, i):
        from safetylab.models.logprobs import Batch
        from safetylab.models.packing import pack_batch

        torch = self.torch
        left, left_mask, rows = self.prompts[i]
        tokens, finished = self.sample(left, left_mask)
        # Right-padded prompt + response rows (response up to and including eos).
        seqs, lengths = [], []
        for p, row in zip(rows, tokens.tolist()):
            response = row[: row.index(self.eos) + 1] if self.eos in row else row
            seqs.append(p + response)
            lengths.append(len(p))
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [self.pad] * (width - len(s)) for s in seqs])
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        response = torch.tensor([[0] * n + [1] * (len(s) - n) + [0] * (width - len(s)) for s, n in zip(seqs, lengths)])
        self.tokens.append(int(response.sum()))
        packed = pack_batch(Batch(ids, attention, response))
        inputs = {"input_ids": packed.input_ids, "attention_mask": packed.attention_mask,
                  "position_ids": packed.position_ids, "use_cache": False}

        def logps(model):  # per sequence, summed over its response tokens
            logits = model(**inputs).logits.flatten(0, 1)[packed.source]
            token = logits.gather(-1, packed.target[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
            return token, token.new_zeros(len(ids)).index_add(0, packed.row, token)

        policy, policy_sums = logps(self.model)
        with torch.no_grad():
            kl = policy_sums.detach() - logps(self.reference)[1]
            hidden = self.reward_backbone(**inputs).last_hidden_state
            scores = self.reward_head(hidden.flatten(0, 1)[packed.last]).squeeze(-1)
            scores = scores - self.eos_penalty * (~finished).float()
            rewards = (scores - self.kl_coef * kl).view(-1, self.k)
            advantages = (rewards - (rewards.sum(-1, keepdim=True) - rewards) / (self.k - 1)).reshape(-1)
        ratio = torch.exp(policy - policy.detach())
        return -(advantages[packed.row] * ratio).sum() / len(ratio)


# ----------------------------------------------------------------------------- the sides
@dataclass
class Bench:
    """One algorithm: how to run each side for n steps (``run[side](n, hooks) -> times``), the floor
    object, and per-side notes (token counts) for the report."""

    algorithm: str
    run: dict[str, Callable]
    floor: Floor | None  # None in a memory subprocess of another side
    tokens: dict[str, list[float]] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    describe: list[str] = field(default_factory=list)


def trl_args(cls, args, out: Path, steps: int, lr: float, **extra):
    """TRL's config ``cls`` with the settings that make its arithmetic safetylab's, and the
    ``--trl-option`` values that its config takes (a TRL option of another trainer is left out)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    options = {k: v for k, v in args.trl_options if k in fields}
    return cls(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=steps, learning_rate=lr,
               gradient_checkpointing=False, bf16=False, use_cpu=True, report_to="none", logging_strategy="no",
               save_strategy="no", eval_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential",
               dataloader_num_workers=0, max_grad_norm=1.0, seed=SEED, **extra, **options)


def trl_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--trl-option``, the value read as JSON where it parses (true, 3, "static")."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def trl_train(trainer, times, hooks, on_step=None):
    """One ``trainer.train()`` call with a fresh optimizer and schedule (as a fresh safetylab call)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for quiet_callback in (PrinterCallback, ProgressCallback):  # the end-of-train metrics dict on stdout
        trainer.remove_callback(quiet_callback)
    callback = trl_timer(times, hooks, on_step)
    trainer.add_callback(callback)
    trainer.optimizer, trainer.lr_scheduler = None, None
    try:
        trainer.train()
    finally:
        trainer.remove_callback(callback)
    return times


def preference_dataset(rows, order):
    """TRL's ``{"prompt","chosen","rejected"}`` records in safetylab's batch order. The prompt is the
    world's chat template, the responses start with a space (the word-level tokenizer splits on it),
    and TRL appends the eos token: the same token ids as safetylab's ``encode_pairs``."""
    from datasets import Dataset

    from safetylab.world.world import chat

    records = [{"prompt": chat(rows[i].prompt), "chosen": " " + rows[i].chosen, "rejected": " " + rows[i].rejected}
               for batch in order for i in batch]
    return Dataset.from_list(records)


def bench_train_config(args, defaults, steps: int):
    """safetylab's training settings for a benchmark: the trainer's own lr and warm-up, the benchmark's
    steps and batch size, no logging or checkpoints inside the timed steps."""
    from safetylab.models.train import TrainConfig

    return TrainConfig(steps=steps, batch_size=args.batch_size, lr=defaults.lr, warmup_steps=defaults.warmup_steps,
                       log_every=10**9, checkpoint_every=10**9, device="cpu", seed=SEED)


def preference_batches(setup: Setup, args, steps: int, max_length: int):
    """The batch order every side follows, and safetylab's padded batches in that order."""
    from safetylab.align.data import encode_preferences

    order = batch_order(len(setup.rows), args.batch_size, steps)
    return order, [encode_preferences(setup.tokenizer, [setup.rows[i] for i in b], max_length=max_length)
                   for b in order]


def make_rm(args, setup: Setup, work: Path, steps: int) -> Bench:
    import torch
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from safetylab.align.reward import RewardConfig, train_reward_model
    from safetylab.core.runs import RunDir

    tok, rows = setup.tokenizer, setup.rows
    config = RewardConfig()
    lr = config.train.lr
    train = bench_train_config(args, config.train, steps)
    ours, theirs = reward_models(setup.policy)
    order, batches = preference_batches(setup, args, steps, train.max_length)
    trainer = None
    if "trl" in args.sides:
        trainer = RewardTrainer(model=theirs, args=trl_args(TRLRewardConfig, args, work / "trl-rm", steps, lr),
                                train_dataset=preference_dataset(rows, order), processing_class=tok)
    counter = {"round": 0}

    def run_safetylab(n, hooks, layout="packed"):
        times: list[float] = []
        run = RunDir(work / f"rm-safetylab-{counter['round']}", {})
        counter["round"] += 1
        with timed_train_loop(times, hooks):
            train_reward_model(ours, tok, rows, RewardConfig(train=replace_steps(train, n), layout=layout), run)
        return times

    # Each memory subprocess builds only its own side, and runs no check: work before the baseline
    # would leave freed pages that the measured steps then reuse.
    floor = RewardFloor(ours, batches, lr) if "floor" in args.sides else None
    bench = Bench("rm", {"safetylab": run_safetylab,
                         "safetylab-padded": lambda n, hooks: run_safetylab(n, hooks, "padded")}, floor)
    if floor is not None:
        bench.run["floor"] = floor.run
    if trainer is not None:
        bench.run["trl"] = lambda n, hooks: trl_train(with_steps(trainer, n), [], hooks)
    if trainer is not None and not args.child:
        first = next(iter(trainer.get_train_dataloader()))
        same = torch.equal(first["input_ids"], batches[0].input_ids)
        bench.checks.append(f"TRL's first batch has safetylab's padded token ids: {'yes' if same else 'NO'}")
    bench.describe.append(padding_note(batches, packed=True))
    return bench


def make_dpo(args, setup: Setup, work: Path, steps: int) -> Bench:
    import torch
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from safetylab.align.dpo import DPOConfig, train_dpo
    from safetylab.core.runs import RunDir

    tok, rows = setup.tokenizer, setup.rows
    config = DPOConfig()
    lr = config.train.lr
    train = bench_train_config(args, config.train, steps)
    policy = copy.deepcopy(setup.policy)
    reference = copy.deepcopy(setup.policy).eval()
    order, batches = preference_batches(setup, args, steps, train.max_length)
    dataset = preference_dataset(rows, order)
    trainers = {}
    for side, precompute in (("trl", True), ("trl-ref", False)):
        if side not in args.sides:
            continue
        trainers[side] = DPOTrainer(
            model=copy.deepcopy(setup.policy), ref_model=None if precompute else copy.deepcopy(setup.policy),
            args=trl_args(TRLDPOConfig, args, work / f"trl-{side}", steps, lr, beta=config.loss_beta,
                          precompute_ref_log_probs=precompute, max_length=None),
            train_dataset=dataset, processing_class=tok)
    counter = {"round": 0}

    def run_safetylab(n, hooks, layout="packed"):
        times: list[float] = []
        run = RunDir(work / f"dpo-safetylab-{counter['round']}", {})
        counter["round"] += 1
        with timed_train_loop(times, hooks):
            train_dpo(policy, tok, rows, DPOConfig(train=replace_steps(train, n), layout=layout), run,
                      reference=reference)
        return times

    floor = DPOFloor(setup.policy, batches, lr, config.loss_beta) if "floor" in args.sides else None
    bench = Bench("dpo", {"safetylab": run_safetylab,
                          "safetylab-padded": lambda n, hooks: run_safetylab(n, hooks, "padded")}, floor)
    if not args.child:
        from safetylab.align.dpo import sequence_logps

        first = [rows[i] for i in order[0]]
        with torch.no_grad():
            padded, packed = (sequence_logps(setup.policy, tok, first, max_length=train.max_length, layout=layout)
                              for layout in ("padded", "packed"))
        diff = max((getattr(padded, f) - getattr(packed, f)).abs().max().item() for f in ("chosen", "rejected"))
        bench.checks.append(f"packed and padded sequence log-probs agree on the first batch: max |diff| {diff:.2e}")
    for side, trainer in trainers.items():
        bench.run[side] = lambda n, hooks, t=trainer: trl_train(with_steps(t, n), [], hooks)
    if floor is not None:
        bench.run["floor"] = floor.run
    for side, trainer in trainers.items() if not args.child else ():
        first = next(iter(trainer.get_train_dataloader()))
        same = torch.equal(first["input_ids"], batches[0].input_ids) and torch.equal(
            first["completion_mask"], batches[0].response_mask)
        bench.checks.append(f"{SIDE_NAMES[side]}: first batch has safetylab's padded token ids and response mask: "
                            f"{'yes' if same else 'NO'}")
    bench.describe.append(padding_note(batches, packed=True))
    return bench


def make_rloo(args, setup: Setup, work: Path, steps: int) -> Bench:
    from datasets import Dataset
    from trl import RLOOConfig as TRLRLOOConfig
    from trl import RLOOTrainer

    import safetylab.align.rloo as rloo_module
    from safetylab.align.reward import policy_reward
    from safetylab.align.rloo import RLOOConfig, train_rloo
    from safetylab.core.runs import RunDir
    from safetylab.models.train import TrainConfig
    from safetylab.world.world import chat

    tok, prompts, k = setup.tokenizer, setup.prompts, args.k
    if args.batch_size % k:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of --k {k} (sequences per step)")
    per_step = args.batch_size // k  # prompts per step; batch_size counts sequences, as TRL's
    config = RLOOConfig(k=k, max_new_tokens=args.max_new_tokens)
    lr = args.rloo_lr
    train = TrainConfig(steps=steps, batch_size=per_step, lr=lr, warmup_steps=config.train.warmup_steps,
                        log_every=10**9, checkpoint_every=10**9, device="cpu", seed=SEED)
    config = RLOOConfig(train=train, k=k, kl_coef=config.kl_coef, max_new_tokens=args.max_new_tokens,
                        missing_eos_penalty=config.missing_eos_penalty)
    ours_rm, theirs_rm = reward_models(setup.policy)
    ours_rm.eval()
    theirs_rm.eval()
    policy = copy.deepcopy(setup.policy)
    reference = copy.deepcopy(setup.policy).eval()
    order = batch_order(len(prompts), per_step, steps)
    prompt_ids = [[tok(chat(prompts[i]))["input_ids"] for i in b] for b in order]
    dataset = Dataset.from_list([{"prompt": chat(prompts[i])} for b in order for i in b])
    trainer = None
    if "trl" in args.sides:
        trainer = RLOOTrainer(
            model=str(setup.policy_dir), reward_funcs=[theirs_rm],
            args=trl_args(TRLRLOOConfig, args, work / "trl-rloo", steps, lr, num_generations=k,
                          max_completion_length=args.max_new_tokens, beta=config.kl_coef, temperature=1.0,
                          shuffle_dataset=False),
            train_dataset=dataset, processing_class=tok, reward_processing_classes=[tok])
    floor = None
    if "floor" in args.sides:
        floor = RLOOFloor(setup.policy, ours_rm, tok, prompt_ids, lr, k, args.max_new_tokens, config.kl_coef,
                          config.missing_eos_penalty)
    bench = Bench("rloo", {}, floor, tokens={"safetylab": [], "trl": [], "floor": floor.tokens if floor else []})
    counter = {"round": 0}

    reward = policy_reward(ours_rm, tok, tok)  # the reward model itself: it reads the sampled ids

    def run_safetylab(n, hooks):
        times: list[float] = []
        run = RunDir(work / f"rloo-safetylab-{counter['round']}", {})
        counter["round"] += 1
        original = rloo_module.sample

        def spy(*a, **kw):  # counts the samples' tokens (response + eos)
            out = original(*a, **kw)
            bench.tokens["safetylab"].append(int(out.mask.sum()))
            return out

        rloo_module.sample = spy
        try:
            with timed_train_loop(times, Hooks(hooks.start, lambda i: (reseed(i), hooks.before(i)), hooks.after)):
                train_rloo(policy, tok, prompts, reward, reference, replace_train(config, n), run)
        finally:
            rloo_module.sample = original
        return times

    def trl_tokens():
        lengths = trainer._metrics["train"]["completions/mean_length"]
        bench.tokens["trl"].append(round(lengths[-1] * args.batch_size))

    def run_trl(n, hooks):
        return trl_train(with_steps(trainer, n), [], Hooks(hooks.start, lambda i: (reseed(i), hooks.before(i)),
                                                           hooks.after), trl_tokens)

    bench.run["safetylab"] = run_safetylab
    if floor is not None:
        bench.run["floor"] = floor.run
    if trainer is not None:
        bench.run["trl"] = run_trl
    widths = [max(len(p) for p in b) for b in prompt_ids]
    bench.describe.append(f"{per_step} prompts x k={k} samples per step, prompts of "
                          f"{min(min(len(p) for p in b) for b in prompt_ids)}-{max(widths)} tokens, "
                          f"max_new_tokens {args.max_new_tokens}, learning rate {lr:g} on every side")
    return bench


def replace_steps(train, n):
    from dataclasses import replace

    return replace(train, steps=n)


def replace_train(config, n):
    from dataclasses import replace

    return replace(config, train=replace(config.train, steps=n))


def with_steps(trainer, n):
    trainer.args.max_steps = n
    return trainer


def padding_note(batches, packed: bool = False) -> str:
    from safetylab.models.packing import pack_batch

    slots = statistics.median(b.input_ids.numel() for b in batches)
    real = statistics.median(int(b.attention_mask.sum()) for b in batches)
    prompt = statistics.median(int((b.attention_mask - b.response_mask).sum()) // 2 for b in batches)
    note = (f"median batch: {slots:.0f} padded token slots, {real:.0f} real tokens ({1 - real / slots:.0%} padding), "
            f"of which {2 * prompt:.0f} prompt tokens (each prompt twice: once with the chosen, once with the "
            f"rejected response)")
    if packed:
        note += (f"; safetylab's packed layout: "
                 f"{statistics.median(pack_batch(b).input_ids.numel() for b in batches):.0f} token slots")
    return note


MAKERS = {"rm": make_rm, "dpo": make_dpo, "rloo": make_rloo}


# ----------------------------------------------------------------------------- memory (subprocess)
def memory_child(args) -> None:
    algorithm, side = args.child.split(":")
    setup = load_setup(Path(args.data))
    with tempfile.TemporaryDirectory(prefix="safetylab-bench-mem-") as tmp:
        args.sides = {side}
        bench = MAKERS[algorithm](args, setup, Path(tmp), args.mem_steps)
        state = {}

        def start():
            state["source"] = reset_peak_rss(trim=True)
            state["before"] = peak_kib(state["source"])
            state["rss"] = status_kib("VmRSS")

        bench.run[side](args.mem_steps, Hooks(start=start))
        after = peak_kib(state["source"])
    print(json.dumps({"source": state["source"], "rss_before_kib": state["rss"],
                      "growth_kib": after - state["before"]}))


def measure_memory(args, data: Path, algorithm: str, side: str) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{algorithm}:{side}", "--data", str(data),
           "--threads", str(args.threads), "--mem-steps", str(args.mem_steps), "--batch-size", str(args.batch_size),
           "--k", str(args.k), "--max-new-tokens", str(args.max_new_tokens), "--rloo-lr", str(args.rloo_lr),
           *(f"--trl-option={k}={json.dumps(v)}" for k, v in args.trl_options)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def quiet() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    import logging

    logging.getLogger("trl").setLevel(logging.ERROR)


def time_algorithm(args, bench: Bench) -> dict:
    """Rounds of every side, in a rotating order; after each step of every side (outside its timed
    interval) the floor takes the same step on the same batch, so each side's time is also known as a
    ratio to the floor measured moments apart: the machine's slow and fast spells cancel in it."""
    import torch

    sides = [s for s in SIDES[bench.algorithm] if s != "floor" and s in bench.run]
    total, warmup = args.warmup + args.steps, args.warmup
    kept = {s: [] for s in [*sides, "floor"]}
    ratios = {s: [] for s in sides}  # per step: side / the floor step right after it
    per_round = {s: [] for s in kept}
    for r in range(args.rounds):
        order = sides[r % len(sides):] + sides[: r % len(sides)]
        for side in order:
            start = len(bench.floor.times)
            times = bench.run[side](total, Hooks(after=bench.floor.step))
            floor = bench.floor.times[start:]
            if len(times) != total or len(floor) != total:
                raise RuntimeError(f"{bench.algorithm}/{side}: timed {len(times)} steps and {len(floor)} floor steps, "
                                   f"expected {total}")
            if torch.get_num_threads() != args.threads:
                print(f"warning: torch threads changed to {torch.get_num_threads()} during {side}")
                torch.set_num_threads(args.threads)
            kept[side] += times[warmup:]
            kept["floor"] += floor[warmup:]
            ratios[side] += [t / f for t, f in zip(times[warmup:], floor[warmup:])]
            per_round[side].append(statistics.median(times[warmup:]))
        per_round["floor"].append(statistics.median(kept["floor"][-len(sides) * args.steps:]))
        print(f"  round {r}: " + ", ".join(f"{s} {per_round[s][-1] * 1e3:.1f} ms" for s in kept), flush=True)
    return {"median": {s: statistics.median(v) for s, v in kept.items()},
            "to_floor": {s: statistics.median(v) for s, v in ratios.items()},
            "rounds": per_round, "n": {s: len(v) for s, v in kept.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", choices=ALGORITHMS, action="append", help="run only this algorithm (repeatable)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per algorithm, sides rotating (default 3)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round and side (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every round (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="preference pairs per step (RM, DPO); sampled sequences per step (RLOO) (default 16)")
    parser.add_argument("--k", type=int, default=4, help="RLOO samples per prompt (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="RLOO response limit (default 48)")
    parser.add_argument("--rloo-lr", type=float, default=1e-6, help="RLOO learning rate, every side (default 1e-6)")
    parser.add_argument("--pairs", type=int, default=512, help="World().preferences(N) (default 512)")
    parser.add_argument("--prompts-per-kind", type=int, default=20, help="RLOO prompts per request kind (default 20)")
    parser.add_argument("--conversations", type=int, default=2000, help="World().corpus(N) for the tokenizer")
    parser.add_argument("--sft-demos", type=int, default=2000, help="demonstrations for the short SFT (default 2000)")
    parser.add_argument("--sft-steps", type=int, default=60, help="SFT steps, batch 32 (default 60)")
    parser.add_argument("--mem-steps", type=int, default=6, help="steps in each memory subprocess (default 6)")
    parser.add_argument("--mem-repeats", type=int, default=1, help="memory subprocesses per side (default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--trl-option", dest="trl_options", type=trl_option, action="append", default=[],
                        metavar="KEY=VALUE", help="a further setting of TRL's trainer configs, for the trainers whose "
                        "config has it (repeatable), e.g. torch_compile=true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: this benchmark needs the environment of "
                         "benchmarks/requirements-trl.txt (see benchmarks/README.md)") from None
    quiet()
    import accelerate
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    if args.child:
        memory_child(args)
        return

    algorithms = args.only or list(ALGORITHMS)
    args.sides = {s for a in algorithms for s in SIDES[a]}
    started = time.perf_counter()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
          f"trl {trl.__version__}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
          + "".join(f"; TRL option {k}={v!r}" for k, v in args.trl_options))
    with tempfile.TemporaryDirectory(prefix="safetylab-bench-align-") as tmp:
        data = Path(tmp) / "data"
        build_setup(args, data)
        setup = load_setup(data)
        n_params = sum(p.numel() for p in setup.policy.parameters())
        print(f"model: GPT-2 {setup.policy.config.n_layer} layers x {setup.policy.config.n_embd}, vocab "
              f"{len(setup.tokenizer)}, {n_params / 1e6:.2f}M parameters, fine-tuned {args.sft_steps} steps on "
              f"world demonstrations; {len(setup.rows)} preference pairs, {len(setup.prompts)} RLOO prompts; "
              f"batch {args.batch_size}; {args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed) steps")
        results = {}
        for algorithm in algorithms:
            work = Path(tmp) / algorithm
            bench = MAKERS[algorithm](args, setup, work, args.warmup + args.steps)
            print(f"\n{algorithm}: " + "; ".join(bench.describe))
            for line in bench.checks:
                print(f"  {line}")
            results[algorithm] = time_algorithm(args, bench)
            results[algorithm]["tokens"] = {s: statistics.mean(v) for s, v in bench.tokens.items() if v}
            del bench
            gc.collect()

        memory = {}
        if not args.no_memory:
            print("\npeak memory: one fresh subprocess per algorithm and side ...", flush=True)
            for algorithm in algorithms:
                for i in range(args.mem_repeats):
                    sides = [s for s in SIDES[algorithm] if s in results[algorithm]["median"]]
                    sides = sides if i % 2 == 0 else sides[::-1]
                    for side in sides:
                        memory.setdefault((algorithm, side), []).append(measure_memory(args, data, algorithm, side))
    report(args, algorithms, results, memory)
    print(f"total wall time {time.perf_counter() - started:.0f} s")


def report(args, algorithms, results, memory) -> None:
    print()
    print(f"{'algorithm':<9} {'side':<34} {'ms/step':>8} {'steps/s':>8} {'/ floor':>8}  {'round medians ms':<20} "
          f"{'tokens/step':>11}")
    for algorithm in algorithms:
        res = results[algorithm]
        for side in SIDES[algorithm]:
            if side not in res["median"]:
                continue
            ms = res["median"][side] * 1e3
            rounds = " ".join(f"{t * 1e3:.0f}" for t in res["rounds"][side])
            to_floor = res["to_floor"].get(side)
            tokens = res["tokens"].get(side)
            print(f"{algorithm:<9} {SIDE_NAMES[side]:<34} {ms:>8.1f} {1e3 / ms:>8.2f} "
                  f"{'' if to_floor is None else f'{to_floor:.3f}':>8}  {rounds:<20} "
                  f"{'' if tokens is None else f'{tokens:.0f}':>11}")
    print("(/ floor: median over steps of the step's time over that of the floor step taken right after it)")
    print()
    print("speed ratios, safetylab steps/s over the other side's (> 1: safetylab is faster): from the paired ratios "
          "to the floor (the other side's / safetylab's), and [from the raw medians]; 'equal work': safetylab in "
          "padded rows, as TRL computes; 'less work': safetylab's default, each pair's or group's prompt once")
    for algorithm in algorithms:
        med, to_floor = results[algorithm]["median"], results[algorithm]["to_floor"]
        equal_target, less_target = TARGET_TRL_SPEEDUP[algorithm]
        for side in ("trl", "trl-ref"):
            if side not in med:
                continue
            for ours, work, target in (("safetylab-padded", "equal work", equal_target),
                                       ("safetylab", "less work", less_target)):
                if ours not in med:
                    continue
                speedup, raw = to_floor[side] / to_floor[ours], med[side] / med[ours]
                verdict = ("none: TRL's default, which does more work" if side == "trl-ref" or target is None
                           else f">= {target}: " + ("meets" if speedup >= target else "MISSES"))
                print(f"  {algorithm}: {work:<10} safetylab vs {SIDE_NAMES[side]}: {speedup:.3f}x [{raw:.3f}x]  "
                      f"(target {verdict})")
        ratio = to_floor["safetylab"]
        print(f"  {algorithm}: safetylab step / floor step, the same work: {ratio:.3f} (target <= "
              f"{TARGET_FLOOR_RATIO[algorithm]}: {'meets' if ratio <= TARGET_FLOOR_RATIO[algorithm] else 'MISSES'})")
    if memory:
        print()
        print(f"peak RSS growth over {args.mem_steps} training steps, fresh subprocess per side, median of "
              f"{args.mem_repeats} (peak from {next(iter(memory.values()))[0]['source']}):")
        print(f"{'algorithm':<9} {'side':<34} {'MiB':>7} {'baseline RSS MiB':>17}  runs MiB")
        growth = {}
        for (algorithm, side), runs in memory.items():
            growth[algorithm, side] = statistics.median(m["growth_kib"] for m in runs) / 1024
            base = statistics.median(m["rss_before_kib"] for m in runs) / 1024
            each = " ".join(f"{m['growth_kib'] / 1024:.0f}" for m in runs)
            print(f"{algorithm:<9} {SIDE_NAMES[side]:<34} {growth[algorithm, side]:>7.1f} {base:>17.0f}  {each}")
        for algorithm in algorithms:
            if (algorithm, "safetylab") in growth:
                parts = [f"/ {SIDE_NAMES[s]} {growth[algorithm, 'safetylab'] / max(growth[algorithm, s], 1e-3):.3f}"
                         for s in ("safetylab-padded", "trl", "trl-ref", "floor") if (algorithm, s) in growth]
                print(f"  {algorithm}: peak memory ratio (RSS growth), safetylab " + ", ".join(parts))


if __name__ == "__main__":
    main()
