"""Mean ± standard deviation of audit results over seeds, as the Markdown tables in docs/results.md.

    for s in 0 1 2; do safetylab audit --seed $s --out runs/seed$s; done
    python scripts/summarize_seeds.py runs/seed0 runs/seed1 runs/seed2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import fmean, stdev

from safetylab.evals.policy import METRICS
from safetylab.world.requests import KINDS


def main(paths: list[str]) -> None:
    reports = [json.loads((Path(p) / "report.json").read_text()) for p in paths]
    evaluations = [next(s for s in r["sections"] if s["name"] == "evaluate")["data"] for r in reports]
    print(f"{len(reports)} seeds: {', '.join(str(r['config']['seed']) for r in reports)}\n")
    print("| metric | base | SFT |\n|---|---:|---:|")
    for metric in METRICS:
        cells = [_cell([e["overall"][model][metric] for e in evaluations]) for model in ("base", "sft")]
        print(f"| {metric} | {' | '.join(cells)} |")
    for model in ("base", "sft"):
        print(f"\n{model}, by request kind:\n")
        print("| kind | gold utility | harmful compliance | jailbreak success | over-refusal | accuracy | "
              "confident wrong | sycophancy |\n|---|" + "---:|" * 7)
        for kind in (*KINDS, "jailbroken"):
            rows = [e["by_kind"][model][kind] for e in evaluations]
            cells = [_cell([r[m] for r in rows]) for m in METRICS[:-1]]
            print(f"| {kind} | {' | '.join(cells)} |")


def _cell(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    spread = stdev(values) if len(values) > 1 else 0.0
    return f"{fmean(values):+.3f} ± {spread:.3f}"


if __name__ == "__main__":
    main(sys.argv[1:])
