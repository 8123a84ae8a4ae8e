"""Interpretability tools: safetylab.interp's caches and SAE training against TransformerLens, nnsight and SAELens.

Three parts, each run by the environment that has its peers (TransformerLens 4.x, which the cache part needs,
and SAELens 6.54, which needs TransformerLens < 4, cannot share one environment):

**cache** (TransformerLens 4.3, nnsight 0.8). A GPT-2 built from a config, nothing downloaded: 4 layers,
d_model 128, 4 heads, vocabulary 1,000, 64 positions, random weights (seed 0), eval mode; one batch of 32 ×
64 random tokens. Every side returns the logits and the model's five residual streams: the stream entering
block 0 and the stream leaving each of the four blocks (TransformerLens's ``blocks.0.hook_resid_pre`` and
``blocks.L.hook_resid_post``), all under ``torch.no_grad()``:

- *plain*: ``model(input_ids=ids)``, no cache (the floor of the floor: what caching costs is the rest);
- *torch hooks*: a forward pre-hook on block 0 and forward hooks on the four blocks, each storing its
  tensor detached, registered before the call and removed after it (the least work a cache can do);
- *safetylab*: ``Hooks(model).run_with_cache(input_ids=ids, names=["blocks.0.resid_pre",
  *hooks.names_like("resid_post")])``, ``Hooks`` built once;
- *TransformerLens* 4.3: its ``TransformerBridge`` around the same model, built offline by
  ``transformer_lens.model_bridge.sources._bridge_builder.build_bridge_from_module(model,
  "GPT2LMHeadModel", hf_config=model.config)`` (the loader behind ``TransformerBridge.boot_transformers``,
  which wants a Hub name; without a tokenizer nothing is fetched), then ``bridge.run_with_cache(ids,
  names_filter=[...the five names...])`` with its default ``ActivationCache``. The bridge rebuilds the
  model's modules in place, so it wraps a deep copy (same weights);
- *nnsight* 0.8: ``NNsight(copy)`` (its generic wrapper; ``LanguageModel`` insists on a tokenizer), and
  ``with model.trace(ids):`` saving ``transformer.h[0].input`` and ``transformer.h[L].output`` and the
  output.

Each side's five tensors must agree with the torch-hooks floor's (``allclose``, atol 1e-5) and its logits
with the plain forward's.

**sae** (SAELens 6.54). Fixed activations: ``--sae-batches`` batches of 4,096 samples of
``safetylab.interp.synthetic`` (d 128), cycled. An SAE of 8 × 128 = 1,024 latents, ReLU with the L1 penalty
weighted by decoder norms (λ 5, warm-up 5 % of the steps) and TopK (k 32), Adam (lr 1e-3, betas 0.9 and
0.999), gradients clipped to norm 1 (both libraries do), the learning rate decayed linearly to 0 over the
last 20 % of steps, inputs scaled by one number to ``E‖x‖² = d``. One timed call trains a fresh SAE for
``--sae-steps`` steps:

- *safetylab*: ``train_sae(batches, SAEConfig(kind, d_in=128, expansion=8, k=32, lr=1e-3, steps=N))``
  (the SAE, optimiser and schedule built inside, as a user's call does);
- *SAELens*: a ``StandardTrainingSAE`` (``apply_b_dec_to_input=False``, ``decoder_init_norm=0.1``:
  Anthropic's April 2024 set-up, which ours follows) or ``TopKTrainingSAE`` (its defaults, so
  ``rescale_acts_by_decoder_norm`` and AuxK coefficient 1), ``normalize_activations=
  "expected_average_only_in"``, an ``SAETrainer`` (wandb off, ``lr_decay_steps`` 20 % of N,
  ``l1_warm_up_steps`` 5 %), its scaling factor set from the first batch (``fit`` would estimate it over
  batches first), then N × ``trainer.maybe_reset_sparsity(); trainer.step(batch); trainer.n_training_steps
  += 1`` (``fit``'s loop without its progress bar and checkpoint checks);
- *floor*: four tensors and ``torch.optim.Adam``; per step ``z = x @ W_e + b_e``, ReLU or TopK,
  ``x̂ = f @ W_d + b_d``, ``E‖x − x̂‖²`` (+ ``λ Σ f_i ‖W_d,i‖`` for ReLU), backward, Adam step: no clipping,
  schedule, scaling, decoder normalisation or dead-latent bookkeeping.

Vectors per second = N × 4,096 / the call's time. Dead latents need 1,000 steps without firing, so AuxK is
inactive in these short calls on both sides (as in the first 1,000 steps of any run).

**recovery** (SAELens 6.54). The synthetic benchmark with known features (1,024 unit directions in d 128,
each active with p = 0.01, magnitudes U[0, 1], noise σ 0.01): ``safetylab.interp.synthetic.run_benchmark``
for ``--recovery-steps`` steps of 4,096 fresh samples (5,000: the budget ``sae.DEFAULT_LR`` was tuned at),
and SAELens's ``SAETrainer.fit`` with the settings above on the same sample stream for the same number of
steps; mean best cosine of the true directions with the decoder rows (signed), L0 and FVU on 65,536 held-out
samples. With ``--recovery-budget benchmark`` both sides train at the synthetic benchmark's settings instead
(``safetylab.interp.synthetic.benchmark_config``: 10,000 steps of 1,024, SAELens's toy budget; ReLU λ 2, TopK
k 16), the settings docs/results.md reports.

Timing: ``--rounds`` rounds after one warm-up call per side; in each round every side runs ``--repeats``
samples, the sides in a rotating order. A side's round time is the median of its samples; a ratio is the
median over rounds of two sides' round times taken moments apart (the quartiles of the per-round ratios
beside it, the ratio of the overall medians in brackets), so the shared machine's slow and fast spells
cancel. One process, ``--threads`` torch threads (1 by default). The load average is printed at the start
and the end.

Peak memory: torch's CPU allocator is invisible to ``tracemalloc``, so each side runs alone in a fresh
subprocess (``--mem-repeats`` of them, median) and the growth of its peak RSS over ``--mem-calls`` calls is
read, from a baseline taken right before the first call after imports, the model or data and the side's
wrapper are built and after ``malloc_trim`` (``VmHWM`` reset through ``/proc/self/clear_refs``, see
``peak_memory.py``). Every SAE child imports SAELens first, so the three sides start from the same process state
(otherwise the allocator reuses the memory SAELens's imports freed, and its growth reads lower).

Targets: caching ≤ 1.05× the plain forward and at least as fast as TransformerLens and nnsight; SAE
training ≥ 1.3× SAELens's vectors/s and within 1.1× of the floor's time, with equal or better recovery at
equal steps.

    .venv-interp/bin/python benchmarks/interp_vs_peers.py              # cache, about 2 minutes
    .venv-saelens/bin/python benchmarks/interp_vs_peers.py --only sae  # about 3 minutes
    .venv-saelens/bin/python benchmarks/interp_vs_peers.py --only recovery   # 4 runs of 5,000 steps: long

The environments: ``benchmarks/requirements-interp.txt`` and ``benchmarks/requirements-saelens.txt``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

from peak_memory import peak_kib, reset_peak_rss, status_kib

SEED = 0
# cache
N_LAYER, D_MODEL, N_HEAD, VOCAB, N_POS = 4, 128, 4, 1000, 64
BATCH, SEQ = 32, 64
CACHE_SIDES = ("plain", "hooks", "safetylab", "transformerlens", "nnsight")
CACHE_NAMES = {"plain": "plain HF forward", "hooks": "torch forward hooks", "safetylab": "safetylab Hooks",
               "transformerlens": "TransformerLens bridge", "nnsight": "nnsight trace"}
TARGET_CACHE_FLOOR = 1.05  # safetylab time / plain forward time
# sae
D_IN, EXPANSION, K, SAE_BATCH, LR, L1 = 128, 8, 32, 4096, 1e-3, 5.0
SAE_KINDS = ("relu", "topk")
SAE_SIDES = ("safetylab", "saelens", "floor")
SAE_NAMES = {"safetylab": "safetylab train_sae", "saelens": "SAELens SAETrainer.step", "floor": "floor (bare PyTorch)"}
TARGET_SAE_PEER, TARGET_SAE_FLOOR = 1.3, 1.1  # speed vs SAELens (>=), time vs the floor (<=)
PARTS = ("cache", "sae", "recovery")
PEERS = {"cache": ("transformer_lens", "nnsight"), "sae": ("sae_lens",), "recovery": ("sae_lens",)}


# ----------------------------------------------------------------------------- timing
def time_sides(run: dict[str, Callable], rounds: int, repeats: int, label: str) -> dict[str, list[float]]:
    """Per side, one time per round (the median of ``repeats`` samples); sides in a rotating order."""
    sides = list(run)
    per_round: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        samples: dict[str, list[float]] = {s: [] for s in sides}
        for _ in range(repeats):
            for side in order:
                start = time.perf_counter()
                run[side]()
                samples[side].append(time.perf_counter() - start)
        for side in sides:
            per_round[side].append(statistics.median(samples[side]))
        print(f"  ... {label} round {r + 1}/{rounds}: "
              + ", ".join(f"{s} {per_round[s][-1] * 1e3:.1f} ms" for s in sides), flush=True)
    return per_round


def paired_ratio(per_round, a: str, b: str) -> float:
    """Median over rounds of a's round time / b's."""
    return statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))


def ratio_spread(per_round, a: str, b: str) -> str:
    ratios = [x / y for x, y in zip(per_round[a], per_round[b])]
    if len(ratios) < 4:
        return "(too few rounds for quartiles)"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"({q1:.3f}-{q3:.3f})"


def raw_ratio(per_round, a: str, b: str) -> float:
    return statistics.median(per_round[a]) / statistics.median(per_round[b])


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


# ----------------------------------------------------------------------------- cache
def build_gpt2():
    """The random 4-layer GPT-2 (eval mode) and the batch of token ids."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = GPT2Config(n_layer=N_LAYER, n_embd=D_MODEL, n_head=N_HEAD, vocab_size=VOCAB, n_positions=N_POS,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED))
    return model, ids


