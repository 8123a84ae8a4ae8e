"""An audit's evaluation samples re-scored by the gold judge of this checkout: what a change to the judge
alone moves, on the very same responses.

    python scripts/rescore_samples.py runs/audit                      # this checkout's judge
    PYTHONPATH=OTHER/src python scripts/rescore_samples.py runs/audit  # another checkout's judge

Prints the overall metrics of each evaluated model (the audit's base and SFT, and the align stage's
policies where their samples were kept) as JSON, and the behaviours whose count changed most.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from safetylab.align.evaluate import summarize
from safetylab.core.io import read_jsonl
from safetylab.world import World, WorldConfig


def main(audit: Path) -> None:
    config = json.loads((audit / "config.json").read_text())
    world = World(WorldConfig(**config["align"]["world"]))
    out = {}
    for path in sorted((audit / "align").glob("*/samples-*.jsonl")):
        records = []
        for sample in read_jsonl(path):
            request = world.parser.parse(sample["prompt"])
            records.append({**world.judge.score(request, sample["response"]).to_dict(), "kl": sample.get("kl", 0.0)})
        name = path.stem.removeprefix("samples-")
        out[name] = {**{k: v for k, v in summarize(records).items() if k != "kl_to_reference"},
                     "behaviours": dict(Counter(r["behaviour"] for r in records).most_common())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
