"""A few DPO steps on a tiny world model; run alone or under ``accelerate launch``.

    python tests/distributed_dpo.py OUT
    accelerate launch --num_processes 2 --cpu tests/distributed_dpo.py OUT
"""

import os
import sys

from safetylab.align.data import preferences_from_records
from safetylab.align.dpo import DPOConfig, train_dpo
from safetylab.core import RunDir, seed_everything
from safetylab.models import ModelConfig, build_model, save_model, train_tokenizer
from safetylab.models.train import TrainConfig
from safetylab.world import World


def main(out: str) -> None:
    world = World()
    tokenizer = train_tokenizer(world.corpus(200, fact_repeats=1))
    rows = preferences_from_records(world.preferences(64, "ideal")).rows
    seed_everything(0)
    policy = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tokenizer)
    seed_everything(0)
    reference = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tokenizer).eval()
    train = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=1, max_length=64, log_every=2,
                        checkpoint_every=2, device="cpu")
    run = RunDir(out, {"test": "distributed dpo"})
    policy = train_dpo(policy, tokenizer, rows, DPOConfig(train=train, beta=0.5), run, reference)
    if int(os.environ.get("RANK", "0")) == 0:
        save_model(policy, tokenizer, run.artifacts / "model")


if __name__ == "__main__":
    main(sys.argv[1])