def cache_sides(model, ids, sides) -> dict[str, Callable]:
    """One callable per side: ``(logits, [the five residual streams])``. Only the sides' own libraries are
    imported (a memory subprocess sees nothing else)."""
    import torch

    run: dict[str, Callable] = {}
    if "plain" in sides:
        def plain():
            with torch.no_grad():
                return model(input_ids=ids).logits, []
        run["plain"] = plain
    if "hooks" in sides:
        blocks = model.transformer.h

        def hooks():
            stored = {}

            def keep(name):
                return lambda module, args, output: stored.__setitem__(name, output.detach())
            handles = [blocks[0].register_forward_pre_hook(
                lambda module, args: stored.__setitem__("pre", args[0].detach()))]
            handles += [block.register_forward_hook(keep(i)) for i, block in enumerate(blocks)]
            try:
                with torch.no_grad():
                    logits = model(input_ids=ids).logits
            finally:
                for handle in handles:
                    handle.remove()
            return logits, [stored["pre"], *(stored[i] for i in range(len(blocks)))]
        run["hooks"] = hooks
    if "safetylab" in sides:
        from safetylab.interp.hooks import Hooks

        ours = Hooks(model)
        names = ["blocks.0.resid_pre", *ours.names_like("resid_post")]

        def safetylab():
            output, cache = ours.run_with_cache(input_ids=ids, names=names)
            return output.logits, [cache[n] for n in names]
        run["safetylab"] = safetylab
    if "transformerlens" in sides:
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        twin = copy.deepcopy(model)
        bridge = build_bridge_from_module(twin, "GPT2LMHeadModel", hf_config=twin.config)
        tl_names = ["blocks.0.hook_resid_pre", *(f"blocks.{i}.hook_resid_post" for i in range(N_LAYER))]

        def transformerlens():
            with torch.no_grad():
                logits, cache = bridge.run_with_cache(ids, names_filter=tl_names)
            return logits, [cache[n] for n in tl_names]
        run["transformerlens"] = transformerlens
    if "nnsight" in sides:
        from nnsight import NNsight

        wrapped = NNsight(copy.deepcopy(model))

        def nnsight():
            streams = []
            with torch.no_grad():
                with wrapped.trace(ids):
                    streams.append(wrapped.transformer.h[0].input.save())
                    for i in range(N_LAYER):
                        streams.append(wrapped.transformer.h[i].output.save())
                    output = wrapped.output.save()
            return output.logits, list(streams)
        run["nnsight"] = nnsight
    return {s: f for s, f in run.items() if s in sides}


