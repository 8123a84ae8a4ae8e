"""Train a tiny world model for a few steps; run alone or under ``accelerate launch``.

    python tests/distributed_train.py OUT
    accelerate launch --num_processes 2 --cpu tests/distributed_train.py OUT
"""

import os
import sys

from safetylab.core import RunDir, seed_everything
from safetylab.models import ModelConfig, build_model, save_model, train_tokenizer
from safetylab.models.train import TrainConfig, text_examples, train_lm
from safetylab.world import World


def main(out: str) -> None:
    lines = World().corpus(200, fact_repeats=1)
    tokenizer = train_tokenizer(lines)
    seed_everything(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tokenizer)
    config = TrainConfig(steps=8, batch_size=8, lr=1e-2, warmup_steps=2, log_every=2, checkpoint_every=4, device="cpu")
    run = RunDir(out, {"test": "distributed"})
    model = train_lm(model, tokenizer, text_examples(tokenizer, lines, 64), config, run)
    if int(os.environ.get("RANK", "0")) == 0:
        save_model(model, tokenizer, run.artifacts / "model")


if __name__ == "__main__":
    main(sys.argv[1])
