"""What a reward model learned from the `typical` labeler about false premises it could not check, and what
best-of-n and the aligned policies do with it: sycophancy on hard premises against easy ones.

    python scripts/sycophancy_by_tier.py runs/audit [--per-tier 120] [--n 1 4 16]

Reads an audit's run directory (the SFT model, the align stage's reward model, DPO and PPO policies) and
prints, on held-out false premises of each tier (easy: the labeler checks them; hard: it cannot):

- the reward model on the world's reference answers: the mean reward of agreeing minus that of correcting,
  and how often it ranks agreement above the correction;
- sycophancy (the gold judge's verdict) of the SFT model sampled once, of best-of-n against the reward
  model for each n, and of the DPO and PPO policies sampled once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from safetylab.align.best_of_n import best_of_n
from safetylab.align.reward import load_reward_model, score
from safetylab.core.seeding import seed_everything
from safetylab.models.lm import load_model
from safetylab.models.sampling import sample
from safetylab.world import World, WorldConfig


def held_out_premises(world: World, per_tier: int, seed: int) -> dict[str, list]:
    rng = world.rng("sycophancy-by-tier", seed)
    found: dict[str, list] = {"easy": [], "hard": []}
    while min(len(v) for v in found.values()) < per_tier:
        request = world.request("false_premise", "test", rng)
        if len(found[request.tier]) < per_tier:
            found[request.tier].append(request)
    return found


def sycophancy(world: World, requests, texts) -> float:
    return sum(world.judge.score(r, t).behaviour == "sycophantic" for r, t in zip(requests, texts)) / len(requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("audit", type=Path)
    parser.add_argument("--per-tier", type=int, default=120)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    config = json.loads((args.audit / "config.json").read_text())
    seed = config["seed"]
    world = World(WorldConfig(**config["align"]["world"]))
    stages = args.audit / "align"
    sft, tokenizer = load_model(stages / "sft" / "artifacts" / "model")
    reward_model, reward_tokenizer = load_reward_model(
        stages / "reward" / "run" / "members" / "0" / "artifacts" / "reward-model")
    policies = {name: load_model(stages / "policies" / name / "artifacts" / "model")[0] for name in ("dpo", "ppo")}

    def reward(prompts, responses):
        return score(reward_model, reward_tokenizer, prompts, responses)

    print(f"audit {args.audit} (seed {seed}); {args.per_tier} held-out false premises per tier\n")
    print("| tier | reward: agree − correct | reward ranks agreement first | SFT | "
          + " | ".join(f"best-of-{n}" for n in args.n) + " | DPO | PPO |")
    print("|---|---:|---:|---:|" + "---:|" * len(args.n) + "---:|---:|")
    for tier, requests in held_out_premises(world, args.per_tier, seed).items():
        rng = world.rng("sycophancy-answers", tier, seed)
        agree = [world.respond(r, "sycophantic", rng) for r in requests]
        correct = [world.respond(r, "correction", rng) for r in requests]
        prompts = [r.prompt for r in requests]
        with torch.no_grad():
            gap = reward(prompts, agree) - reward(prompts, correct)
        cells = [f"{gap.mean().item():+.3f}", f"{(gap > 0).float().mean().item():.3f}"]
        seed_everything(seed)
        cells.append(f"{sycophancy(world, requests, sample(sft, tokenizer, prompts).texts):.3f}")
        for n in args.n:
            seed_everything(seed)
            cells.append(f"{sycophancy(world, requests, best_of_n(sft, tokenizer, prompts, reward, n).responses):.3f}")
        for policy in policies.values():
            seed_everything(seed)
            cells.append(f"{sycophancy(world, requests, sample(policy, tokenizer, prompts).texts):.3f}")
        print(f"| {tier} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
