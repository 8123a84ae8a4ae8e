"""Causal-LM training under Hugging Face ``accelerate``: pre-training and supervised fine-tuning.

One short loop serves both: pre-training puts the loss on every token, SFT only on response
tokens (eos included). Batches are a pure function of (seed, step), so a run resumed from a
checkpoint repeats the uninterrupted run bit for bit on CPU; ``accelerate launch`` splits each
global batch across processes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator

from safetylab.core.config import require
from safetylab.core.devices import check_device_name, select_device
from safetylab.core.errors import SafetylabError
from safetylab.core.progress import Progress
from safetylab.core.runs import RunDir
from safetylab.core.seeding import seed_everything
from safetylab.models.conversation import encode_conversation
from safetylab.models.lm import ModelConfig, build_model, load_model, save_model
from safetylab.models.tokenizer import train_tokenizer


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_length: int = 96
    grad_clip: float = 1.0
    log_every: int = 25
    checkpoint_every: int = 250
    eval_every: int = 0  # 0: evaluate only at the end (when the loop is given an evaluation)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_length", "log_every", "checkpoint_every"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        require(self.lr > 0 and math.isfinite(self.lr), "lr", "a finite number > 0", self.lr)
        require(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        require(self.grad_clip >= 0, "grad_clip", "a number >= 0 (0: no clipping)", self.grad_clip)
        require(self.warmup_steps >= 0, "warmup_steps", "an integer >= 0", self.warmup_steps)
        require(self.eval_every >= 0 and self.eval_every % self.log_every == 0, "eval_every",
                f"0 or a multiple of log_every ({self.log_every})", self.eval_every)
        require(self.checkpoint_every % self.log_every == 0, "checkpoint_every",
                f"a multiple of log_every ({self.log_every}), so that a resumed run logs the same windows",
                self.checkpoint_every)
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        check_device_name(self.device)


@dataclass
class Example:
    """Token ids and a 0/1 loss mask of the same length."""

    ids: list[int]
    loss_mask: list[int]


def text_examples(tokenizer, lines: Sequence[str], max_length: int) -> list[Example]:
    """Pre-training examples: the loss is on every token."""
    out = []
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"][:max_length]
        out.append(Example(ids, [1] * len(ids)))
    return out


def chat_examples(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int) -> list[Example]:
    """SFT examples: the prompt then the response through its eos, in the tokenizer's chat template
    (:func:`~safetylab.models.conversation.encode_conversation`), the loss on the response side only;
    cut to ``max_length`` tokens."""
    out = []
    for prompt, response in pairs:
        p, r = encode_conversation(tokenizer, prompt, response)
        ids = (p + r)[:max_length]
        out.append(Example(ids, ([0] * len(p) + [1] * len(r))[:max_length]))
    return out


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of global batch ``step``: consecutive slices of per-epoch permutations."""
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed64(seed * 100_003 + epoch)))
        take = min(batch_size - len(out), n - offset)
        out.extend(order[offset:offset + take].tolist())
        position += take
    return out


def _seed64(seed: int) -> int:
    """``seed`` in the range torch's generators take (unchanged below 2⁶⁴), so a derived 63-bit seed
    (:func:`safetylab.core.seeding.derive_seed`) can seed a run too."""
    return seed % 2**64


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad; labels are the ids where the loss mask is 1 and −100 elsewhere."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    attention = torch.zeros(len(examples), width, dtype=torch.long)
    for i, e in enumerate(examples):
        row = torch.tensor(e.ids)
        ids[i, : len(row)] = row
        attention[i, : len(row)] = 1
        labels[i, : len(row)] = row.masked_fill(torch.tensor(e.loss_mask) == 0, -100)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Next-token cross-entropy summed over labelled tokens (label ≠ −100), divided by
    ``normalizer``: the global batch's token count over the number of processes, so that the
    gradients DDP averages equal those of one process on the whole batch. The labels are shifted,
    not the logits, so the logits are never copied."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
    ) / normalizer


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 10% (the nanoGPT schedule)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass(frozen=True)
class Step:
    """What one optimisation step of :func:`train_loop` works on: the global batch's example
    indices, this process's share of them, the device, the number of processes, this process's
    rank and the step's number (0-based)."""

    indices: list[int]
    local: list[int]
    device: torch.device
    processes: int
    rank: int = 0
    number: int = 0


