"""DPO, PPO and RLOO from an audit's SFT model on the `ideal` labeler's comparisons, scored by the gold
judge on held-out prompts: the alignment table of docs/results.md.

The comparisons are on-policy, as in InstructGPT: the labeler compares the SFT model's own samples
(four per train prompt, every two). The reward model learns from those and from the world's
comparisons of written styles; DPO, and DPO with the chosen responses' NLL added (RPO), learn from
the on-policy ones; PPO and RLOO optimise the reward model.

    for s in 0 1 2; do safetylab audit --seed $s --out runs/seed$s; done
    for s in 0 1 2; do python scripts/align_ideal.py runs/seed$s --out runs/align-ideal/seed$s; done
    python scripts/align_ideal.py --summarize runs/align-ideal/seed0 runs/align-ideal/seed1 runs/align-ideal/seed2

Each run (reward model, DPO, PPO, RLOO) is a run directory under ``--out``; a finished one is loaded,
an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path
from statistics import fmean, stdev

import torch

from safetylab.align.data import preferences_from_records, read_preferences
from safetylab.align.dpo import DPOConfig, policy_preferences, train_dpo
from safetylab.align.ppo import PPOConfig, train_ppo
from safetylab.align.reward import RewardConfig, evaluate_reward_model, fit_reward_models, score
from safetylab.align.rloo import RLOOConfig, train_rloo
from safetylab.core.io import atomic_write_text, write_jsonl
from safetylab.core.runs import RunDir
from safetylab.core.seeding import seed_everything
from safetylab.evals.policy import METRICS, EvalConfig, evaluate_policy, gold_tracker
from safetylab.models.lm import load_model, save_model
from safetylab.models.train import TrainConfig, finetune
from safetylab.world import KINDS, World, WorldConfig

PAIRS = 3_000  # the world's comparisons of written styles
SAMPLED_PER_KIND = 200  # train prompts per kind whose SFT samples are compared
SAMPLES = 4  # per prompt
PROMPTS_PER_KIND = 100  # for PPO and RLOO
REWARD = RewardConfig(train=TrainConfig(steps=300, batch_size=32, lr=5e-4, warmup_steps=20, log_every=25,
                                        checkpoint_every=100))
DPO = DPOConfig(train=TrainConfig(steps=100, batch_size=32, lr=1e-4, warmup_steps=10, log_every=10,
                                  checkpoint_every=50, eval_every=20), beta=0.1)
PPO = PPOConfig(train=TrainConfig(steps=160, batch_size=32, lr=1e-4, warmup_steps=8, log_every=8,
                                  checkpoint_every=40, eval_every=40))
RLOO = RLOOConfig(train=TrainConfig(steps=100, batch_size=16, lr=1e-4, warmup_steps=5, log_every=10,
                                    checkpoint_every=50, eval_every=20))


def run_seed(audit: Path, out: Path, flattery: float = 0.0, hedging: float = 0.0, eval_per_kind: int = 60) -> dict:
    config = json.loads((audit / "report.json").read_text())["config"]
    seed = config["seed"]
    world = World(WorldConfig(seed=seed))
    sft_path = audit / "stages" / "sft" / "artifacts" / "model"
    if flattery or hedging:
        sft_path = _contractor_sft(audit, out / "sft", world, config, flattery, hedging)
    sft, tokenizer = load_model(sft_path)
    sampled = {split: _sampled(out / f"sampled-{split}.jsonl", sft, tokenizer, world, split, seed)
               for split in ("train", "test")}
    styles = preferences_from_records(world.preferences(PAIRS, "ideal")).rows
    held_out = preferences_from_records(world.preferences(PAIRS // 5, "ideal", split="test")).rows
    rows = styles + sampled["train"]
    reward_config = replace(REWARD, train=replace(REWARD.train, seed=seed))
    reward_run = RunDir(out / "reward", {"base": str(sft_path), "reward": asdict(reward_config), "pairs": len(rows)})
    (reward_model,), reward_tokenizer = fit_reward_models(sft_path, rows, reward_config, reward_run)
    results: dict = {"seed": seed, "pairs": {"styles": len(styles), "sampled": len(sampled["train"])},
                     "reward": evaluate_reward_model(reward_model, reward_tokenizer, held_out),
                     "reward_sampled": evaluate_reward_model(reward_model, reward_tokenizer, sampled["test"])}

    prompts = [r.prompt for kind in KINDS for r in world.requests(kind, "train", PROMPTS_PER_KIND, seed=seed)]
    tracker = gold_tracker(tokenizer, world.judge, world.evaluation_set(10, 2, seed=1), sft,
                           EvalConfig(per_kind=10, jailbroken=2))

    def reward(p, r):
        return score(reward_model, reward_tokenizer, p, r)

    trainers = {
        "dpo": (DPO, lambda policy, c, run: train_dpo(policy, tokenizer, sampled["train"], c, run, sft,
                                                      evaluate=tracker)),
        "rpo": (replace(DPO, rpo_alpha=1.0), lambda policy, c, run: train_dpo(policy, tokenizer, sampled["train"], c,
                                                                              run, sft, evaluate=tracker)),
        "ppo": (PPO, lambda policy, c, run: train_ppo(policy, tokenizer, prompts, reward, sft, c, run,
                                                      evaluate=tracker)),
        "rloo": (RLOO, lambda policy, c, run: train_rloo(policy, tokenizer, prompts, reward, sft, c, run,
                                                         evaluate=tracker)),
    }
    requests = world.evaluation_set(eval_per_kind, eval_per_kind // 5)
    models = {"sft": sft}
    for name, (config, train) in trainers.items():
        config = replace(config, train=replace(config.train, seed=seed))
        run = RunDir(out / name, {"base": str(sft_path), name: asdict(config)})
        final = run.artifacts / "model"
        if not final.exists():
            save_model(train(load_model(sft_path)[0], config, run), tokenizer, final)
        models[name] = load_model(final)[0]
    for name, model in models.items():
        seed_everything(seed)
        results[name] = evaluate_policy(model, tokenizer, world.judge, requests, sft)["overall"]
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _contractor_sft(audit: Path, out: Path, world: World, config: dict, flattery: float, hedging: float) -> Path:
    """The audit's SFT again from its base model, on demonstrations by a contractor with habits: a
    ``flattery`` share of the correct answers wrapped in flattery (gold utility −0.1 a phrase) and a
    ``hedging`` share hedged (gold 0.6 against 1.0 when correct, −0.5 against −1.0 when wrong)."""
    sft = TrainConfig(**config["sft"])
    demos = world.demonstrations(config["demonstrations"], flattery_rate=flattery, hedge_rate=hedging)
    corpus = (audit / "stages" / "world" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    replay = [line for line in corpus if not line.startswith("<user>")][: round(config["sft_replay"] * len(demos))]
    run = RunDir(out, {"train": asdict(sft), "demonstrations": len(demos), "flattery": flattery, "hedging": hedging,
                         "replay": len(replay)})
    base, tokenizer = load_model(audit / "stages" / "base" / "artifacts" / "model")
    finetune(base, tokenizer, [(d["prompt"], d["response"]) for d in demos], sft, run, replay)
    return run.artifacts / "model"


def _sampled(path: Path, sft, tokenizer, world: World, split: str, seed: int):
    """The ideal labeler's comparisons of SFT samples on ``split`` prompts, made once and kept."""
    if not path.exists():
        per_kind = SAMPLED_PER_KIND if split == "train" else SAMPLED_PER_KIND // 4
        requests = [r for kind in KINDS for r in world.requests(kind, split, per_kind, seed=seed)]
        seed_everything(seed)
        write_jsonl(path, policy_preferences(sft, tokenizer, world, requests, "ideal", SAMPLES, seed))
    return read_preferences(path).rows