def cache_checks(run) -> list[str]:
    """Each side's streams against the torch-hooks floor's, its logits against the plain forward's."""
    import torch

    results = {side: fn() for side, fn in run.items()}
    ref_logits, ref_streams = results["plain"][0], results["hooks"][1]
    lines = []
    for side, (logits, streams) in results.items():
        logit_gap = (logits - ref_logits).abs().max().item()
        line = f"{CACHE_NAMES[side]:<24} logits max |diff| {logit_gap:.1e}"
        if side != "plain":
            gaps = [(a - b).abs().max().item() for a, b in zip(streams, ref_streams)]
            agree = len(streams) == len(ref_streams) and all(
                a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(streams, ref_streams))
            line += (f"; {len(streams)} streams {tuple(streams[0].shape)}, max |diff| to the hooks' "
                     f"{max(gaps):.1e}: {'agree' if agree else 'DISAGREE'}")
        lines.append(line)
    return lines


def run_cache(args) -> dict:
    import torch

    model, ids = build_gpt2()
    print(f"\ncache: GPT-2 from a config, {N_LAYER} layers, d {D_MODEL}, {N_HEAD} heads, vocab {VOCAB}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, attention {model.config._attn_implementation}; "
          f"batch {BATCH} x {SEQ} tokens; 5 residual streams cached", flush=True)
    run = cache_sides(model, ids, set(CACHE_SIDES))
    for line in cache_checks(run):
        print(f"  {line}")
    with torch.no_grad():
        for fn in run.values():
            fn()
    return time_sides(run, args.rounds, args.repeats, "cache")