StepLoss = Callable[[torch.nn.Module, Step], tuple[torch.Tensor, dict[str, float]]]


Evaluate = Callable[[torch.nn.Module], dict[str, float]]


class Trainer:
    """The optimisation side of every training loop here, for a loop to drive one update at a time:
    AdamW, warm-up and cosine decay, gradient clipping, under ``accelerate``; resume from the run's
    latest checkpoint; a guard against non-finite losses; metrics averaged over windows; evaluations
    and checkpoints. :func:`train_loop` is the plain loop over it; PPO writes its own
    (:func:`safetylab.align.ppo.train_ppo`)::

        with Trainer(model, config, run, "sft") as trainer:
            for step in range(trainer.start, config.steps):
                loss, stats = ...(trainer.model)  # this process's share of the global batch
                trainer.update(step, loss, stats)
        model = trainer.finish()

    Building it prepares ``model`` (:attr:`model`: the one to run, wrapped for DDP/FSDP when several
    processes train) and the optimiser, seeds torch's generator for this process (sampling inside
    steps repeats, and a resume restores it), and resumes: :attr:`start` is the first step to run.
    ``evaluate(model)``, if given, runs on the main process before the first step (when
    ``config.eval_every`` is set), every ``config.eval_every`` steps and at the end, in eval mode, with
    its own random stream seeded alike each time (so differences between evaluations are the policy's,
    not sampling noise, and a resumed run repeats them); its metrics join that step's record.
    ``state``: further objects with ``state_dict`` and ``load_state_dict`` (an adaptive KL controller)
    saved in each checkpoint and restored on resume. ``disable_dropout``: the model trains in eval
    mode, so dropout (and any other train-time noise) is off, as preference optimisation and RL need
    (TRL's ``disable_dropout``): the policy is then the same function as the frozen reference and the
    sampling policy it is compared with. No module's dropout probability is edited, so the caller's
    model keeps its own settings."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, run: RunDir, description: str = "train",
                 evaluate: Evaluate | None = None, state: Sequence[object] = (), disable_dropout: bool = False):
        self.config, self.run, self.description, self.evaluate = config, run, description, evaluate
        device = select_device(config.device)
        self.accelerator = accelerator = Accelerator(cpu=device.type == "cpu")
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95),
                                      fused=device.type in ("cpu", "cuda") or None)  # one kernel, not one per tensor
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if state:
            accelerator.register_for_checkpointing(*state)
        self.rank, self.processes = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        torch.manual_seed(_seed64(config.seed * 1_000 + self.rank))  # sampling in steps repeats; resume restores it
        self.start = _resume(accelerator, run)
        if self.start == 0 and config.eval_every and evaluate is not None and accelerator.is_main_process:
            run.log(0, **_evaluate(accelerator.unwrap_model(self.model), evaluate, config.seed))  # the starting point
        self.model.train(not disable_dropout)
        self.window: dict[str, list[float]] = {}
        self.progress = Progress(description, config.steps - self.start)

    def __enter__(self) -> Trainer:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def mean(self, value: float) -> float:
        """``value`` averaged over the processes."""
        return self.accelerator.reduce(torch.tensor(value, device=self.device), reduction="mean").item()

    def update(self, step: int, loss: torch.Tensor, stats: dict[str, float]) -> None:
        """One optimiser step (number ``step``, 0-based) on ``loss``; logs ``loss``, the window's means of
        ``stats`` (averaged over processes) and ``lr`` every ``config.log_every`` steps, and checkpoints
        every ``config.checkpoint_every``. A non-finite loss stops the run with an error naming the step,
        after checkpointing the last good weights (never a NaN)."""
        config, accelerator, run = self.config, self.accelerator, self.run
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        values = accelerator.reduce(torch.tensor([loss.item(), *stats.values()], device=self.device),
                                    reduction="mean").tolist()
        if not math.isfinite(values[0]):
            _checkpoint(accelerator, run, step)
            raise SafetylabError(f"{run.path}: the loss is {values[0]} at step {step + 1}; stopped, with the "
                                 f"weights of step {step} saved in {run.checkpoint_dir(step)}")
        accelerator.backward(loss)
        if config.grad_clip:
            accelerator.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for name, value in zip(("loss", *stats), values):
            self.window.setdefault(name, []).append(value)
        self.progress.advance(1, loss=values[0])
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            if accelerator.is_main_process:
                means = {k: round(sum(v) / len(v), 6) for k, v in self.window.items()}
                due = done == config.steps or (config.eval_every and done % config.eval_every == 0)
                extra = _evaluate(accelerator.unwrap_model(self.model), self.evaluate, config.seed) if due else {}
                run.log(done, **means, lr=round(lr_at(step, config), 8), **extra)
            self.window = {}
        if done % config.checkpoint_every == 0 and done < config.steps:
            _checkpoint(accelerator, run, done)

    def finish(self) -> torch.nn.Module:
        """The trained model, unwrapped, in eval mode."""
        self.model.eval()
        return self.accelerator.unwrap_model(self.model)


def train_loop(model: torch.nn.Module, n_examples: int, step_loss: StepLoss, config: TrainConfig, run: RunDir,
               description: str = "train", evaluate: Evaluate | None = None, state: Sequence[object] = (),
               disable_dropout: bool = False) -> torch.nn.Module:
    """The one training loop over examples, on a :class:`Trainer` (which says what ``evaluate``,
    ``state`` and ``disable_dropout`` do): each step, ``step_loss(model, step)`` computes the loss on
    ``step.local``, this process's share of the global batch :func:`batch_indices` draws; logs
    ``loss``, the mean over each window of the statistics ``step_loss`` returns (averaged over
    processes) and ``lr``."""
    if n_examples < 1:
        raise SafetylabError(f"{run.path}: no training examples")
    with Trainer(model, config, run, description, evaluate, state, disable_dropout) as trainer:
        for step in range(trainer.start, config.steps):
            indices = batch_indices(n_examples, config.batch_size, config.seed, step)
            loss, stats = step_loss(trainer.model, Step(indices, indices[trainer.rank::trainer.processes],
                                                        trainer.device, trainer.processes, trainer.rank, step))
            trainer.update(step, loss, stats)
    return trainer.finish()


def train_lm(model, tokenizer, examples: Sequence[Example], config: TrainConfig, run: RunDir,
             description: str = "train"):
    """Train a causal LM on ``examples`` with :func:`train_loop`; logs ``loss``, ``tokens`` (labelled
    tokens per global batch, averaged over the window) and ``lr``."""

    def step_loss(model, step: Step):
        tokens = sum(sum(examples[i].loss_mask[1:]) for i in step.indices)
        batch = collate([examples[i] for i in step.local], tokenizer.pad_token_id)
        batch = {k: v.to(step.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return lm_loss(logits, batch["labels"], max(tokens, 1) / step.processes), {"tokens": float(tokens)}

    return train_loop(model, len(examples), step_loss, config, run, description)


def _evaluate(model: torch.nn.Module, evaluate, seed: int) -> dict[str, float]:
    if evaluate is None:
        return {}
    training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        metrics = evaluate(model)
    model.train(training)
    return metrics


def _checkpoint(accelerator: Accelerator, run: RunDir, step: int) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        def write(directory: Path) -> None:
            accelerator.save_state(str(directory), safe_serialization=True)
            (directory / "step.json").write_text(json.dumps({"step": step}))
        run.save_checkpoint(step, write)
    accelerator.wait_for_everyone()


def _resume(accelerator: Accelerator, run: RunDir) -> int:
    latest = run.latest_checkpoint()
    if latest is None:
        run.truncate_metrics(lambda r: False)
        return 0
    step, directory = latest
    try:
        accelerator.load_state(str(directory))
    except Exception as e:  # noqa: BLE001 - any failure means the checkpoint cannot be trusted
        raise SafetylabError(f"{directory}: corrupt checkpoint ({type(e).__name__}: {e}); delete it to restart "
                             "from the one before") from None
    run.truncate_metrics(lambda r: r["step"] <= step)
    print(f"resuming {run.path} from step {step}", flush=True)
    return step



def pretrain(lines: Sequence[str], model_config: ModelConfig, config: TrainConfig, run: RunDir):
    """Train the world tokenizer and a fresh model on ``lines``; save both to ``artifacts/model``.

    A finished run (its model saved) is loaded instead of retrained.
    """
    final = run.artifacts / "model"
    if final.exists():
        return load_model(final)
    tokenizer = train_tokenizer(lines)
    seed_everything(config.seed)
    model = build_model(model_config, tokenizer)
    model = train_lm(model, tokenizer, text_examples(tokenizer, lines, config.max_length), config, run, "pre-train")
    save_model(model, tokenizer, final)
    return model, tokenizer


def finetune(model, tokenizer, pairs: Sequence[tuple[str, str]], config: TrainConfig, run: RunDir,
             replay: Sequence[str] = ()):
    """Supervised fine-tuning on (prompt, response) pairs; saves to ``artifacts/model``.

    ``replay`` lines of pre-training text are mixed in with the loss on every token, so the model
    keeps what it knew (the pre-training mix of InstructGPT's PPO-ptx, Ouyang et al. 2022, applied
    to SFT): without it, fine-tuning on questions about some entities teaches a small model to
    name only those entities."""
    final = run.artifacts / "model"
    if final.exists():
        return load_model(final)
    seed_everything(config.seed)
    examples = chat_examples(tokenizer, pairs, config.max_length) + text_examples(tokenizer, replay, config.max_length)
    model = train_lm(model, tokenizer, examples, config, run, "sft")
    save_model(model, tokenizer, final)
    return model, tokenizer


@dataclass(frozen=True)
class AssistantConfig:
    """The world assistant a study trains for itself when no model is handed in (the align study's default
    sizes): ``corpus_conversations`` of pre-training text, ``demonstrations`` for SFT, the model's shape and
    the two trainings' settings."""

    corpus_conversations: int = 12_000
    demonstrations: int = 3_000
    model: ModelConfig = field(default_factory=ModelConfig)
    base: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, batch_size=32, lr=3e-3))
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, batch_size=32, lr=1e-3, warmup_steps=20))

    def __post_init__(self):
        for name in ("corpus_conversations", "demonstrations"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1",
                    getattr(self, name))

    def seeded(self, seed: int, device: str) -> AssistantConfig:
        """The same assistant with both trainings on ``seed`` and ``device``."""
        return replace(self, base=replace(self.base, seed=seed, device=device),
                       sft=replace(self.sft, seed=seed, device=device))