def summarize(paths: list[str]) -> None:
    results = [json.loads((Path(p) / "results.json").read_text()) for p in paths]
    print(f"{len(results)} seeds: {', '.join(str(r['seed']) for r in results)}\n")
    models = [m for m in ("sft", "dpo", "rpo", "ppo", "rloo") if m in results[0]]
    print(f"| metric | {' | '.join(m.upper() for m in models)} |\n|---|{'---:|' * len(models)}")
    for metric in METRICS:
        print(f"| {metric} | {' | '.join(_cell([r[m][metric] for r in results]) for m in models)} |")
    gains = [_cell([r[m]["gold_utility"] - r["sft"]["gold_utility"] for r in results]) for m in models[1:]]
    print(f"| gold utility gain over SFT, paired by seed | – | {' | '.join(gains)} |")
    for m in models[1:]:
        print(f"{m.upper()} gains by seed: " + ", ".join(
            f"{r[m]['gold_utility'] - r['sft']['gold_utility']:+.3f}" for r in results))
    print("\n| reward model, held-out `ideal` comparisons | of written styles | of SFT samples |\n|---|---:|---:|")
    for metric in ("accuracy", "gold_agreement"):
        print(f"| {metric} | {_cell([r['reward'][metric] for r in results])} | "
              f"{_cell([r['reward_sampled'][metric] for r in results])} |")
    print("\ncomparisons: " + ", ".join(f"{k} {_cell([r['pairs'][k] for r in results])}" for k in results[0]["pairs"]))


def _cell(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{fmean(values):+.3f} ± {stdev(values) if len(values) > 1 else 0.0:.3f}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="an audit run directory (or, with --summarize, result directories)")
    parser.add_argument("--out", type=Path, help="where the runs and results.json go")
    parser.add_argument("--summarize", action="store_true", help="print the table over the given result directories")
    parser.add_argument("--flattery", type=float, default=0.0,
                        help="start from an SFT whose demonstrations flatter this share of answers (0: the audit's)")
    parser.add_argument("--hedging", type=float, default=0.0,
                        help="start from an SFT whose demonstrations hedge this share of answers (0: the audit's)")
    parser.add_argument("--eval-per-kind", type=int, default=60,
                        help="held-out prompts per kind in the final evaluation (a fifth as many jailbroken)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 per process is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.summarize:
        summarize(args.paths)
    else:
        results = run_seed(Path(args.paths[0]), args.out, args.flattery, args.hedging, args.eval_per_kind)
        print(json.dumps(results, indent=2))