def report_cache(args, rounds, memory) -> None:
    print()
    print(f"caching 5 residual streams, batch {BATCH} x {SEQ}, median ms per call; ratios are medians of the "
          "per-round ratios (quartiles) [ratio of the medians]")
    print(f"{'side':<24} {'ms/call':>8} {'/ plain forward':>28}")
    for side in CACHE_SIDES:
        cell = f"{paired_ratio(rounds, side, 'plain'):.3f} {ratio_spread(rounds, side, 'plain')}"
        print(f"{CACHE_NAMES[side]:<24} {statistics.median(rounds[side]) * 1e3:>8.1f} {cell:>28} "
              f"[{raw_ratio(rounds, side, 'plain'):.3f}]")
    floor = paired_ratio(rounds, "safetylab", "plain")
    print(f"  safetylab / plain forward {floor:.3f} (target <= {TARGET_CACHE_FLOOR}: "
          f"{'meets' if floor <= TARGET_CACHE_FLOOR else 'MISSES'}); / torch hooks "
          f"{paired_ratio(rounds, 'safetylab', 'hooks'):.3f} {ratio_spread(rounds, 'safetylab', 'hooks')}")
    for peer in ("transformerlens", "nnsight"):
        speed = paired_ratio(rounds, peer, "safetylab")
        print(f"  speed vs {CACHE_NAMES[peer]}: {speed:.3f}x {ratio_spread(rounds, peer, 'safetylab')} "
              f"[{raw_ratio(rounds, peer, 'safetylab'):.3f}x] (target >= 1.0: {'meets' if speed >= 1.0 else 'MISSES'})")
    if memory:
        report_memory(args, memory, CACHE_SIDES, CACHE_NAMES, "safetylab")