# the quick studies' assistant: two layers of 64, a few hundred steps
QUICK_ASSISTANT = AssistantConfig(
    corpus_conversations=4_000, demonstrations=1_000, model=ModelConfig(n_layer=2, n_head=4, n_embd=64),
    base=TrainConfig(steps=300, batch_size=32, lr=5e-3),
    sft=TrainConfig(steps=120, batch_size=32, lr=2e-3, warmup_steps=10))


def train_world_assistant(world, out: str | Path, config: AssistantConfig = AssistantConfig()) -> Path:
    """A world assistant as the align study makes it, for the studies that need one of their own: pre-training
    on ``world.corpus(config.corpus_conversations)`` in ``out/base``, then SFT on the world's demonstrations
    with half as many knowledge lines of the corpus replayed, in ``out/sft``. Returns the SFT model's directory
    (a finished run is reused)."""
    from dataclasses import asdict

    out = Path(out)
    corpus = world.corpus(config.corpus_conversations)
    base_run = RunDir(out / "base", {"model": asdict(config.model), "train": asdict(config.base),
                                     "lines": len(corpus)})
    model, tokenizer = pretrain(corpus, config.model, config.base, base_run)
    demos = world.demonstrations(config.demonstrations)
    replay = [line for line in corpus if not line.startswith("<user>")][: len(demos) // 2]
    sft_run = RunDir(out / "sft", {"train": asdict(config.sft), "demonstrations": len(demos), "replay": len(replay)})
    finetune(model, tokenizer, [(d["prompt"], d["response"]) for d in demos], config.sft, sft_run, replay)
    return sft_run.artifacts / "model"
