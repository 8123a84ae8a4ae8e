"""One training step of the tiny world model: safetylab's ``train_lm`` against the bare-PyTorch floor.

safetylab's step is the real code path: ``train_lm`` itself is called for ``warmup + steps`` steps
per round (a fresh ``accelerate.Accelerator(cpu=True)``, ``AdamW`` and ``RunDir`` in a temporary
directory each call, as in the audit; logging and checkpointing pushed past the last step). Per-step
times are the intervals between successive ``Progress.advance`` calls of its loop, recorded by a thin
subclass patched into ``safetylab.models.train`` — so each interval is one whole loop body as the
audit runs it: ``batch_indices``, ``collate``, ``lr_at``, forward and loss, ``accelerator.backward``,
``accelerator.clip_grad_norm_``, ``optimizer.step``, ``zero_grad``, reading the loss back, the token
count and the progress update.

The floor is a plain ``GPT2LMHeadModel`` of the same config and weights, trained on the very same
batch tensors (pre-built with ``batch_indices`` + ``collate``, so the data work is *not* in the floor):
``model(**batch).loss.backward()``, ``torch.nn.utils.clip_grad_norm_``, ``AdamW.step()``,
``zero_grad``. (Its loss is Hugging Face's own mean token loss from ``labels``; ``train_lm`` calls the
model without labels and takes ``lm_loss`` of the logits, a token-summed cross-entropy: the same
model work, a different few lines of loss code.)

The two alternate step by step: every round is one ``train_lm`` call, and after each of its steps
(from its ``Progress.advance``, outside safetylab's timed interval) the floor takes the same step on
the same batch with its own timer, so machine noise hits both alike. The first ``warmup`` steps of
every round (optimizer state allocation, allocator warm-up) are dropped; medians are over the rest.
Peak memory: each side runs alone in a fresh subprocess, and the growth of the peak RSS over the
training steps (baseline taken after imports, data and model are ready) is compared, for the first
training call of the process (cold) and for a second one (warm); medians over a few subprocesses
per side, since the allocator makes single readings jump by tens of MiB. The peak is
``VmHWM`` reset through ``/proc/self/clear_refs`` just before the steps (see ``reset_peak_rss``:
``ru_maxrss`` is unusable here), with ``ru_maxrss`` as the fallback where the reset is refused.

    python benchmarks/train_step.py                 # 1 thread, 5 rounds x 40 steps
    python benchmarks/train_step.py --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_memory import peak_kib, reset_peak_rss, status_kib

TARGET_TIME_RATIO = 1.15


# ----------------------------------------------------------------------------- setup
def build_data(conversations: int, max_length: int):
    """The world corpus, its tokenizer and the pre-training examples (as ``pretrain`` builds them)."""
    from safetylab.models.tokenizer import train_tokenizer
    from safetylab.models.train import text_examples
    from safetylab.world import World

    lines = World().corpus(conversations)
    tokenizer = train_tokenizer(lines)
    return tokenizer, text_examples(tokenizer, lines, max_length)


def train_config(args, steps: int):
    from safetylab.models.train import TrainConfig

    # The audit's pre-training config, except that logging and checkpoints never fire inside the
    # timed steps (train_lm still logs once after the last step, outside every timed interval).
    return TrainConfig(steps=steps, batch_size=args.batch_size, log_every=10**9, checkpoint_every=10**9,
                       device="cpu", seed=0)


def build_models(tokenizer):
    """safetylab's model (``build_model`` with the audit's default ``ModelConfig``) and a plain
    ``GPT2LMHeadModel`` of the same config holding the same initial weights."""
    import torch
    from transformers import GPT2LMHeadModel

    from safetylab.models.lm import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(), tokenizer)
    floor = GPT2LMHeadModel(copy.deepcopy(model.config))
    floor.load_state_dict(model.state_dict())
    return model, floor


def prebuilt_batches(examples, tokenizer, config):
    """The exact batches ``train_lm`` builds for steps ``0 .. config.steps-1`` (one process)."""
    from safetylab.models.train import batch_indices, collate

    return [collate([examples[i] for i in batch_indices(len(examples), config.batch_size, config.seed, step)],
                    tokenizer.pad_token_id) for step in range(config.steps)]


# ----------------------------------------------------------------------------- the two steps
class FloorStepper:
    """The bare-PyTorch step on pre-built batches, with its own fresh ``AdamW`` (as ``train_lm``
    makes one per call, with the same hyper-parameters)."""

    def __init__(self, model, batches, config):
        import torch

        self.torch, self.model, self.batches, self.config = torch, model, batches, config
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           betas=(0.9, 0.95))
        self.times: list[float] = []
        model.train()

    def step(self, i: int) -> None:
        start = time.perf_counter()
        self.model(**self.batches[i]).loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)


@contextlib.contextmanager
def timed_progress(times: list[float], between=None):
    """Patch ``safetylab.models.train.Progress`` so that each ``advance`` (the last statement of
    train_lm's step but for the log/checkpoint checks) closes one timed interval; ``between(i)``, if
    given, then runs outside every safetylab interval (the interleaved floor step)."""
    import safetylab.models.train as train_module

    original = train_module.Progress

    class TimedProgress(original):
        def __enter__(self):
            out = super().__enter__()
            self._last = time.perf_counter()
            return out

        def advance(self, n=1, **values):
            super().advance(n, **values)
            times.append(time.perf_counter() - self._last)
            if between is not None:
                between(len(times) - 1)
            self._last = time.perf_counter()

    train_module.Progress = TimedProgress
    try:
        yield
    finally:
        train_module.Progress = original


def run_safetylab(model, tokenizer, examples, config, workdir: Path, tag: str, between=None) -> list[float]:
    """``train_lm`` for ``config.steps`` steps; returns its per-step times (seconds)."""
    from safetylab.core.runs import RunDir
    from safetylab.models.train import train_lm

    times: list[float] = []
    run = RunDir(workdir / tag, {"benchmark": tag})
    # Progress prints a few plain lines to stderr off a terminal; keep the benchmark output clean.
    with timed_progress(times, between), contextlib.redirect_stderr(io.StringIO()):
        train_lm(model, tokenizer, examples, config, run, description=tag)
    return times


def run_floor(model, batches, config) -> list[float]:
    """The floor alone for ``len(batches)`` steps; returns its per-step times (seconds)."""
    stepper = FloorStepper(model, batches, config)
    for i in range(len(batches)):
        stepper.step(i)
    model.eval()
    return stepper.times


def check_same_batches(model, tokenizer, examples, batches, args, workdir: Path) -> bool:
    """Two steps of ``train_lm`` with ``collate`` spied on: does it build exactly our batches?"""
    import torch

    import safetylab.models.train as train_module
    from safetylab.core.runs import RunDir

    seen = []
    original = train_module.collate

    def spy(examples_, pad_id):
        out = original(examples_, pad_id)
        seen.append(out)
        return out

    train_module.collate = spy
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            train_module.train_lm(copy.deepcopy(model), tokenizer, examples, train_config(args, 2),
                                  RunDir(workdir / "check", {"benchmark": "check"}), "check")
    finally:
        train_module.collate = original
    return len(seen) == 2 and all(
        all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(seen, batches[:2]))


# ----------------------------------------------------------------------------- memory (subprocess)
def memory_child(args) -> None:
    import accelerate  # noqa: F401 - imported before the baseline on both sides
    import torch
    from transformers import AutoTokenizer

    from safetylab.models.train import Example

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer", local_files_only=True)
    examples = [Example(ids, mask) for ids, mask in json.loads((data / "examples.json").read_text())]
    model, floor = build_models(tokenizer)
    config = train_config(args, args.mem_steps)
    batches = prebuilt_batches(examples, tokenizer, config) if args.child == "floor" else None
    if args.child == "safetylab":
        del floor
    else:
        del model
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        # "cold": the first training call of a fresh process (what a user's run pays, lazy
        # initialisation included); "warm": a second call in the same process.
        for phase in ("cold", "warm"):
            gc.collect()
            source = reset_peak_rss()
            before = peak_kib(source)
            rss_before = status_kib("VmRSS")
            if args.child == "safetylab":
                run_safetylab(model, tokenizer, examples, config, Path(tmp), f"memory-{phase}")
            else:
                run_floor(floor, batches, config)
            after = peak_kib(source)
            out[phase] = {"source": source, "rss_before_kib": rss_before, "peak_after_kib": after,
                          "growth_kib": after - before}
    print(json.dumps(out))


def measure_memory(args, data_dir: Path, which: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--data", str(data_dir), "--threads", str(args.threads),
           "--mem-steps", str(args.mem_steps), "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round and side (default 40)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, one train_lm call each (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every round (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--conversations", type=int, default=2000, help="World().corpus(N) (default 2000)")
    parser.add_argument("--mem-steps", type=int, default=5, help="steps per call in each memory subprocess (default 5)")
    parser.add_argument("--mem-repeats", type=int, default=3, help="memory subprocesses per side (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--child", choices=("safetylab", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # the floor's "loss_type=None" notice, once per process
    torch.set_num_threads(args.threads)
    if args.child:
        memory_child(args)
        return

    import accelerate

    from safetylab.models.train import TrainConfig

    started = time.perf_counter()
    tokenizer, examples = build_data(args.conversations, TrainConfig().max_length)
    config = train_config(args, args.warmup + args.steps)
    batches = prebuilt_batches(examples, tokenizer, config)
    model, floor = build_models(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = statistics.median(b["input_ids"].numel() for b in batches)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"model: GPT-2 {model.config.n_layer} layers x {model.config.n_embd}, vocab {len(tokenizer)}, "
          f"{n_params / 1e6:.2f}M parameters, attention {model.config._attn_implementation}; "
          f"{len(examples)} examples, batch {args.batch_size}, median padded batch {tokens:.0f} tokens")
    print("safetylab step: timed inside train_lm itself (per-step timestamps from its Progress.advance), "
          "not a replica of its loop")

    with tempfile.TemporaryDirectory(prefix="safetylab-bench-") as tmp:
        workdir = Path(tmp)
        same = check_same_batches(model, tokenizer, examples, batches, args, workdir)
        print(f"train_lm builds the same batch tensors as the floor uses: {'yes' if same else 'NO'}")

        rows = []
        sl_all, fl_all, pair_ratios = [], [], []
        for r in range(args.rounds):
            # One train_lm call per round; after each of its steps the floor takes the same step
            # on the same batch, so the two alternate step by step and share the machine's noise.
            floor_stepper = FloorStepper(floor, batches, config)
            sl = run_safetylab(model, tokenizer, examples, config, workdir, f"round-{r}", floor_stepper.step)
            sl = sl[args.warmup:]
            fl = floor_stepper.times[args.warmup:]
            floor.eval()
            if torch.get_num_threads() != args.threads:
                print(f"warning: torch threads changed to {torch.get_num_threads()} during the round")
            sl_all += sl
            fl_all += fl
            pair_ratios += [a / b for a, b in zip(sl, fl)]
            rows.append((r, statistics.median(sl), statistics.median(fl)))

        # What the data pipeline alone costs per step (part of safetylab's step, not of the floor's).
        from safetylab.models.train import batch_indices, collate
        data_times = []
        for step in range(config.steps):
            t0 = time.perf_counter()
            collate([examples[i] for i in batch_indices(len(examples), config.batch_size, config.seed, step)],
                    tokenizer.pad_token_id)
            data_times.append(time.perf_counter() - t0)

    print()
    print(f"median step time, {args.warmup} warm-up steps dropped per round")
    print(f"{'round':>5}  {'safetylab ms':>12}  {'floor ms':>9}  {'ratio':>6}")
    for r, sl, fl in rows:
        print(f"{r:>5}  {sl * 1e3:>12.2f}  {fl * 1e3:>9.2f}  {sl / fl:>6.3f}")
    sl_med, fl_med = statistics.median(sl_all), statistics.median(fl_all)
    ratio = sl_med / fl_med
    print(f"{'all':>5}  {sl_med * 1e3:>12.2f}  {fl_med * 1e3:>9.2f}  {ratio:>6.3f}   ({len(sl_all)} steps each)")
    print(f"data pipeline inside safetylab's step (batch_indices + collate): "
          f"{statistics.median(data_times) * 1e3:.2f} ms/step median")
    verdict = "meets" if ratio <= TARGET_TIME_RATIO else "MISSES"
    round_ratio = statistics.median(sl / fl for _, sl, fl in rows)
    print(f"time ratio (median step, safetylab / floor): {ratio:.3f}  "
          f"(target <= {TARGET_TIME_RATIO}: {verdict}; median of paired per-step ratios "
          f"{statistics.median(pair_ratios):.3f}, of per-round ratios {round_ratio:.3f})")

    if not args.no_memory:
        with tempfile.TemporaryDirectory(prefix="safetylab-bench-data-") as tmp:
            data_dir = Path(tmp)
            tokenizer.save_pretrained(data_dir / "tokenizer")
            (data_dir / "examples.json").write_text(json.dumps([[e.ids, e.loss_mask] for e in examples]))
            mem = {"safetylab": [], "floor": []}
            for i in range(args.mem_repeats):  # alternate the sides, as for time
                for side in (("safetylab", "floor") if i % 2 == 0 else ("floor", "safetylab")):
                    mem[side].append(measure_memory(args, data_dir, side))
        print()
        print(f"peak RSS growth over {args.mem_steps} training steps, fresh subprocess per side, "
              f"median of {args.mem_repeats} (peak from {mem['floor'][0]['cold']['source']}):")
        print(f"{'side':>9}  {'cold MiB':>9}  {'warm MiB':>9}  {'baseline RSS MiB':>16}  cold runs MiB")
        growth = {}
        for side, runs in mem.items():
            growth[side] = {phase: statistics.median(m[phase]["growth_kib"] for m in runs) / 1024
                            for phase in ("cold", "warm")}
            base = statistics.median(m["cold"]["rss_before_kib"] for m in runs) / 1024
            each = " ".join(f"{m['cold']['growth_kib'] / 1024:.0f}" for m in runs)
            print(f"{side:>9}  {growth[side]['cold']:>9.1f}  {growth[side]['warm']:>9.1f}  {base:>16.0f}  {each}")
        for phase in ("cold", "warm"):
            ratio_mem = growth["safetylab"][phase] / max(growth["floor"][phase], 1e-3)
            print(f"peak memory ratio ({phase}, RSS growth, safetylab / floor): {ratio_mem:.3f}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