# ----------------------------------------------------------------------------- sae
def sae_batches(n: int):
    """``n`` fixed batches of synthetic activations (d 128)."""
    import torch

    from safetylab.interp.synthetic import SyntheticConfig, SyntheticFeatures

    features = SyntheticFeatures(SyntheticConfig(d=D_IN))
    generator = torch.Generator().manual_seed(SEED)
    return [features.sample(SAE_BATCH, generator)[0].contiguous() for _ in range(n)]


def ours_config(kind: str, steps: int):
    from safetylab.interp.sae import SAEConfig

    return SAEConfig(kind=kind, d_in=D_IN, expansion=EXPANSION, k=K, l1_coefficient=L1, lr=LR,
                     batch_size=SAE_BATCH, steps=steps, seed=SEED)


def saelens_trainer(kind: str, steps: int, data_provider, batch: int = SAE_BATCH, l1: float = L1, k: int = K):
    """SAELens's training SAE and trainer with the settings of the module docstring (``batch``, ``l1`` and
    ``k`` changed for the synthetic benchmark's budget)."""
    import torch
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(SEED)
    common = dict(d_in=D_IN, d_sae=D_IN * EXPANSION, normalize_activations="expected_average_only_in")
    if kind == "relu":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            **common, l1_coefficient=l1, l1_warm_up_steps=int(0.05 * steps), apply_b_dec_to_input=False,
            decoder_init_norm=0.1))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=k))
    config = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=LR, lr_end=LR,
        lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=int(0.2 * steps), adam_beta1=0.9,
        adam_beta2=0.999, device="cpu", dead_feature_window=1000, feature_sampling_window=2000, n_checkpoints=0,
        checkpoint_path=None, save_final_checkpoint=False, n_batches_for_norm_estimate=1,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1))
    return sae, SAETrainer(cfg=config, sae=sae, data_provider=data_provider)


def floor_sae_train(kind: str, batches, steps: int):
    """The bare-PyTorch SAE: encode, ReLU or TopK, decode, MSE (+ the decoder-norm-weighted L1), Adam."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    direction = torch.randn(D_IN * EXPANSION, D_IN, generator=generator)
    w_dec = (direction / direction.norm(dim=1, keepdim=True) * 0.1).requires_grad_()
    w_enc = w_dec.detach().t().clone().requires_grad_()
    b_enc = torch.zeros(D_IN * EXPANSION, requires_grad=True)
    b_dec = torch.zeros(D_IN, requires_grad=True)
    optimizer = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=LR, betas=(0.9, 0.999))
    for step in range(steps):
        x = batches[step % len(batches)]
        z = x @ w_enc + b_enc
        if kind == "relu":
            f = z.relu()
        else:
            values, index = z.topk(K, dim=-1)
            f = torch.zeros_like(z).scatter(-1, index, values.relu())
        x_hat = f @ w_dec + b_dec
        loss = (x - x_hat).pow(2).sum(-1).mean()
        if kind == "relu":
            loss = loss + L1 * (f * w_dec.norm(dim=1)).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return w_dec


def sae_sides(kind: str, batches, steps: int, sides) -> dict[str, Callable]:
    run: dict[str, Callable] = {}
    if "safetylab" in sides:
        from safetylab.interp.sae import train_sae

        config = ours_config(kind, steps)
        run["safetylab"] = lambda: train_sae(itertools.cycle(batches), config)[0]
    if "saelens" in sides:
        import sae_lens.config  # noqa: F401 - imported here, not in the timed call (nor in a memory baseline)
        import sae_lens.training.sae_trainer  # noqa: F401

        def saelens():
            sae, trainer = saelens_trainer(kind, steps, itertools.cycle(batches))
            trainer.activation_scaler.scaling_factor = D_IN ** 0.5 / batches[0].norm(dim=-1).mean().item()
            for step in range(steps):
                trainer.maybe_reset_sparsity()
                trainer.step(batches[step % len(batches)])
                trainer.n_training_steps += 1
            return sae
        run["saelens"] = saelens
    if "floor" in sides:
        run["floor"] = lambda: floor_sae_train(kind, batches, steps)
    return {s: f for s, f in run.items() if s in sides}


def run_sae(args) -> dict:
    batches = sae_batches(args.sae_batches)
    print(f"\nSAE training: d {D_IN}, {D_IN * EXPANSION} latents, batch {SAE_BATCH}, {args.sae_steps} steps per call "
          f"on {args.sae_batches} fixed synthetic batches; lr {LR}, ReLU lambda {L1}, TopK k {K}", flush=True)
    results = {}
    for kind in args.kind or SAE_KINDS:
        run = sae_sides(kind, batches, args.sae_steps, set(SAE_SIDES))
        for fn in run.values():
            fn()
        results[kind] = time_sides(run, args.rounds, args.repeats, f"sae {kind}")
    return results


def report_sae(args, results, memory) -> None:
    vectors = args.sae_steps * SAE_BATCH
    print()
    print(f"SAE training throughput, {args.sae_steps} steps of {SAE_BATCH} per call; ratios are medians of the "
          "per-round ratios (quartiles) [ratio of the medians]")
    print(f"{'kind':<5} {'side':<26} {'ms/step':>8} {'vectors/s':>10}")
    for kind, rounds in results.items():
        for side in SAE_SIDES:
            t = statistics.median(rounds[side])
            print(f"{kind:<5} {SAE_NAMES[side]:<26} {t / args.sae_steps * 1e3:>8.1f} {vectors / t:>10,.0f}")
        speed = paired_ratio(rounds, "saelens", "safetylab")
        floor = paired_ratio(rounds, "safetylab", "floor")
        print(f"  {kind}: safetylab speed / SAELens {speed:.3f}x {ratio_spread(rounds, 'saelens', 'safetylab')} "
              f"[{raw_ratio(rounds, 'saelens', 'safetylab'):.3f}] (target >= {TARGET_SAE_PEER}: "
              f"{'meets' if speed >= TARGET_SAE_PEER else 'MISSES'}); safetylab time / floor {floor:.3f} "
              f"{ratio_spread(rounds, 'safetylab', 'floor')} (target <= {TARGET_SAE_FLOOR}: "
              f"{'meets' if floor <= TARGET_SAE_FLOOR else 'MISSES'}); SAELens time / floor "
              f"{paired_ratio(rounds, 'saelens', 'floor'):.3f}")
    for kind in SAE_KINDS:
        if kind in memory:
            print(f"\n{kind}:", end="")
            report_memory(args, memory[kind], SAE_SIDES, SAE_NAMES, "safetylab")


# ----------------------------------------------------------------------------- recovery
def run_recovery(args) -> list[dict]:
    import torch

    from safetylab.core.seeding import derive_seed
    from safetylab.interp.synthetic import (
        BENCHMARK_SPARSITY,
        SyntheticConfig,
        SyntheticFeatures,
        benchmark_config,
        mean_best_cosine,
        run_benchmark,
    )

    data = SyntheticConfig(d=D_IN)
    features = SyntheticFeatures(data)
    generator = torch.Generator().manual_seed(derive_seed(data.seed, "synthetic", "evaluation"))
    x_eval, _ = features.sample(65_536, generator)
    benchmark = args.recovery_budget == "benchmark"
    steps = args.recovery_steps or (benchmark_config("topk").steps if benchmark else 5000)
    batch = benchmark_config("topk").batch_size if benchmark else SAE_BATCH
    print(f"\nrecovery: synthetic benchmark ({data.n_features} directions in d {data.d}, p {data.p}, noise "
          f"{data.noise}), {steps} steps of {batch} fresh samples per side"
          + (f", the benchmark's sparsity {BENCHMARK_SPARSITY}" if benchmark else ""), flush=True)
    rows = []
    for kind in args.kind or SAE_KINDS:
        config = benchmark_config(kind, steps=steps) if benchmark else ours_config(kind, steps)
        if "safetylab" in (args.recovery_side or ("safetylab",)):
            print(f"  {kind}: safetylab ... ({load()})", flush=True)
            _, ours = run_benchmark(config, data)
            rows.append({"kind": kind, "side": "safetylab", "cosine": ours["mean_best_cosine"], "l0": ours["l0"],
                         "fvu": ours["fvu"], "seconds": ours["seconds"], "samples": steps * batch})
            print(f"    {rows[-1]}", flush=True)
        if "saelens" not in (args.recovery_side or ("saelens",)):
            continue
        print(f"  {kind}: SAELens ... ({load()})", flush=True)
        sae, trainer = saelens_trainer(kind, steps, features.batches(batch, config.seed), batch,
                                       config.l1_coefficient, config.k)
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
        sae.eval()
        with torch.no_grad():
            f = torch.cat([sae.encode(x_eval[i:i + 8192]) for i in range(0, len(x_eval), 8192)])
            x_hat = torch.cat([sae.decode(f[i:i + 8192]) for i in range(0, len(f), 8192)])
        fvu = ((x_eval - x_hat).pow(2).sum() / (x_eval - x_eval.mean(0)).pow(2).sum()).item()
        rows.append({"kind": kind, "side": "saelens", "cosine": mean_best_cosine(features.directions, sae.W_dec),
                     "l0": (f > 0).sum(-1).float().mean().item(), "fvu": fvu, "seconds": seconds,
                     "samples": steps * batch})
        print(f"    {rows[-1]}", flush=True)
    return rows


def report_recovery(args, rows) -> None:
    print()
    print(f"recovery on the synthetic benchmark after {rows[0]['samples'] if rows else 0:,} samples (mean best signed "
          "cosine of the true directions with the decoder rows; L0 and FVU on 65,536 held-out samples)")
    print(f"{'kind':<5} {'side':<10} {'cosine':>7} {'L0':>6} {'FVU':>7} {'seconds':>8} {'vectors/s':>10}")
    for row in rows:
        print(f"{row['kind']:<5} {row['side']:<10} {row['cosine']:>7.4f} {row['l0']:>6.1f} {row['fvu']:>7.4f} "
              f"{row['seconds']:>8.0f} {row['samples'] / row['seconds']:>10,.0f}")
    for kind in SAE_KINDS:
        by = {r["side"]: r for r in rows if r["kind"] == kind}
        if len(by) < 2:
            continue
        delta = by["safetylab"]["cosine"] - by["saelens"]["cosine"]
        print(f"  {kind}: safetylab - SAELens {delta:+.4f} ({'equal or better' if delta >= -0.005 else 'WORSE'})")


# ----------------------------------------------------------------------------- memory (subprocess)
def memory_child(args) -> None:
    part, side, kind = (args.child.split(":") + [""])[:3]
    if part == "cache":
        model, ids = build_gpt2()
        run = cache_sides(model, ids, {side})[side]
    else:
        # every SAE child imports SAELens (and so TransformerLens, wandb, …) first: the sides then start from the same
        # process state, whose freed import memory the allocator may reuse
        import sae_lens.training.sae_trainer  # noqa: F401

        batches = sae_batches(args.sae_batches)
        run = sae_sides(kind, batches, args.sae_steps, {side})[side]
    source = reset_peak_rss(trim=True)
    before, rss = peak_kib(source), status_kib("VmRSS")
    for _ in range(args.mem_calls):
        run()
    print(json.dumps({"source": source, "rss_before_kib": rss, "growth_kib": peak_kib(source) - before}))


def measure_memory(args, child: str) -> dict:
    cmd = [sys.executable, __file__, "--child", child, "--threads", str(args.threads), "--mem-calls",
           str(args.mem_calls), "--sae-steps", str(args.sae_steps), "--sae-batches", str(args.sae_batches)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_runs(args, children: dict[str, str]) -> dict[str, list[dict]]:
    memory: dict[str, list[dict]] = {}
    names = list(children)
    for i in range(args.mem_repeats):
        for side in names if i % 2 == 0 else names[::-1]:
            memory.setdefault(side, []).append(measure_memory(args, children[side]))
    return memory


def report_memory(args, memory, sides, names, ours: str) -> None:
    print(f" peak RSS growth over {args.mem_calls} calls, fresh subprocess per side, median of {args.mem_repeats} "
          f"(peak from {next(iter(memory.values()))[0]['source']}):")
    print(f"{'side':<26} {'MiB':>7} {'baseline RSS MiB':>17}  runs MiB")
    growth = {}
    for side in sides:
        runs = memory[side]
        growth[side] = statistics.median(m["growth_kib"] for m in runs) / 1024
        base = statistics.median(m["rss_before_kib"] for m in runs) / 1024
        each = " ".join(f"{m['growth_kib'] / 1024:.1f}" for m in runs)
        print(f"{names[side]:<26} {growth[side]:>7.1f} {base:>17.0f}  {each}")
    print(f"  peak memory ratio (RSS growth), {names[ours]} " + ", ".join(
        f"/ {names[s]} {growth[ours] / max(growth[s], 1e-3):.3f}" for s in sides if s != ours))


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", choices=PARTS, action="append",
                        help="run only this part (repeatable; default: cache and sae, those whose peers are installed)")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds, sides rotating (default 15)")
    parser.add_argument("--repeats", type=int, default=3, help="samples per side and round (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--sae-steps", type=int, default=10, help="training steps per timed SAE call (default 10)")
    parser.add_argument("--sae-batches", type=int, default=4, help="fixed activation batches, cycled (default 4)")
    parser.add_argument("--kind", choices=SAE_KINDS, action="append",
                        help="sae and recovery: only this SAE kind (repeatable; default both)")
    parser.add_argument("--recovery-side", choices=("safetylab", "saelens"), action="append",
                        help="recovery: only this side (repeatable; default both)")
    parser.add_argument("--recovery-steps", type=int, default=None,
                        help="steps of the recovery runs (default 5000, or 10000 with --recovery-budget benchmark)")
    parser.add_argument("--recovery-budget", choices=("throughput", "benchmark"), default="throughput",
                        help="recovery: the throughput runs' settings for --recovery-steps steps of 4,096 (default), "
                             "or the synthetic benchmark's: 10,000 steps of 1,024 (SAELens's toy budget) at "
                             "safetylab.interp.synthetic.BENCHMARK_SPARSITY, on both sides")
    parser.add_argument("--mem-calls", type=int, default=2, help="calls in each memory subprocess (default 2)")
    parser.add_argument("--mem-repeats", type=int, default=2, help="memory subprocesses per side (default 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        memory_child(args)
        return
    available = {p: all(importlib.util.find_spec(m) is not None for m in PEERS[p]) for p in PARTS}
    parts = args.only or [p for p in ("cache", "sae") if available[p]]
    missing = [p for p in parts if not available[p]]
    if missing or not parts:
        raise SystemExit(f"the peers of {', '.join(missing) or 'cache and sae'} are not installed here: the cache "
                         "part needs benchmarks/requirements-interp.txt, sae and recovery "
                         "benchmarks/requirements-saelens.txt (their headers have the recipes)")
    started = time.perf_counter()
    versions = {}
    for package in ("transformers", "transformer-lens", "nnsight", "sae-lens"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    print(f"torch {torch.__version__}, " + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f"; torch threads {torch.get_num_threads()}; {args.rounds} rounds x {args.repeats} samples per side")
    print(f"start: {load()}", flush=True)
    cache = sae = recovery = None
    cache_memory: dict = {}
    sae_memory: dict = {}
    if "cache" in parts:
        cache = run_cache(args)
        if not args.no_memory:
            print("\npeak memory: one fresh subprocess per cache side ...", flush=True)
            cache_memory = memory_runs(args, {s: f"cache:{s}" for s in CACHE_SIDES})
    if "sae" in parts:
        sae = run_sae(args)
        if not args.no_memory:
            print("\npeak memory: one fresh subprocess per SAE side ...", flush=True)
            sae_memory = {kind: memory_runs(args, {s: f"sae:{s}:{kind}" for s in SAE_SIDES})
                          for kind in args.kind or SAE_KINDS}
    if "recovery" in parts:
        recovery = run_recovery(args)
    print(f"\nend: {load()}")
    if cache is not None:
        report_cache(args, cache, cache_memory)
    if sae is not None:
        report_sae(args, sae, sae_memory)
    if recovery is not None:
        report_recovery(args, recovery)
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
